"""The training objective, one object built once per run: the span term and the extra loss terms.

    loss = alpha_ce * CE + alpha_kd * T^2 * KL       the span term (SpanTerm: kdqa.loss.qa_distillation_loss)
         + sum of weight * term over the extra terms  e.g. alpha_hidden * hidden

`build(args, student, teacher)` reads the flags once and returns an `Objective` (an nn.Module): the
run asks it what the models must return (`needs`, and the forward hooks it registered for terms that
read the models' insides), calls it `(student_out, teacher_out, batch) -> (total, parts)` every step,
and asks it to `describe()` itself once: the log's plan lines and the report card's objective
section both come from that description.

An extra term is one `Term` in EXTRA_TERMS: its weight flag (0: off), its other flags with their
defaults, its name (its key in metrics.jsonl, in the loss weights and, for trainable parts, in
checkpoints' state dicts: keep it stable), the model output it reads ("hidden_states", "attentions",
or "captured": what its module's `student_taps` / `teacher_taps` recorded through
kdqa.model_adapter), how a run builds its module (`module(student_reads, teacher_reads,
attention_mask) -> scalar`, with `describe() -> dict`) and its parse-time check. From these follow,
in one place each: a term reading teacher internals needs the online teacher (not
--teacher_logits_cache: it holds logits only), attention probabilities need eager attention (SDPA
computes none), the recipe's logits-only row runs with every term off, a resume that changed a
term's flag is refused naming it, and flags of a term that is off get one warning.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from kdqa.hidden_distill import (HiddenStateDistillation, choose_layer_map, format_layer_map, parse_layer_map,
                                 parse_student_layers)
from kdqa.loss import qa_distillation_loss
from kdqa.model_adapter import Capture
from kdqa.relation_distill import RelationDistillation, check_relation_heads

if TYPE_CHECKING:  # kdqa.validation reads the rules here: importing modeling (transformers) would slow every --help
    from kdqa.modeling import QAOutputs

# What each model output is called in messages.
OUTPUT_NAMES = {"hidden_states": "hidden states", "attentions": "attention probabilities",
                "captured": "queries, keys and values"}


@dataclass(frozen=True)
class Term:
    """One extra loss term of the objective."""
    name: str          # metrics.jsonl field, weights / loss_modules key (checkpoint keys: keep it stable)
    weight_flag: str   # the args attribute holding its weight; 0 turns it off
    reads: str         # the forward_qa output it compares, student against teacher
    build: Callable[[argparse.Namespace, torch.nn.Module, torch.nn.Module], torch.nn.Module]
    settings: dict = field(default_factory=dict)  # its other flags -> the parser's default
    check: Callable[[argparse.Namespace], None] | None = None  # parse-time check; raises ValueError

    @property
    def needs(self) -> frozenset[str]:
        """The model outputs it needs from both student and teacher."""
        return frozenset({self.reads})

    @property
    def flags(self) -> dict:
        """Every flag of the term -> its default (the weight's is 0: off)."""
        return {self.weight_flag: 0.0, **self.settings}


def copied_layers(args) -> list[int] | None:
    """The teacher layers --student_layers copied into the student (None: not built that way)."""
    spec = getattr(args, "student_layers", None)
    return parse_student_layers(spec) if spec else None


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def layer_map_check(flag: str) -> Callable[[argparse.Namespace], None]:
    """A parse-time check of a --*_layer_map: as far as it goes before the models' depths are known."""
    def check(args) -> None:
        spec = getattr(args, flag.lstrip("-"))
        if spec is not None:
            parse_layer_map(spec, 10**6, 10**6, flag=flag)
    return check


def hidden_term(args, student, teacher) -> HiddenStateDistillation:
    """--hidden_layer_map (default: the copied layers, else uniform), projections where widths differ."""
    pairs = choose_layer_map(args.hidden_layer_map, num_layers(student), num_layers(teacher), copied_layers(args))
    return HiddenStateDistillation(pairs, student.config.hidden_size, teacher.config.hidden_size, args.hidden_loss)


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

    def describe(self) -> dict:
        return {"what": "KL(teacher ‖ student) of the attention probabilities, per head",
                "layer_map (student:teacher)": format_layer_map(self.layer_map)}


def attention_term(args, student, teacher) -> AttentionDistillation:
    """--attention_layer_map, defaulting as --hidden_layer_map does."""
    pairs = choose_layer_map(args.attention_layer_map, num_layers(student), num_layers(teacher), copied_layers(args),
                             flag=ATTENTION_FLAG)
    return AttentionDistillation(pairs, student.config.num_attention_heads, teacher.config.num_attention_heads)


def relation_term(args, student, teacher) -> RelationDistillation:
    """--relation_layer_map (defaulting as --hidden_layer_map does), --relation_heads (default: the teacher's)."""
    pairs = choose_layer_map(args.relation_layer_map, num_layers(student), num_layers(teacher), copied_layers(args),
                             flag="--relation_layer_map")
    return RelationDistillation(pairs, student, teacher, args.relation_heads)


EXTRA_TERMS = (
    Term("hidden", "alpha_hidden", "hidden_states", hidden_term, {"hidden_layer_map": None, "hidden_loss": "mse"},
         layer_map_check("--hidden_layer_map")),
    Term("attention", "alpha_attention", "attentions", attention_term, {"attention_layer_map": None},
         layer_map_check(ATTENTION_FLAG)),
    Term("relation", "alpha_relation", "captured", relation_term,
         {"relation_layer_map": None, "relation_heads": None}, check_relation_heads),
)


# ----------------------------------------------------------------------------- rules read from the flags

def terms_on(args) -> list[Term]:
    """The extra terms whose weight is > 0 (in distill mode they are part of the loss)."""
    return [term for term in EXTRA_TERMS if getattr(args, term.weight_flag, 0)]


def term_flags() -> dict:
    """Every extra term's flags -> their defaults: what the recipe's logits-only rows reset."""
    return {flag: default for term in EXTRA_TERMS for flag, default in term.flags.items()}


def check_terms(args) -> None:
    """Parse time: each term's own check (even when it is off), then one warning per term whose
    settings were given while its weight is 0 (the recipe's rows choose their own weights)."""
    for term in EXTRA_TERMS:
        if term.check is not None:
            term.check(args)
        given = [f"--{flag}" for flag, default in term.settings.items() if getattr(args, flag, default) != default]
        if given and not getattr(args, term.weight_flag, 0) and args.command != "recipe":
            logging.getLogger("kdqa").warning(
                "%s %s no effect: the %s term is off at --%s 0 (give --%s W > 0 to use it)", " and ".join(given),
                "have" if len(given) > 1 else "has", term.name, term.weight_flag, term.weight_flag)


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

class SpanTerm(torch.nn.Module):
    """alpha_ce * CE(gold start/end) + alpha_kd * T^2 * KL(teacher || student), settings bound once."""

    def __init__(self, temperature: float, alpha_ce: float, alpha_kd: float, impl: str):
        super().__init__()
        self.temperature, self.alpha_ce, self.alpha_kd, self.impl = temperature, alpha_ce, alpha_kd, impl

    def forward(self, student_out: QAOutputs, teacher_out: QAOutputs, batch: dict):
        return qa_distillation_loss(student_out.start, student_out.end, batch["start_positions"],
                                    batch["end_positions"], teacher_out.start, teacher_out.end,
                                    mask=batch["attention_mask"].bool(), temperature=self.temperature,
                                    alpha_ce=self.alpha_ce, alpha_kd=self.alpha_kd, impl=self.impl)

    def describe(self) -> list[dict]:
        return [{"name": "ce", "weight": float(self.alpha_ce), "what": "cross-entropy of the gold start/end positions"},
                {"name": "kd", "weight": float(self.alpha_kd),
                 "what": "KL(teacher ‖ student) of the temperature-softened start/end distributions",
                 "temperature": float(self.temperature), "t_squared": True}]


class Objective(torch.nn.Module):
    """The run's loss: the span term and the extra terms with their weights and modules (whose
    trainable parts, under `loss_modules`, train and are checkpointed with the student), and the
    forward hooks of terms that read the models' insides (registered once, on build)."""

    def __init__(self, span: SpanTerm, extra: list[tuple[Term, float, torch.nn.Module]]):
        super().__init__()
        self.span = span
        self.terms = [term for term, _, _ in extra]
        self.loss_modules = torch.nn.ModuleDict({term.name: module for term, _, module in extra})
        self.weights = {"ce": span.alpha_ce, "kd": span.alpha_kd, **{term.name: weight for term, weight, _ in extra}}
        self.student_capture: Capture | None = None
        self.teacher_capture: Capture | None = None

    @property
    def needs(self) -> frozenset[str]:
        """What forward_qa must return, of the student and of the teacher (beyond the hooks' records)."""
        return frozenset().union(*(term.needs for term in self.terms)) - {"captured"}

    def attach(self, student: torch.nn.Module, teacher: torch.nn.Module | None) -> Objective:
        """Register the hooks the terms' modules declared (`student_taps` / `teacher_taps`) on the models."""
        modules = list(self.loss_modules.values())
        student_taps = [tap for module in modules for tap in getattr(module, "student_taps", ())]
        teacher_taps = [tap for module in modules for tap in getattr(module, "teacher_taps", ())]
        self.student_capture = Capture(student, student_taps) if student_taps else None
        self.teacher_capture = Capture(teacher, teacher_taps) if teacher_taps else None
        return self

    def has_trainable_parts(self) -> bool:
        return any(True for _ in self.loss_modules.parameters())

    def forward(self, student_out: QAOutputs, teacher_out: QAOutputs, batch: dict) -> tuple[torch.Tensor, dict]:
        """(the weighted total, {name: unweighted term}): the span term, then each extra term."""
        span = self.span(student_out, teacher_out, batch)
        total, parts = span.loss, {"ce": span.ce, "kd": span.kd}
        for term in self.terms:
            parts[term.name] = self.loss_modules[term.name](getattr(student_out, term.reads),
                                                            getattr(teacher_out, term.reads), batch["attention_mask"])
            total = total + self.weights[term.name] * parts[term.name]
        return total, parts

    def describe(self, loss_impl_ran: str | None = None) -> dict:
        """Every term with its weight and settings (weight 0: off, listed to show it), the formula and
        the loss implementation that ran (the fused Triton kernel or the PyTorch reference)."""
        terms = self.span.describe() + [{"name": term.name, "weight": float(self.weights[term.name]),
                                         **self.loss_modules[term.name].describe()} for term in self.terms]
        formula = " + ".join(f"{t['weight']:g}·" + {"kd": "T²·KL", "ce": "CE"}.get(t["name"], t["name"])
                             for t in terms if t["weight"])
        ran = loss_impl_ran or self.span.impl
        return {"terms": terms, "formula": formula,
                "loss_impl": ran if self.span.impl in (None, ran) else f"{ran} (--loss_impl {self.span.impl})",
                "eager_attention": "attentions" in self.needs}


def build(args, student: torch.nn.Module, teacher: torch.nn.Module | None) -> Objective:
    """The objective of a run, from its flags, once: fine-tuning is CE alone; distillation the span
    term with its alphas and temperature and every extra term whose weight is > 0."""
    if args.mode != "distill":
        return Objective(SpanTerm(args.temperature, 1.0, 0.0, args.loss_impl), [])
    extra = [(term, getattr(args, term.weight_flag), term.build(args, student, teacher)) for term in terms_on(args)]
    span = SpanTerm(args.temperature, args.alpha_ce, args.alpha_kd, args.loss_impl)
    return Objective(span, extra).attach(student, teacher)


def plan_lines(description: dict) -> list[str]:
    """The log's lines of the extra terms (Objective.describe()), and of the attention kernel they imposed."""
    lines = []
    for term in description["terms"]:
        if term["name"] in ("ce", "kd") or not term["weight"]:
            continue
        settings = "; ".join(f"{key.replace('_', ' ')}: " + ({True: "yes", False: "no"}.get(value, value)
                                                                if isinstance(value, bool) else f"{value}")
                             for key, value in term.items() if key not in ("name", "weight", "what"))
        lines.append(f"{term['name']} term: {term['weight']:g} x {term['what']}" + (f" ({settings})" if settings else ""))
    if description.get("eager_attention"):
        lines.append("student and teacher run eager attention (not SDPA, which returns no attention "
                     "probabilities): each step costs more")
    return lines
