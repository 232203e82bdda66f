"""The training objective: the span term and the extra loss terms, each saying what it needs.

    loss = alpha_ce * CE + alpha_kd * T^2 * KL       the span term (kdqa.loss.qa_distillation_loss)
         + sum of weight * term over the extra terms  e.g. alpha_hidden * hidden

An extra term is one `Term` in EXTRA_TERMS: the flag holding its weight (0: off), its name (its key
in metrics.jsonl, in the run's loss_weights and loss_modules, hence in checkpoints' state dicts), the
model output it reads from student and teacher (a name of forward_qa's outputs) and how a run builds
it: an nn.Module called as `module(student_output, teacher_output, attention_mask) -> scalar`, whose
parameters (projections) train and are checkpointed with the student. From these the trainer knows
what to ask of the models, and the rules follow in one place each: a term reading teacher internals
needs the online teacher (not --teacher_logits_cache: it holds logits only), and attention
probabilities need eager attention (SDPA computes none).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from kdqa.hidden_distill import HiddenStateDistillation, choose_layer_map, format_layer_map, parse_student_layers
from kdqa.loss import qa_distillation_loss

if TYPE_CHECKING:  # kdqa.config reads the rules here: importing modeling (transformers) would slow every --help
    from kdqa.modeling import QAOutputs

# What each model output is called in messages.
OUTPUT_NAMES = {"hidden_states": "hidden states", "attentions": "attention probabilities"}


@dataclass(frozen=True)
class Term:
    """One extra loss term of the objective."""
    name: str          # metrics.jsonl field, loss_weights / loss_modules key (checkpoint keys: keep it stable)
    weight_flag: str   # the args attribute holding its weight; 0 turns it off
    reads: str         # the forward_qa output it compares, student against teacher
    build: Callable[[argparse.Namespace, torch.nn.Module, torch.nn.Module], torch.nn.Module]
    describe: Callable[[float, torch.nn.Module], str]  # (weight, module) -> what log_plan says about it

    @property
    def needs(self) -> frozenset[str]:
        """The model outputs it needs from both student and teacher."""
        return frozenset({self.reads})


def copied_layers(args) -> list[int] | None:
    """The teacher layers --student_layers copied into the student (None: not built that way)."""
    spec = getattr(args, "student_layers", None)
    return parse_student_layers(spec) if spec else None


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def hidden_term(args, student, teacher) -> HiddenStateDistillation:
    """--hidden_layer_map (default: the copied layers, else uniform), projections where widths differ."""
    pairs = choose_layer_map(args.hidden_layer_map, num_layers(student), num_layers(teacher), copied_layers(args))
    return HiddenStateDistillation(pairs, student.config.hidden_size, teacher.config.hidden_size, args.hidden_loss)


def describe_hidden(weight: float, module: HiddenStateDistillation) -> str:
    return (f"hidden-state term: {weight} x {module.kind} over student:teacher layers "
            f"{format_layer_map(module.layer_map)}"
            + (", with a learned projection per layer" if module.projections is not None else ""))


# ----------------------------------------------------------------------------- attention transfer

ATTENTION_FLAG = "--attention_layer_map"
PROBABILITY_FLOOR = 1e-12  # log of a student probability that underflowed to 0: large, but finite


def masked_attention_kl(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher row || student row) of [B, heads, L, L] attention probabilities, summed over real
    keys, averaged over heads and real queries (at least fp32). The models' masks give padding keys
    zero probability, so each row's real keys already sum to 1."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(dtype), teacher.to(dtype)
    keys = attention_mask[:, None, None, :].to(dtype)
    per_query = (keys * (torch.xlogy(teacher, teacher) - teacher * student.clamp_min(PROBABILITY_FLOOR).log())).sum(-1)
    queries = attention_mask[:, None, :].to(dtype).expand_as(per_query)
    return (per_query * queries).sum() / queries.sum().clamp_min(1.0)


class AttentionDistillation(torch.nn.Module):
    """TinyBERT's / MiniLM's attention transfer: mapped student layers learn the teacher's attention
    distributions, head by head (no trainable parts). Layers count from 1 (0, the embeddings, has none)."""

    def __init__(self, layer_map: list[tuple[int, int]], student_heads: int, teacher_heads: int):
        super().__init__()
        if student_heads != teacher_heads:
            raise ValueError(f"--alpha_attention compares attention head by head, but the student has {student_heads} "
                             f"heads per layer and the teacher {teacher_heads}: distil into a student with the "
                             "teacher's head count (e.g. --student_layers), or set --alpha_attention 0")
        if any(s < 1 or t < 1 for s, t in layer_map):
            raise ValueError(f"{ATTENTION_FLAG} {format_layer_map(layer_map)!r}: layer 0 is the embedding output, "
                             "which has no attention; map encoder layers (1 and up)")
        self.layer_map = list(layer_map)

    def forward(self, student_attentions: tuple[torch.Tensor, ...], teacher_attentions: tuple[torch.Tensor, ...],
                attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([masked_attention_kl(student_attentions[s - 1], teacher_attentions[t - 1].detach(),
                                                attention_mask) for s, t in self.layer_map]).mean()


def attention_term(args, student, teacher) -> AttentionDistillation:
    """--attention_layer_map, defaulting as --hidden_layer_map does."""
    pairs = choose_layer_map(args.attention_layer_map, num_layers(student), num_layers(teacher), copied_layers(args),
                             flag=ATTENTION_FLAG)
    return AttentionDistillation(pairs, student.config.num_attention_heads, teacher.config.num_attention_heads)


def describe_attention(weight: float, module: AttentionDistillation) -> str:
    return (f"attention term: {weight} x KL(teacher || student) per head over student:teacher layers "
            f"{format_layer_map(module.layer_map)}")


EXTRA_TERMS = (
    Term("hidden", "alpha_hidden", "hidden_states", hidden_term, describe_hidden),
    Term("attention", "alpha_attention", "attentions", attention_term, describe_attention),
)


# ----------------------------------------------------------------------------- rules read from the flags

def terms_on(args) -> list[Term]:
    """The extra terms whose weight is > 0 (in distill mode they are part of the loss)."""
    return [term for term in EXTRA_TERMS if getattr(args, term.weight_flag, 0)]


def needs_teacher_internals(args) -> bool:
    """Whether the loss reads more of the teacher than its logits: then it must run online."""
    return any(term.needs for term in terms_on(args))


def cache_conflict(args) -> str | None:
    """The one rule on --teacher_logits_cache: None where it can serve the loss, else why not and the fix."""
    if not getattr(args, "teacher_logits_cache", None):
        return None
    for term in terms_on(args):
        if term.needs:
            what = " and ".join(OUTPUT_NAMES[name] for name in sorted(term.needs))
            return (f"--{term.weight_flag} needs the teacher's {what}, which --teacher_logits_cache does not "
                    "hold (it stores logits only): leave out --teacher_logits_cache so the teacher runs "
                    f"online, or set --{term.weight_flag} 0")
    return None


def attn_implementation(args) -> str:
    """The attention kernel the models load with: eager where a distillation term reads attention
    probabilities (SDPA returns none), else --attn_implementation."""
    if args.mode == "distill" and any("attentions" in term.needs for term in terms_on(args)):
        return "eager"
    return args.attn_implementation


# ----------------------------------------------------------------------------- a run's objective

def build_loss_modules(args, student, teacher) -> torch.nn.ModuleDict:
    """The extra terms of a distillation run, by name, in EXTRA_TERMS order (empty when fine-tuning)."""
    if args.mode != "distill":
        return torch.nn.ModuleDict()
    return torch.nn.ModuleDict({term.name: term.build(args, student, teacher) for term in terms_on(args)})


def active_terms(loss_modules: torch.nn.ModuleDict) -> list[Term]:
    return [term for term in EXTRA_TERMS if term.name in loss_modules]


def loss_weights(args, loss_modules: torch.nn.ModuleDict) -> dict:
    """Term name -> weight: ce and kd (fine-tuning: CE alone), then each extra term's flag."""
    weights = {"ce": args.alpha_ce, "kd": args.alpha_kd} if args.mode == "distill" else {"ce": 1.0, "kd": 0.0}
    weights.update({term.name: getattr(args, term.weight_flag) for term in active_terms(loss_modules)})
    return weights


def outputs_needed(loss_modules: torch.nn.ModuleDict) -> frozenset[str]:
    """What forward_qa must return, of the student and of the teacher, for these terms."""
    return frozenset().union(*(term.needs for term in active_terms(loss_modules)))


def objective_loss(args, weights: dict, loss_modules: torch.nn.ModuleDict, batch: dict, student_out: QAOutputs,
                   teacher_out: QAOutputs) -> tuple[torch.Tensor, dict]:
    """(the weighted total, {name: unweighted term}): the span term, then each extra term."""
    out = qa_distillation_loss(student_out.start, student_out.end, batch["start_positions"], batch["end_positions"],
                               teacher_out.start, teacher_out.end, mask=batch["attention_mask"].bool(),
                               temperature=args.temperature, alpha_ce=weights["ce"], alpha_kd=weights["kd"],
                               impl=args.loss_impl)
    total, terms = out.loss, {"ce": out.ce, "kd": out.kd}
    for term in active_terms(loss_modules):
        terms[term.name] = loss_modules[term.name](getattr(student_out, term.reads), getattr(teacher_out, term.reads),
                                                   batch["attention_mask"])
        total = total + weights[term.name] * terms[term.name]
    return total, terms


def describe(args, loss_modules: torch.nn.ModuleDict) -> list[str]:
    """The log lines of the extra terms, and of the attention kernel they imposed."""
    lines = [term.describe(getattr(args, term.weight_flag), loss_modules[term.name])
             for term in active_terms(loss_modules)]
    if "attentions" in outputs_needed(loss_modules):
        lines.append("student and teacher run eager attention (not SDPA, which returns no attention "
                     "probabilities): each step costs more")
    return lines
