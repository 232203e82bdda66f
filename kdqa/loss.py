"""The QA distillation loss: Hugging Face's span loss plus DistilBERT's soft-target term.

``qa_distillation_loss`` is what the trainer calls; it validates its arguments (before any kernel
launch, so mistakes fail with a message naming the argument) and dispatches to the fused Triton
kernel (``kernels/qa_distill.py``) or to ``qa_distillation_loss_reference``, the plain-PyTorch
definition the kernel is tested against.

Mathematics, for start and end logits alike (B rows of L columns):

* ``ce = (CE(start) + CE(end)) / 2`` on untempered logits, each the mean over the rows that are
  not ignored.  A position ``>= L`` is ignored as in ``BertForQuestionAnswering`` (which clamps to
  ``[0, L]`` and ignores ``L``); a negative position (PyTorch's ``-100``) is ignored too, where
  Hugging Face would clamp it to 0.  With every row ignored, CE is 0, not NaN.
* ``kd = T^2 (KL(start) + KL(end)) / 2``, ``KL = sum_rows sum_j p_j (log p_j - log q_j) / B``
  (``batchmean``) with ``p = softmax(teacher/T)``, ``q = softmax(student/T)`` and ``0 log 0 = 0``.
  Without teacher logits ``kd`` is a zero tensor and only CE is computed.
* ``loss = alpha_ce * ce + alpha_kd * kd``.
* ``ce_rows`` [B] bool (transfer data, issue 32): False rows take no part in CE (as if their gold
  positions were ignored) and keep their KD.  CE is then the mean over the rows whose flag is True
  and whose label counts (the rules above), and ``QALoss.ce`` reports exactly that mean, the term
  that ``alpha_ce`` weighs; with no such row CE is 0 and gives no gradient.  KD stays over all B
  rows, ``/ B`` included.  ``ce_rows=None`` is today's loss bit for bit.
* ``mask`` [B, L] bool: False columns take part in neither softmax of either model.  A row whose
  gold position is masked is ignored for CE; a fully masked row contributes 0 to CE and KL (and
  gets a zero gradient) but still counts in KL's ``/ B``.  ``mask=None`` is exactly the unmasked
  Hugging Face loss.

NaN or inf in a logit that takes part in the loss shows in the loss; masked columns, ignored rows
(for CE) and teacher probabilities of exactly 0 never produce NaN.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from kdqa.choices import LOSS_IMPLS

__all__ = ["QALoss", "qa_distillation_loss", "qa_distillation_loss_reference",
           "triton_available", "interpreter_enabled"]

IMPLS = LOSS_IMPLS  # the --loss_impl choices, written once (kdqa.choices)
#: Largest accepted temperature: the KD term agrees with float64 up to here (the parity suites
#: check it), and T^2 and the series form's (logit difference / T)^2 stay far inside float32.
MAX_TEMPERATURE = 1e6


class QALoss(NamedTuple):
    """``loss`` is differentiable w.r.t. the student logits; ``ce`` and ``kd`` are detached logs
    (``ce`` the mean over the rows that CE applies to, see ``ce_rows``)."""

    loss: Tensor
    ce: Tensor
    kd: Tensor


def triton_available() -> bool:
    """True when the triton package can be imported (it is absent on macOS/Windows installs)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks for Triton kernels to run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _fused_kernel():
    """The fused kernel's autograd entry point, imported on first use.

    Lazy on purpose: it keeps triton off the import path of ``import kdqa.loss`` (and so of
    ``train.py --help``), and triton decides between compiling and interpreting when the kernel
    module is imported, so TRITON_INTERPRET must be set by then.
    """
    try:
        from kdqa.kernels.qa_distill import qa_distill
    except ModuleNotFoundError as exc:
        if exc.name != "triton" and not (exc.name or "").startswith("triton."):
            raise
        raise ImportError("impl='triton' needs the triton package (pip install triton, Linux only); "
                          "use impl='torch' for the PyTorch reference") from exc
    return qa_distill


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_logits(name: str, x, shape=None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if shape is None:
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape [batch, seq_len], got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} must have a non-empty batch and seq_len, got {tuple(x.shape)}")
    elif tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} "
                         "(the shape of student_start_logits)")


def _check_positions(name: str, x, B: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of gold indices, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if x.dim() == 2 and x.shape[1] == 1:  # [B, 1], as some collators produce; HF squeezes it too
        x = x[:, 0]
    if tuple(x.shape) != (B,):
        raise ValueError(f"{name} must have shape [{B}] (one index per row), got {tuple(x.shape)}")
    return x


def _check_ce_rows(ce_rows, B: int) -> None:
    """``ce_rows``: None, or one bool flag per row (True where the row has a gold answer)."""
    if ce_rows is None:
        return
    if not isinstance(ce_rows, Tensor):
        raise TypeError(f"ce_rows must be a bool torch.Tensor of shape [{B}] or None, got "
                        f"{type(ce_rows).__name__}")
    if ce_rows.dtype != torch.bool:
        raise TypeError(f"ce_rows must have dtype torch.bool (True where the row has a gold "
                        f"answer), got {ce_rows.dtype}")
    if tuple(ce_rows.shape) != (B,):
        raise ValueError(f"ce_rows must have shape [{B}] (one flag per row), got "
                         f"{tuple(ce_rows.shape)}")


def _validate(student_start_logits, student_end_logits, start_positions, end_positions,
              teacher_start_logits, teacher_end_logits, temperature, alpha_ce, alpha_kd, mask,
              ce_rows=None):
    """Check every argument and return the positions squeezed to [B]; raises before any launch."""
    _check_logits("student_start_logits", student_start_logits)
    shape = tuple(student_start_logits.shape)
    _check_logits("student_end_logits", student_end_logits, shape)
    if student_end_logits.dtype != student_start_logits.dtype:
        raise TypeError("student_start_logits and student_end_logits must share a dtype, got "
                        f"{student_start_logits.dtype} and {student_end_logits.dtype}")
    B, L = shape
    start_positions = _check_positions("start_positions", start_positions, B)
    end_positions = _check_positions("end_positions", end_positions, B)
    if (teacher_start_logits is None) != (teacher_end_logits is None):
        raise ValueError("give both teacher_start_logits and teacher_end_logits, or neither")
    if teacher_start_logits is not None:
        _check_logits("teacher_start_logits", teacher_start_logits, shape)
        _check_logits("teacher_end_logits", teacher_end_logits, shape)
        if teacher_end_logits.dtype != teacher_start_logits.dtype:
            raise TypeError("teacher_start_logits and teacher_end_logits must share a dtype, got "
                            f"{teacher_start_logits.dtype} and {teacher_end_logits.dtype}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {shape} "
                             "(the shape of student_start_logits)")
    _check_ce_rows(ce_rows, B)
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite Python number > 0, got {temperature!r}")
    if temperature > MAX_TEMPERATURE:
        raise ValueError(f"temperature must be at most {MAX_TEMPERATURE:g} (the KD term is exact "
                         f"up to there), got {temperature!r}")
    for name, a in (("alpha_ce", alpha_ce), ("alpha_kd", alpha_kd)):
        if not _is_number(a) or not math.isfinite(a) or a < 0:
            raise ValueError(f"{name} must be a finite Python number >= 0, got {a!r}")
    device = student_start_logits.device
    named = [("student_end_logits", student_end_logits), ("start_positions", start_positions),
             ("end_positions", end_positions), ("teacher_start_logits", teacher_start_logits),
             ("teacher_end_logits", teacher_end_logits), ("mask", mask), ("ce_rows", ce_rows)]
    for name, x in named:
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but student_start_logits is on {device}; "
                             "all tensors must be on one device")
    return start_positions, end_positions


def _choose_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if triton_available() and (device.type == "cuda" or
                                   (device.type == "cpu" and interpreter_enabled())):
            return "triton"
        return "torch"
    if impl == "triton":
        if device.type == "cuda":
            if not triton_available():
                raise ImportError("impl='triton' needs the triton package; use impl='torch'")
            return "triton"
        if device.type == "cpu" and interpreter_enabled():
            if not triton_available():
                raise ImportError("impl='triton' needs the triton package; use impl='torch'")
            return "triton"
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 set before "
            "the kernel is first used, to run it on the CPU; use impl='torch' otherwise")
    return "torch"


def resolve_loss_impl(impl: str, device: torch.device) -> str:
    """Which implementation `impl` runs on `device` ("triton" or "torch"), as the loss will choose it."""
    return _choose_impl(impl, device)


def qa_distillation_loss(student_start_logits: Tensor, student_end_logits: Tensor,
                         start_positions: Tensor, end_positions: Tensor,
                         teacher_start_logits: Optional[Tensor] = None,
                         teacher_end_logits: Optional[Tensor] = None, *,
                         temperature: float = 2.0, alpha_ce: float = 0.5, alpha_kd: float = 0.5,
                         mask: Optional[Tensor] = None, ce_rows: Optional[Tensor] = None,
                         impl: str = "auto") -> QALoss:
    """The distillation loss of the module docstring; ``impl`` picks the Triton kernel or the
    PyTorch reference ("auto": Triton on CUDA tensors, and on the CPU under TRITON_INTERPRET=1,
    which must be set before the kernel is first used: it runs the kernel in Triton's
    interpreter, exact but slow; "triton" on a CPU tensor without it is an error).  The kernel
    is one device launch forward and one backward, with or without ``ce_rows`` (read in place).

    ``ce_rows`` [B] bool: CE only on the True rows (windows with a gold answer), KD on all.
    Returns float32 scalars on the logits' device (float64 from the reference for float64
    logits).  Teacher logits never receive a gradient.  Nothing here synchronises with the host.
    """
    start_positions, end_positions = _validate(
        student_start_logits, student_end_logits, start_positions, end_positions,
        teacher_start_logits, teacher_end_logits, temperature, alpha_ce, alpha_kd, mask, ce_rows)
    chosen = _choose_impl(impl, student_start_logits.device)
    if chosen == "torch":
        return _reference(student_start_logits, student_end_logits, start_positions, end_positions,
                          teacher_start_logits, teacher_end_logits, temperature, alpha_ce,
                          alpha_kd, mask, ce_rows)
    loss, ce, kd = _fused_kernel()(
        student_start_logits, student_end_logits, start_positions, end_positions,
        teacher_start_logits, teacher_end_logits, mask, float(temperature), float(alpha_ce),
        float(alpha_kd), ce_rows=ce_rows)
    return QALoss(loss, ce, kd)


def qa_distillation_loss_reference(student_start_logits: Tensor, student_end_logits: Tensor,
                                   start_positions: Tensor, end_positions: Tensor,
                                   teacher_start_logits: Optional[Tensor] = None,
                                   teacher_end_logits: Optional[Tensor] = None, *,
                                   temperature: float = 2.0, alpha_ce: float = 0.5,
                                   alpha_kd: float = 0.5, mask: Optional[Tensor] = None,
                                   ce_rows: Optional[Tensor] = None) -> QALoss:
    """Plain-PyTorch definition of the loss (autograd for the gradient), the kernel's oracle.

    Computes in float32 (float64 when the student logits are float64, for gradcheck).
    ``ce_rows`` as in ``qa_distillation_loss``: a False row is an ignored row for CE only.
    """
    start_positions, end_positions = _validate(
        student_start_logits, student_end_logits, start_positions, end_positions,
        teacher_start_logits, teacher_end_logits, temperature, alpha_ce, alpha_kd, mask, ce_rows)
    return _reference(student_start_logits, student_end_logits, start_positions, end_positions,
                      teacher_start_logits, teacher_end_logits, temperature, alpha_ce, alpha_kd,
                      mask, ce_rows)


def _masked(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Masked columns to -inf; a fully masked row to zeros instead, so that its (discarded)
    softmax stays finite and cannot send NaN into the gradient."""
    if mask is None:
        return x
    fill = torch.where(mask.any(dim=1, keepdim=True),
                       torch.tensor(float("-inf"), dtype=x.dtype, device=x.device),
                       torch.tensor(0.0, dtype=x.dtype, device=x.device))
    return torch.where(mask, x, fill)


#: Centred log-ratios below this size take the series form of KL (``_small_kl_rows``).
SERIES_MAX = 0.5
#: 1/k! for k = 2..9: ``exp(x) - 1 - x`` for |x| < SERIES_MAX to float64 precision's needs.
_INV_FACT = tuple(1.0 / math.factorial(k) for k in range(2, 10))


def _exp_minus_1_minus_x(x: Tensor) -> Tensor:
    """``exp(x) - 1 - x`` without cancellation for small |x| (Horner form of its series)."""
    acc = torch.full_like(x, _INV_FACT[-1])
    for c in reversed(_INV_FACT[:-1]):
        acc = acc * x + c
    return acc * x * x


def _small_kl_rows(s: Tensor, t: Tensor, log_q: Tensor, T: float,
                   mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(per-row KL in series form, rows where it applies): exact where teacher and student
    differ little on the scale of T.

    ``sum p (log p - log q)`` is a difference of two terms of size ``log L`` whose result is of
    size ``(logit difference / T)^2``: at T = 1e3 float32 loses it (5 % off), at 1e4 it goes
    negative.  With ``d = ((t - max t) - (s - max s)) / T`` centred by its mean under q
    (``d' = d - c``, ``delta = E_q[d']`` ~ 0), ``KL = E_p[d'] - log E_q[exp(d')]`` becomes
    ``(delta + S1) / (1 + delta + S2) - log1p(delta + S2)`` with ``S1 = E_q[d' expm1(d')]`` and
    ``S2 = E_q[expm1(d') - d']``, sums of non-negative terms.  Rows where some valid ``|d'|``
    reaches SERIES_MAX (or is not finite) keep the direct sum: their KL is not small.
    """
    valid = torch.ones_like(s, dtype=torch.bool) if mask is None else mask
    q = log_q.exp()
    m_s = torch.where(valid, s, float("-inf")).amax(dim=1, keepdim=True)
    m_t = torch.where(valid, t, float("-inf")).amax(dim=1, keepdim=True)
    d = torch.where(valid, ((t - m_t) - (s - m_s)) / T, torch.zeros_like(s))
    c = torch.where(valid, q * d, torch.zeros_like(d)).sum(dim=1, keepdim=True)
    dp = torch.where(valid, d - c, torch.zeros_like(d))
    small = (dp.abs() < SERIES_MAX) | ~valid
    dp = torch.where(small, dp, torch.zeros_like(dp))
    g = _exp_minus_1_minus_x(dp)
    qv = torch.where(valid, q, torch.zeros_like(q))
    delta = (qv * dp).sum(dim=1)
    s1 = (qv * dp * (dp + g)).sum(dim=1)
    s2 = (qv * g).sum(dim=1)
    series = (delta + s1) / (1 + delta + s2) - torch.log1p(delta + s2)
    return series, small.all(dim=1)


def _reference(s_start, s_end, p_start, p_end, t_start, t_end, temperature, alpha_ce, alpha_kd,
               mask, ce_rows=None) -> QALoss:
    cd = torch.float64 if s_start.dtype == torch.float64 else torch.float32
    B, L = s_start.shape
    T = float(temperature)
    ce_total = 0.0
    kl_total = 0.0
    sides = ((s_start, p_start, t_start), (s_end, p_end, t_end))
    for s, pos, t in sides:
        s = _masked(s.to(cd), mask)
        pos = pos.to(torch.int64)
        keep = (pos >= 0) & (pos < L)
        idx = pos.clamp(0, L - 1)
        if mask is not None:
            keep = keep & mask.gather(1, idx[:, None])[:, 0]
        if ce_rows is not None:  # (None: today's ops exactly)
            keep = keep & ce_rows
        nll = -torch.log_softmax(s, dim=1).gather(1, idx[:, None])[:, 0]
        count = keep.sum()
        # where, not multiply: an ignored row's NaN must not leak into the mean.
        ce_total = ce_total + torch.where(keep, nll, torch.zeros_like(nll)).sum() / count.clamp(min=1)
        if t is not None:
            log_q = torch.log_softmax(s / T, dim=1)
            log_p = torch.log_softmax(_masked(t.detach().to(cd), mask) / T, dim=1)
            p = log_p.exp()
            take = p > 0
            if mask is not None:
                take = take & mask
            kl = torch.where(take, p * (log_p - log_q), torch.zeros_like(log_q))
            series, small = _small_kl_rows(s, _masked(t.detach().to(cd), mask), log_q, T, mask)
            # Rows of small KL take the series; the others' sum is today's, bit for bit.
            kl = torch.where(small[:, None], torch.zeros_like(kl), kl).sum()
            kl_total = kl_total + (kl + torch.where(small, series, torch.zeros_like(series)).sum()) / B
    ce = ce_total / 2
    if t_start is not None:
        kd = kl_total * (T * T / 2)
    else:
        kd = torch.zeros((), dtype=cd, device=s_start.device)
    loss = alpha_ce * ce + alpha_kd * kd
    return QALoss(loss, ce.detach(), kd.detach())
