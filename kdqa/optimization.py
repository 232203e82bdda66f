"""The optimizer and the learning-rate schedule of a training run: how long it is (`Schedule`),
AdamW with BERT's weight-decay groups, and the warm-up and decay of --lr_scheduler_type (the
factors of transformers' get_scheduler)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    """How long the run is: micro-batches per epoch, accumulation, optimizer steps, epochs."""
    batches_per_epoch: int
    accumulation: int
    total_steps: int
    num_epochs: int


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorm weights (as BERT was trained)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or id(param) in no_decay_ids else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optim = getattr(args, "optim", None)  # --optim; None: the fused kernel on CUDA only, as kdqa always did
    fused = optim == "adamw_torch_fused" if optim else next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, **({"fused": True} if fused else {}))


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then linear decay to 0 at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_steps_for(args, total_steps: int) -> int:
    """--warmup_steps N (a fraction below 1: of all steps, rounded up as transformers 5 does), else
    --warmup_ratio of all steps (rounded down, as kdqa always did)."""
    steps = getattr(args, "warmup_steps", 0) or 0
    if steps >= 1:
        return int(steps)
    if steps > 0:
        return math.ceil(steps * total_steps)
    return int(args.warmup_ratio * total_steps)


def lr_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """--lr_scheduler_type: linear (linear_schedule, unchanged), cosine (half a cosine to 0 after the
    warm-up), constant, constant_with_warmup; the factors of transformers' get_scheduler."""
    if kind == "linear":
        return linear_schedule(optimizer, warmup_steps, total_steps)
    if kind not in ("cosine", "constant", "constant_with_warmup"):
        raise ValueError(f"unknown --lr_scheduler_type {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind != "cosine":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plan_schedule(args, batches_per_epoch: int) -> Schedule:
    accum = args.gradient_accumulation_steps
    updates_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * updates_per_epoch)
    return Schedule(batches_per_epoch=batches_per_epoch, accumulation=accum, total_steps=total_steps,
                    num_epochs=math.ceil(total_steps / updates_per_epoch))
