"""Fused QA distillation loss: the Triton kernel, its launcher and its autograd Function.

One launch covers the start and the end rows (grid ``(B, 2)``).  Each program reads one row of the
student (and, when given, the teacher) once for the statistics and once for the outputs, and
writes the row's CE and KL contributions plus the gradient of the *whole loss* with respect to its
student row.  Backward therefore only multiplies that stored gradient by ``grad_output``; nothing
in forward or backward synchronises with the host, so the loss can be captured in a CUDA graph.

Mathematics (see ``kdqa.loss`` for the user-facing contract), per row with valid positions V
(inside the row and, when a mask is given, where it is True):

* ``ce_row = logsumexp(s[V]) - s[y]``; rows whose label is negative, ``>= L`` or masked are
  ignored, and ``ce = sum(ce_row) / 2 / max(count, 1)`` separately for start and end rows.
* ``kl_row = sum_j p_j (log p_j - log q_j)`` with ``p = softmax(t[V]/T)``, ``q = softmax(s[V]/T)``
  and ``0 log 0 = 0``; ``kd = T^2 * sum(kl_row) / 2 / B``.
* ``d loss / d s_j = alpha_ce/(2 count) (softmax(s)_j - [j = y]) + alpha_kd T/(2B) (q_j - p_j)``.

Rows up to ``SINGLE_BLOCK_MAX`` columns are held in registers in one block; longer rows take two
passes over column blocks, the first an online (rescaled) max/sum for ``s``, ``s/T`` and ``t/T``
(``s/T`` shares the running max of ``s``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Rows up to this many columns are handled by one block held in registers.
SINGLE_BLOCK_MAX = 8192
#: Column block of the two-pass path for longer rows.
LOOP_BLOCK = 4096
#: Column offsets switch to int64 when a row's furthest element lies this far from the base
#: (row bases are always int64); module-level so that a test can force the int64 path.
OFF64_LIMIT = 2**31 - 1


@triton.jit
def _row_outputs(s, tt, valid, cols, y, m_s, z_s, z_q, m_t, z_p, temperature,
                 ce_grad_scale, kd_grad_scale, HAS_TEACHER: tl.constexpr):
    """Gradient and KL contribution of one block of a row, given the row's final statistics.

    ``s`` and ``tt`` are the untempered student and teacher blocks (-inf where not valid).
    Log-probabilities are formed as ``(x - max)/T - log(sum)`` for both models alike: logits of
    1e4 keep full float32 precision, and a teacher equal to the student gives exactly KL = 0.
    """
    e_s = tl.exp(s - m_s)
    r = e_s / z_s
    onehot = tl.where(cols == y, 1.0, 0.0)
    grad = ce_grad_scale * (r - onehot)
    kl = tl.zeros_like(r)
    if HAS_TEACHER:
        shifted_q = (s - m_s) / temperature
        q = tl.exp(shifted_q) / z_q
        log_q = shifted_q - tl.log(z_q)
        shifted_p = (tt - m_t) / temperature
        e_p = tl.exp(shifted_p)
        p = e_p / z_p
        log_p = shifted_p - tl.log(z_p)
        # 0 * log 0 = 0: a teacher probability of exactly 0 (masked or -inf) contributes nothing.
        kl = tl.where(valid & (e_p > 0.0), p * (log_p - log_q), 0.0)
        grad = grad + kd_grad_scale * (q - p)
    grad = tl.where(valid, grad, 0.0)
    return grad, kl


@triton.jit
def _qa_distill_fwd_kernel(
    S0, S1, T0, T1, MASK, LABELS, COUNTS, GRAD, ROW_CE, ROW_KD,
    s0_sb, s0_sl, s1_sb, s1_sl, t0_sb, t0_sl, t1_sb, t1_sl, m_sb, m_sl,
    B, L, temperature, alpha_ce, kd_row_scale, kd_grad_scale,
    HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr, STORE_GRAD: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK: tl.constexpr, OFF64: tl.constexpr,
    S_COL1: tl.constexpr, T_COL1: tl.constexpr,
):
    b = tl.program_id(0)
    which = tl.program_id(1)  # 0: start rows, 1: end rows
    b64 = b.to(tl.int64)
    row = which.to(tl.int64) * B + b64

    # Pick this row's tensors.  Column strides are selected arithmetically (a stride specialised
    # to the constant 1 in one tensor only would give if-branches different types); when both are
    # 1 the launcher says so with a constexpr, which keeps loads vectorisable in the usual case.
    is_end = which.to(tl.int64)
    if S_COL1:
        s_sl = 1
    else:
        s_sl = s0_sl + (s1_sl - s0_sl) * is_end
    if which == 0:
        s_base = S0 + b64 * s0_sb
    else:
        s_base = S1 + b64 * s1_sb
    if HAS_TEACHER:
        if T_COL1:
            t_sl = 1
        else:
            t_sl = t0_sl + (t1_sl - t0_sl) * is_end
        if which == 0:
            t_base = T0 + b64 * t0_sb
        else:
            t_base = T1 + b64 * t1_sb
    m_base = MASK + b64 * m_sb

    y = tl.load(LABELS + row)  # -1 where the row is ignored (decided on the device by the launcher)
    label_ok = y >= 0
    count = tl.load(COUNTS + which).to(tl.float32)
    ce_grad_scale = tl.where(label_ok, alpha_ce * 0.5 / tl.maximum(count, 1.0), 0.0)
    y_safe = tl.where(label_ok, y, 0)
    s_y = tl.load(s_base + y_safe * s_sl).to(tl.float32)

    NEG_INF: tl.constexpr = float("-inf")
    g_base = GRAD + row * L

    if SINGLE:
        cols = tl.arange(0, BLOCK)
        if OFF64:
            cols = cols.to(tl.int64)
        valid = cols < L
        if HAS_MASK:
            valid = valid & (tl.load(m_base + cols * m_sl, mask=cols < L, other=0) != 0)
        s = tl.load(s_base + cols * s_sl, mask=valid, other=0.0).to(tl.float32)
        s = tl.where(valid, s, NEG_INF)
        m_s = tl.max(s, axis=0)
        m_s = tl.where(m_s == NEG_INF, 0.0, m_s)  # an all-masked row: keep exp() finite
        z_s = tl.sum(tl.exp(s - m_s), axis=0)
        z_q = 1.0
        m_t = 0.0
        z_p = 1.0
        tt = s
        if HAS_TEACHER:
            z_q = tl.sum(tl.exp((s - m_s) / temperature), axis=0)
            tt = tl.load(t_base + cols * t_sl, mask=valid, other=0.0).to(tl.float32)
            tt = tl.where(valid, tt, NEG_INF)
            m_t = tl.max(tt, axis=0)
            m_t = tl.where(m_t == NEG_INF, 0.0, m_t)
            z_p = tl.sum(tl.exp((tt - m_t) / temperature), axis=0)
        grad, kl = _row_outputs(s, tt, valid, cols, y, m_s, z_s, z_q, m_t, z_p, temperature,
                                ce_grad_scale, kd_grad_scale, HAS_TEACHER)
        if STORE_GRAD:
            tl.store(g_base + cols, grad, mask=cols < L)
        kl_row = tl.sum(kl, axis=0)
    else:
        # Pass 1: online max and rescaled sums of exp(s), exp(s/T) (sharing max(s)) and exp(t/T).
        m_s = NEG_INF
        z_s = 0.0
        z_q = 0.0
        m_t = NEG_INF
        z_p = 0.0
        for start in range(0, L, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            if OFF64:
                cols = cols.to(tl.int64)
            valid = cols < L
            if HAS_MASK:
                valid = valid & (tl.load(m_base + cols * m_sl, mask=cols < L, other=0) != 0)
            s = tl.load(s_base + cols * s_sl, mask=valid, other=0.0).to(tl.float32)
            s = tl.where(valid, s, NEG_INF)
            m_new = tl.maximum(m_s, tl.max(s, axis=0))
            m_new = tl.where(m_new == NEG_INF, 0.0, m_new)
            z_s = z_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            if HAS_TEACHER:
                z_q = z_q * tl.exp((m_s - m_new) / temperature) \
                    + tl.sum(tl.exp((s - m_new) / temperature), axis=0)
                tt = tl.load(t_base + cols * t_sl, mask=valid, other=0.0).to(tl.float32)
                tt = tl.where(valid, tt, NEG_INF)
                mt_new = tl.maximum(m_t, tl.max(tt, axis=0))
                mt_new = tl.where(mt_new == NEG_INF, 0.0, mt_new)
                z_p = z_p * tl.exp((m_t - mt_new) / temperature) \
                    + tl.sum(tl.exp((tt - mt_new) / temperature), axis=0)
                m_t = mt_new
            m_s = m_new
        if not HAS_TEACHER:
            z_q = 1.0
            z_p = 1.0
        # Pass 2: gradients and the KL sum with the final statistics.
        kl_row = 0.0
        for start in range(0, L, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            if OFF64:
                cols = cols.to(tl.int64)
            valid = cols < L
            if HAS_MASK:
                valid = valid & (tl.load(m_base + cols * m_sl, mask=cols < L, other=0) != 0)
            s = tl.load(s_base + cols * s_sl, mask=valid, other=0.0).to(tl.float32)
            s = tl.where(valid, s, NEG_INF)
            tt = s
            if HAS_TEACHER:
                tt = tl.load(t_base + cols * t_sl, mask=valid, other=0.0).to(tl.float32)
                tt = tl.where(valid, tt, NEG_INF)
            grad, kl = _row_outputs(s, tt, valid, cols, y, m_s, z_s, z_q, m_t, z_p, temperature,
                                    ce_grad_scale, kd_grad_scale, HAS_TEACHER)
            if STORE_GRAD:
                tl.store(g_base + cols, grad, mask=cols < L)
            kl_row += tl.sum(kl, axis=0)

    # (m_s - s_y) + log z_s rather than (m_s + log z_s) - s_y: no cancellation for large logits.
    ce_row = tl.where(label_ok, ((m_s - s_y) + tl.log(z_s)) * 0.5 / tl.maximum(count, 1.0), 0.0)
    tl.store(ROW_CE + row, ce_row)
    if HAS_TEACHER:
        tl.store(ROW_KD + row, kl_row * kd_row_scale)


def _num_warps(block: int) -> int:
    if block <= 1024:
        return 4
    if block <= 4096:
        return 8
    return 16


def labels_and_counts(start_positions, end_positions, L, mask=None):
    """Per-row gold index (-1 where ignored) as a [2, B] int64 tensor and the [2] count of kept rows.

    Computed with tensor ops on the positions' device, so no value ever travels to the host.  A
    row is ignored when its position is negative, ``>= L``, or (with a mask) on a masked column.
    """
    pos = torch.stack([start_positions.reshape(-1), end_positions.reshape(-1)]).to(torch.int64)
    keep = (pos >= 0) & (pos < L)
    if mask is not None:
        idx = pos.clamp(0, L - 1)
        keep = keep & torch.stack([mask.gather(1, idx[0, :, None])[:, 0],
                                   mask.gather(1, idx[1, :, None])[:, 0]])
    labels = torch.where(keep, pos, torch.full_like(pos, -1))
    return labels, keep.sum(dim=1, dtype=torch.int32)


def qa_distill_forward(s_start, s_end, start_positions, end_positions, t_start=None, t_end=None,
                       mask=None, temperature=2.0, alpha_ce=0.5, alpha_kd=0.5, store_grad=True,
                       block_size=None):
    """Launch the fused kernel once for all 2B rows.

    Inputs are assumed validated (``kdqa.loss`` does that).  Returns ``(loss, ce, kd, grad)`` where
    ``grad`` is the float32 ``[2, B, L]`` gradient of ``loss`` w.r.t. the student rows (or None when
    ``store_grad`` is False).  ``block_size`` forces a column block (a power of two); a block
    smaller than L selects the two-pass path, which the tests use to cover it at small L.
    """
    B, L = s_start.shape
    device = s_start.device
    has_teacher = t_start is not None
    labels, counts = labels_and_counts(start_positions, end_positions, L, mask)

    if block_size is None:
        single = L <= SINGLE_BLOCK_MAX
        block = triton.next_power_of_2(L) if single else LOOP_BLOCK
    else:
        block = int(block_size)
        if block <= 0 or block & (block - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        single = block >= L

    row_ce = torch.empty(2 * B, device=device, dtype=torch.float32)
    row_kd = torch.empty(2 * B, device=device, dtype=torch.float32) if has_teacher else row_ce
    grad = torch.empty((2, B, L), device=device, dtype=torch.float32) if store_grad else row_ce
    t0 = t_start if has_teacher else s_start
    t1 = t_end if has_teacher else s_end
    # A bool tensor is passed as its bytes (same storage, no copy); without a mask, any pointer.
    m = mask.view(torch.uint8) if mask is not None else labels

    tensors = [s_start, s_end, t0, t1] + ([mask] if mask is not None else [])
    max_off = max((L - 1 + block) * abs(x.stride(1)) + (B - 1) * abs(x.stride(0)) for x in tensors)
    off64 = max(max_off, 2 * B * L + block) >= OFF64_LIMIT

    T = float(temperature)
    kd_row_scale = T * T * 0.5 / B
    kd_grad_scale = float(alpha_kd) * T * 0.5 / B
    m_sb, m_sl = (m.stride(0), m.stride(1)) if mask is not None else (0, 0)

    def launch():
        _qa_distill_fwd_kernel[(B, 2)](
            s_start, s_end, t0, t1, m, labels, counts, grad, row_ce, row_kd,
            s_start.stride(0), s_start.stride(1), s_end.stride(0), s_end.stride(1),
            t0.stride(0), t0.stride(1), t1.stride(0), t1.stride(1), m_sb, m_sl,
            B, L, T, float(alpha_ce), kd_row_scale, kd_grad_scale,
            HAS_TEACHER=has_teacher, HAS_MASK=mask is not None, STORE_GRAD=store_grad,
            SINGLE=single, BLOCK=block, OFF64=off64,
            S_COL1=s_start.stride(1) == 1 and s_end.stride(1) == 1,
            T_COL1=t0.stride(1) == 1 and t1.stride(1) == 1, num_warps=_num_warps(block),
        )

    if device.type == "cuda":
        with torch.cuda.device(device):
            launch()
    else:
        launch()

    ce = row_ce.sum()
    if has_teacher:
        kd = row_kd.sum()
        loss = float(alpha_ce) * ce + float(alpha_kd) * kd
    else:
        kd = torch.zeros((), device=device, dtype=torch.float32)
        loss = float(alpha_ce) * ce
    return loss, ce, kd, grad if store_grad else None


class QADistillFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the kernel and keeps its gradient; backward scales it.

    The stored gradient is float32 even for half inputs: the loss scale of a gradient scaler only
    arrives in backward, and a pre-scale gradient of order 1/(B L) stored in float16 would
    underflow to subnormals or zero before that scale could rescue it.
    """

    @staticmethod
    def forward(ctx, s_start, s_end, start_positions, end_positions, t_start, t_end, mask,
                temperature, alpha_ce, alpha_kd, block_size):
        store = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, ce, kd, grad = qa_distill_forward(
            s_start, s_end, start_positions, end_positions, t_start, t_end, mask,
            temperature, alpha_ce, alpha_kd, store_grad=store, block_size=block_size)
        ctx.mark_non_differentiable(ce, kd)
        ctx.save_for_backward(grad)
        ctx.dtypes = (s_start.dtype, s_end.dtype)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd):
        (grad,) = ctx.saved_tensors
        g_start = g_end = None
        if grad_loss is not None and grad is not None:
            # grad_loss stays a device tensor: no .item(), no host synchronisation.
            if ctx.needs_input_grad[0]:
                g_start = (grad[0] * grad_loss).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                g_end = (grad[1] * grad_loss).to(ctx.dtypes[1])
        return g_start, g_end, None, None, None, None, None, None, None, None, None


def qa_distill(s_start, s_end, start_positions, end_positions, t_start=None, t_end=None, mask=None,
               temperature=2.0, alpha_ce=0.5, alpha_kd=0.5, block_size=None):
    """Differentiable fused loss on validated inputs; returns ``(loss, ce, kd)`` float32 scalars."""
    if t_start is not None:
        t_start, t_end = t_start.detach(), t_end.detach()
    return QADistillFunction.apply(s_start, s_end, start_positions, end_positions, t_start, t_end,
                                   mask, temperature, alpha_ce, alpha_kd, block_size)
