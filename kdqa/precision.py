"""Numeric precision: which autocast dtype a run uses, and the autocast-or-nothing context.

One rule for every caller (the loop, evaluation, the teacher-logits cache, the benchmarks), so that
a benchmark measures the precision a training run would use and a cache key names the dtype the
teacher really ran in.
"""

from __future__ import annotations

import contextlib

import torch

PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: Test-only: let ``--precision fp16`` run on the CPU (float16 autocast and an enabled
#: ``GradScaler("cpu")``), so that tests drive the fp16 loop before it meets a GPU.  Users keep
#: the refusal: CPU float16 is slow and not what the flag is for.
CPU_FP16_FOR_TESTS = False


def resolve_precision(precision: str, device: torch.device | str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, or None for fp32; whether fp16's gradient scaler is on).

    auto: bf16 on a CUDA GPU that supports it, else fp16 with a gradient scaler; fp32 off CUDA.
    bf16 asked for explicitly is honoured on the CPU too (CPU autocast supports it); fp16 needs CUDA.
    """
    device = torch.device(device)
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision bf16: this GPU does not support bfloat16; use --precision fp16")
        return torch.bfloat16, False
    if precision != "fp16":
        raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if device.type != "cuda" and not CPU_FP16_FOR_TESTS:
        raise ValueError("--precision fp16 needs a CUDA GPU; on the CPU use --precision fp32 or bf16")
    return torch.float16, True


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast in `dtype` on the device's type, or no context at all for fp32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
