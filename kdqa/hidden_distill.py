"""Hidden-state distillation: the student's intermediate layers learn the teacher's.

Logit distillation (`kdqa/loss.py`) only tells the student what the teacher answered; matching
hidden states layer by layer (TinyBERT's MSE, DistilBERT's cosine loss) also tells it how the
teacher got there. The term is added to the loss as `alpha_hidden * hidden`:

    hidden = mean over mapped pairs (s, t) of  D(proj_s(H_student[s]), H_teacher[t])

where H[0] is the embedding output and H[i] the output of encoder layer i (transformers'
`output_hidden_states` numbering), and D averages over real tokens only (the attention mask):

    mse:    sum_tokens mean_d (h_s - h_t)^2          / n_tokens
    cosine: sum_tokens (1 - cos(h_s, h_t))            / n_tokens

so its scale depends neither on the batch size nor on the padded length. `proj_s` is a learned
linear map where the hidden sizes differ (a 384-wide student learning from a 768-wide teacher) and
the identity where they agree; it trains with the student and is never saved into its folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HIDDEN_LOSSES = ("mse", "cosine")


def parse_student_layers(spec: str) -> list[int]:
    """'0,2,4' -> [0, 2, 4]: the one reader of --student_layers (kdqa.validation checks it at parse time,
    the trainer builds the student and the layer maps default from it): comma-separated, distinct,
    non-negative layer numbers."""
    parts = [part.strip() for part in str(spec).split(",")]
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"--student_layers {spec!r}: give comma-separated layer numbers like 0,2,4")
    layers = [int(part) for part in parts]
    if len(set(layers)) != len(layers):
        raise ValueError(f"--student_layers {spec!r} names a layer twice")
    return layers


def parse_layer_map(spec: str, student_num_layers: int, teacher_num_layers: int,
                    flag: str = "--hidden_layer_map") -> list[tuple[int, int]]:
    """'1:2,2:4,3:6' -> [(1, 2), (2, 4), (3, 6)]: student layer -> teacher layer, 0 = embeddings;
    errors name `flag`, the option the map came from."""
    pairs = []
    for part in str(spec).split(","):
        if not part.strip():
            continue
        try:
            s, t = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(
                f"{flag} {spec!r}: each entry must be STUDENT:TEACHER layer numbers like 1:2 "
                "(0 is the embedding output)") from None
        pairs.append((s, t))
    if not pairs:
        raise ValueError(f"{flag} {spec!r} names no layer pair; give e.g. 1:2,2:4,3:6")
    for s, t in pairs:
        if not 0 <= s <= student_num_layers:
            raise ValueError(f"{flag} {spec!r}: the student has layers 0..{student_num_layers} "
                             f"(0 = embeddings), not {s}")
        if not 0 <= t <= teacher_num_layers:
            raise ValueError(f"{flag} {spec!r}: the teacher has layers 0..{teacher_num_layers} "
                             f"(0 = embeddings), not {t}")
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise ValueError(f"{flag} {spec!r} maps a student layer twice")
    return pairs


def default_layer_map(student_num_layers: int, teacher_num_layers: int,
                      student_layers: list[int] | None = None) -> list[tuple[int, int]]:
    """Which teacher layer each student layer learns from when no --hidden_layer_map is given.

    A student built from teacher layers (--student_layers 0,2,4) learns from the layers it was copied
    from: student layer i+1 <- teacher layer student_layers[i]+1 (outputs, 1-based). Otherwise the
    map is uniform: student layer i <- teacher layer round(i * teacher/student).
    """
    if student_layers is not None:
        if len(student_layers) != student_num_layers:
            raise ValueError(f"--student_layers {student_layers} does not match the student's "
                             f"{student_num_layers} layers")
        return [(i + 1, layer + 1) for i, layer in enumerate(student_layers)]
    ratio = teacher_num_layers / student_num_layers
    return [(i, round(i * ratio)) for i in range(1, student_num_layers + 1)]


def format_layer_map(pairs: list[tuple[int, int]]) -> str:
    return ",".join(f"{s}:{t}" for s, t in pairs)


def choose_layer_map(spec: str | None, student_num_layers: int, teacher_num_layers: int,
                     copied: list[int] | None = None, flag: str = "--hidden_layer_map") -> list[tuple[int, int]]:
    """The map of a run: `spec` (a --*_layer_map) when given, else the teacher layers the student
    was copied from (`copied`, --student_layers, when they fit this teacher), else a uniform map."""
    if spec:
        return parse_layer_map(spec, student_num_layers, teacher_num_layers, flag=flag)
    if copied is not None and (len(copied) != student_num_layers or max(copied) >= teacher_num_layers):
        copied = None  # built from another model than this teacher's depth: uniform
    return default_layer_map(student_num_layers, teacher_num_layers, copied)


def masked_hidden_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                           kind: str) -> torch.Tensor:
    """Mean over real tokens of the per-token distance between [B, L, D] hidden states (at least fp32)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(dtype), teacher.to(dtype)
    if kind == "mse":
        per_token = (student - teacher).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"--hidden_loss must be one of {HIDDEN_LOSSES}, got {kind!r}")
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


class HiddenStateDistillation(torch.nn.Module):
    """The hidden-state term and its projections: a loss module that trains with the student."""

    def __init__(self, layer_map: list[tuple[int, int]], student_hidden_size: int, teacher_hidden_size: int,
                 kind: str = "mse"):
        super().__init__()
        if kind not in HIDDEN_LOSSES:
            raise ValueError(f"--hidden_loss must be one of {HIDDEN_LOSSES}, got {kind!r}")
        self.layer_map = list(layer_map)
        self.kind = kind
        if student_hidden_size == teacher_hidden_size:
            self.projections = None
        else:
            self.projections = torch.nn.ModuleList(
                torch.nn.Linear(student_hidden_size, teacher_hidden_size) for _ in self.layer_map)

    def forward(self, student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                attention_mask: torch.Tensor) -> torch.Tensor:
        terms = []
        for i, (s, t) in enumerate(self.layer_map):
            h_student = student_hidden[s]
            if self.projections is not None:
                h_student = self.projections[i](h_student)
            terms.append(masked_hidden_distance(h_student, teacher_hidden[t].detach(), attention_mask, self.kind))
        return torch.stack(terms).mean()

    def describe(self) -> dict:
        return {"what": "distance of the mapped student and teacher hidden states over real tokens",
                "loss": self.kind, "layer_map (student:teacher)": format_layer_map(self.layer_map),
                "learned_projection": self.projections is not None}
