"""MiniLMv2's self-attention relation distillation (Wang et al. 2021), through the model adapter.

Attention transfer (kdqa.objective.AttentionDistillation) compares attention probabilities head by
head, so it needs the teacher's head count. MiniLMv2 compares *relations* instead: for each mapped
layer pair (s, t) and each of the attention's queries, keys and values (its Q/K/V projection
outputs, [B, L, width], recorded by kdqa.model_adapter's hooks), split into R relation heads of
width / R features each,

    rel(X)_r = softmax over real keys of  X_r X_r^T / sqrt(width / R)            [B, R, L, L]
    relation = mean over pairs and over Q-Q, K-K, V-V of
               KL(rel_teacher || rel_student) per query row, summed over real keys,
               averaged over relation heads and real queries (padding excluded on both axes).

R need not equal either model's head count: it must divide both widths (default: the teacher's
head count), so a student narrower than its teacher, or with other heads, learns the same
relations. The three relations are averaged (MiniLMv2 sums them) so the term's scale matches the
attention term's; its weight is --alpha_relation. Layers count from 1 as in the other layer maps.
"""

from __future__ import annotations

import math

import torch

from kdqa.hidden_distill import format_layer_map, parse_layer_map
from kdqa.model_adapter import ModelAdapter, taps

RELATIONS = ("query", "key", "value")
FLAG = "--relation_layer_map"


def relation_log_probs(x: torch.Tensor, heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, width] -> [B, R, L, L] log-softmax over keys of the scaled self-dot-products of R
    relation heads (fp32); padding keys get the smallest finite score, so exp() gives them 0."""
    batch, length, width = x.shape
    x = x.float().view(batch, length, heads, width // heads).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(width // heads)
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor,
                heads: int) -> torch.Tensor:
    """KL(teacher relation || student relation) of one [B, L, width] pair, over real keys and queries."""
    keys = attention_mask.bool()
    log_s = relation_log_probs(student, heads, keys)
    log_t = relation_log_probs(teacher, heads, keys)
    per_query = (log_t.exp() * (log_t - log_s) * keys[:, None, None, :]).sum(-1)  # [B, R, L]
    queries = keys[:, None, :].to(per_query.dtype).expand_as(per_query)
    return (per_query * queries).sum() / queries.sum().clamp_min(1.0)


def check_relation_heads(args) -> None:
    """Parse time: the weight, --relation_heads and --relation_layer_map as far as they go before the models load."""
    if getattr(args, "alpha_relation", 0) < 0:
        raise ValueError(f"--alpha_relation must be >= 0 (0: off), got {args.alpha_relation:g}")
    heads = getattr(args, "relation_heads", None)
    if heads is not None and heads < 1:
        raise ValueError(f"--relation_heads must be at least 1, got {heads}")
    if getattr(args, "relation_layer_map", None) is not None:
        parse_layer_map(args.relation_layer_map, 10**6, 10**6, flag=FLAG)


def projection_width(adapter: ModelAdapter, layer: int) -> int:
    return adapter.projection(layer, "query").out_features


class RelationDistillation(torch.nn.Module):
    """The relation term (no trainable parts): declares the Q/K/V taps of its mapped layers, which
    kdqa.objective registers on student and teacher and hands back as forward_qa's `captured`."""

    def __init__(self, layer_map: list[tuple[int, int]], student: torch.nn.Module, teacher: torch.nn.Module,
                 relation_heads: int | None = None):
        super().__init__()
        if any(s < 1 or t < 1 for s, t in layer_map):
            raise ValueError(f"{FLAG} {format_layer_map(layer_map)!r}: layer 0 is the embedding output, which "
                             "has no queries, keys or values; map encoder layers (1 and up)")
        student_adapter, teacher_adapter = ModelAdapter(student), ModelAdapter(teacher)
        self.relation_heads = relation_heads or teacher_adapter.num_heads
        widths = {projection_width(student_adapter, s - 1) for s, _ in layer_map} | \
                 {projection_width(teacher_adapter, t - 1) for _, t in layer_map}
        if any(width % self.relation_heads for width in widths):
            raise ValueError(f"--relation_heads {self.relation_heads} must divide the query/key/value widths of "
                             f"student and teacher ({', '.join(map(str, sorted(widths)))}): give --relation_heads "
                             "N that divides them all")
        self.layer_map = list(layer_map)
        self.student_taps = taps(RELATIONS, [s - 1 for s, _ in layer_map])
        self.teacher_taps = taps(RELATIONS, [t - 1 for _, t in layer_map])

    def forward(self, student_captured: dict, teacher_captured: dict, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([relation_kl(student_captured[(what, s - 1)], teacher_captured[(what, t - 1)].detach(),
                                        attention_mask, self.relation_heads)
                            for s, t in self.layer_map for what in RELATIONS]).mean()

    def describe(self) -> dict:
        return {"what": "KL(teacher ‖ student) of the query-query, key-key and value-value relations (MiniLMv2)",
                "relation_heads": self.relation_heads, "layer_map (student:teacher)": format_layer_map(self.layer_map)}
