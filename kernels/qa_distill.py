"""Fused QA distillation loss: the Triton kernels, their launchers and the autograd Function.

Two launches in all, and nothing else on the device:

* forward, one launch with grid ``(B, 2)`` (program ``(b, 0)`` takes start row ``b``, ``(b, 1)``
  its end row).  Each program decides its own row's label (the ignore rules below), counts the kept
  rows of its side by reading that side's B positions, reads its student (and teacher) row once for
  the statistics and once for the outputs, writes the gradient of the *whole loss* with respect to
  its student row in float32, and its CE and KL contributions.  The last program to finish (found
  with an integer atomic ticket) sums those contributions in a fixed order, writes ``loss, ce, kd``
  and resets the ticket: deterministic (no float atomics) and safe to replay in a CUDA graph;
* backward, one launch that multiplies the stored gradient by ``grad_output`` and writes both
  gradients in the student's dtype.

Nothing synchronises with the host.  The O(B) count per program is negligible at QA batch sizes
(B <= a few hundred); it reads positions that every program of a side shares (cached in L2).
Besides the two launches, only first uses allocate on the device: the per-device ticket and the
ones read in place of a missing mask or ``ce_rows`` (so warm up once before capturing a
CUDA graph), and positions that are not int64 are converted (one launch each).  ``ce_rows`` is
read in place as bytes: no launch; each program reads B + 1 more bytes (its side's flags, in the
count, and its own), L2-resident like the positions.  Forward calls on one device share
the ticket, so they must not overlap on different streams.

Mathematics (see ``kdqa.loss`` for the user-facing contract), per row with valid positions V
(inside the row and, when a mask is given, where it is True):

* ``ce_row = logsumexp(s[V]) - s[y]``; rows whose label is negative, ``>= L`` or masked, and
  rows whose ``ce_rows`` flag is False, are ignored, and ``ce = sum(ce_row) / 2 / max(count, 1)``
  separately for start and end rows (count: the rows not ignored).
* ``kl_row = sum_j p_j (log p_j - log q_j)`` with ``p = softmax(t[V]/T)``, ``q = softmax(s[V]/T)``
  and ``0 log 0 = 0``; ``kd = T^2 * sum(kl_row) / 2 / B``.
* ``d loss / d s_j = alpha_ce/(2 count) (softmax(s)_j - [j = y]) + alpha_kd T/(2B) (q_j - p_j)``.

Rows up to ``SINGLE_BLOCK_MAX`` columns are held in registers in one block; longer rows take two
passes over column blocks, the first an online (rescaled) max/sum for ``s``, ``s/T`` and ``t/T``
(``s/T`` shares the running max of ``s``).  Column offsets are int64 throughout: with a column
stride of 1 (specialised to a constant by Triton) that costs nothing, and rows of any stride and
length stay correct.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import triton
import triton.language as tl


def _interpreter_index_compat() -> None:
    """Triton 3.6's interpreter turns a scalar argument into ``int(array of shape [1])``, which
    numpy 2 refuses (``range(0, B, CHUNK)`` fails with "only 0-dimensional arrays can be
    converted"); Triton 3.9 squeezes the array first.  Under the interpreter of an older Triton,
    patch its tensor ``__index__`` the same way.  Compiled kernels are not affected."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"):
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_kdqa_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._kdqa_compat = True
    interpreter._patch_lang_tensor = patched


_interpreter_index_compat()

#: Rows up to this many columns are handled by one block held in registers.
SINGLE_BLOCK_MAX = 2048
#: Smallest column block: shorter rows share one compiled variant (QA rows, L = 384, take 512).
MIN_BLOCK = 512
#: Column block of the two-pass path for longer rows (its second pass reads the row from L2).
LOOP_BLOCK = 2048
#: Rows handled per step when a program counts its side's kept rows, and when the last program
#: sums the row contributions (fixed, so the summation order depends on B only).
ROW_CHUNK = 256
#: Elements per program of the backward kernel.
BWD_BLOCK = 2048
#: Rows whose centred log-ratios are all below this take KL's series form (see ``_kl_small``).
SERIES_MAX = 0.5
_SERIES_MAX = tl.constexpr(SERIES_MAX)


@triton.jit
def _label_ok(y, row_mask_base, m_sl, L):
    """Whether gold index ``y`` counts for CE: inside ``[0, L)`` and not masked."""
    ok = (y >= 0) & (y < L)
    y_safe = tl.where(ok, y, 0)
    return ok & (tl.load(row_mask_base + y_safe * m_sl, mask=ok, other=0) != 0)


@triton.jit
def _kept_rows(POS, p_s, MASK, m_sb, m_sl, CE_ROWS, c_s, B, L, CHUNK: tl.constexpr):
    """Number of rows of one side whose label counts (the CE denominator), computed on device:
    rows that CE applies to (``CE_ROWS``, bytes) with a label inside the row and not masked."""
    count = 0
    for start in range(0, B, CHUNK):
        rows = (start + tl.arange(0, CHUNK)).to(tl.int64)
        in_batch = rows < B
        y = tl.load(POS + rows * p_s, mask=in_batch, other=-1)
        ce_row = tl.load(CE_ROWS + rows * c_s, mask=in_batch, other=0) != 0
        ok = in_batch & ce_row & _label_ok(y, MASK + rows * m_sb, m_sl, L)
        count += tl.sum(ok.to(tl.int32), axis=0)
    return count


@triton.jit
def _valid_columns(row_mask_base, cols, m_sl, L):
    """Columns of a block that take part in the softmaxes: inside the row and not masked."""
    inside = cols < L
    return inside & (tl.load(row_mask_base + cols * m_sl, mask=inside, other=0) != 0)


@triton.jit
def _load_block(row_base, cols, col_stride, valid):
    """One block of a row as float32, -inf where not valid (so it drops out of max and sums)."""
    x = tl.load(row_base + cols * col_stride, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, x, float("-inf"))


@triton.jit
def _exp_minus_1_minus_x(x):
    """``exp(x) - 1 - x`` for |x| < SERIES_MAX without cancellation (Horner form, to x^9/9!)."""
    acc = 1.0 / 362880.0
    acc = acc * x + 1.0 / 40320.0
    acc = acc * x + 1.0 / 5040.0
    acc = acc * x + 1.0 / 720.0
    acc = acc * x + 1.0 / 120.0
    acc = acc * x + 1.0 / 24.0
    acc = acc * x + 1.0 / 6.0
    acc = acc * x + 0.5
    return acc * x * x


@triton.jit
def _log1p(x):
    """log(1 + x) to float32 precision for small x (Goldberg's correction of log(1 + x))."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _kl_small(kl_direct, delta, s1, s2, n_big):
    """The row's KL: the series form where every centred log-ratio was small, else the direct
    sum.  With ``d' = (t - max t - s + max s)/T - c``: ``KL = E_p[d'] - log E_q[exp d']``
    ``= (delta + S1)/(1 + delta + S2) - log1p(delta + S2)``, ``delta = E_q[d']`` (about 0),
    ``S1 = E_q[d' expm1 d']``, ``S2 = E_q[expm1 d' - d']``: sums of non-negative terms, where
    the direct sum subtracts two terms of size log L (5 % off at T = 1e3, negative at 1e4)."""
    series = (delta + s1) / (1.0 + delta + s2) - _log1p(delta + s2)
    return tl.where(n_big == 0, series, kl_direct)


@triton.jit
def _row_outputs(s, tt, valid, cols, y, m_s, z_s, z_q, m_t, z_p, temperature, centre,
                 delta, s2_row, series, ce_grad_scale, kd_grad_scale, HAS_TEACHER: tl.constexpr):
    """Gradient and KL contribution of one block of a row, given the row's final statistics.

    ``s`` and ``tt`` are the untempered student and teacher blocks (-inf where not valid).
    Log-probabilities are formed as ``(x - max)/T - log(sum)`` for both models alike: logits of
    1e4 keep full float32 precision, and a teacher equal to the student gives exactly KL = 0.
    Also the block's terms of the series form (``_kl_small``) about ``centre`` ~ E_q[d]:
    ``(kl, q d', q d' expm1 d', q (expm1 d' - d'), count of |d'| >= SERIES_MAX)``.  Where
    ``series`` (the row's sums ``delta``, ``s2_row`` known), the KD gradient is taken in that form
    too, ``q - p = q (delta + S2 - d' - (expm1 d' - d')) / (1 + delta + S2)``: ``q - p`` itself
    loses its size-1/T difference to the rounding of q and p.
    """
    e_s = tl.exp(s - m_s)
    r = e_s / z_s
    onehot = tl.where(cols == y, 1.0, 0.0)
    grad = ce_grad_scale * (r - onehot)
    kl = tl.zeros_like(r)
    dq = tl.zeros_like(r)
    s1 = tl.zeros_like(r)
    s2 = tl.zeros_like(r)
    big = tl.zeros_like(cols).to(tl.int32)
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
        # NaN (from inf - inf) fails the comparison, so such a row keeps the direct sum.
        d = tl.where(valid, ((tt - m_t) - (s - m_s)) / temperature - centre, 0.0)
        big = tl.where(valid & ((tl.abs(d) < _SERIES_MAX) == 0), 1, 0)
        d = tl.where(big == 0, d, 0.0)
        g = _exp_minus_1_minus_x(d)
        q = tl.where(valid, q, 0.0)
        dq = q * d
        s1 = dq * (d + g)
        s2 = q * g
        q_minus_p = tl.where(series, q * ((delta + s2_row) - (d + g)) / (1.0 + delta + s2_row),
                             q - p)
        grad = grad + kd_grad_scale * q_minus_p
    grad = tl.where(valid, grad, 0.0)
    return grad, kl, dq, s1, s2, big


@triton.jit(do_not_specialize=["store_grad", "c_s"])
def _qa_distill_fwd_kernel(
    S0, S1, T0, T1, MASK, CE_ROWS, P0, P1, GRAD, ROW_TERMS, TICKET, OUT,
    s0_sb, s0_sl,  # student start logits [B, L]: stride between rows, between columns
    s1_sb, s1_sl,  # student end logits [B, L]: row stride, column stride
    t0_sb, t0_sl,  # teacher start logits [B, L] (the student's when there is no teacher)
    t1_sb, t1_sl,  # teacher end logits [B, L]
    m_sb, m_sl,  # mask [B, L] read as bytes; without a mask, (0, 1) over a row of ones
    c_s,  # ce_rows [B] read as bytes: stride; without ce_rows, 0 over a byte of 1 (never
    # specialised, so that 0 and a real stride of 1 share one compiled variant)
    p0_s, p1_s,  # start / end positions [B] int64: stride between rows
    B, L, temperature, alpha_ce, alpha_kd, kd_row_scale, kd_grad_scale,
    store_grad,  # 0 or 1 (runtime, so that it adds no compiled variant)
    HAS_TEACHER: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK: tl.constexpr, S_COL1: tl.constexpr, T_COL1: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program per (row, side); outputs: GRAD [2, B, L] float32 (when store_grad),
    ROW_TERMS [2, 2B] float32 (CE, KD per row; scratch), OUT [3] float32 (loss, ce, kd)."""
    b = tl.program_id(0)
    which = tl.program_id(1)  # 0: start rows, 1: end rows
    b64 = b.to(tl.int64)
    row = which.to(tl.int64) * B + b64
    m_base = MASK + b64 * m_sb

    # Label and kept-row count of this row's side.  Each side in its own branch: a position
    # stride that Triton specialised to the constant 1 on one side only gives the branches the
    # same types this way.
    if which == 0:
        y = tl.load(P0 + b64 * p0_s)
        count = _kept_rows(P0, p0_s, MASK, m_sb, m_sl, CE_ROWS, c_s, B, L, CHUNK)
    else:
        y = tl.load(P1 + b64 * p1_s)
        count = _kept_rows(P1, p1_s, MASK, m_sb, m_sl, CE_ROWS, c_s, B, L, CHUNK)
    # A row that CE does not apply to is an ignored row for CE; its KD is untouched.
    label_ok = (tl.load(CE_ROWS + b64 * c_s) != 0) & _label_ok(y, m_base, m_sl, L)
    y = tl.where(label_ok, y, -1)
    inv_count = 1.0 / tl.maximum(count.to(tl.float32), 1.0)

    # This row's tensors.  Column strides are selected arithmetically (a stride specialised to 1
    # in one tensor only would give if-branches different types); when both are 1 the launcher
    # says so with a constexpr, which keeps loads vectorisable in the usual case.
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

    ce_grad_scale = tl.where(label_ok, alpha_ce * 0.5 * inv_count, 0.0)
    s_y = tl.load(s_base + tl.where(label_ok, y, 0) * s_sl).to(tl.float32)
    g_base = GRAD + row * L

    if SINGLE:
        cols = tl.arange(0, BLOCK).to(tl.int64)
        valid = _valid_columns(m_base, cols, m_sl, L)
        s = _load_block(s_base, cols, s_sl, valid)
        m_s = tl.max(s, axis=0)
        m_s = tl.where(m_s == float("-inf"), 0.0, m_s)  # an all-masked row: keep exp() finite
        z_s = tl.sum(tl.exp(s - m_s), axis=0)
        z_q = 1.0
        m_t = 0.0
        z_p = 1.0
        centre = 0.0
        tt = s
        if HAS_TEACHER:
            e_q = tl.exp((s - m_s) / temperature)
            z_q = tl.sum(e_q, axis=0)
            tt = _load_block(t_base, cols, t_sl, valid)
            m_t = tl.max(tt, axis=0)
            m_t = tl.where(m_t == float("-inf"), 0.0, m_t)
            z_p = tl.sum(tl.exp((tt - m_t) / temperature), axis=0)
            centre = tl.sum(tl.where(valid & (e_q > 0.0), e_q * (tt - s), 0.0), axis=0)
            centre = (centre / z_q + (m_s - m_t)) / temperature
        # The row's sums first (this call's gradient is unused), then the gradient with them.
        _, kl, dq, s1, s2, big = _row_outputs(
            s, tt, valid, cols, y, m_s, z_s, z_q, m_t, z_p, temperature, centre, 0.0, 0.0, False,
            ce_grad_scale, kd_grad_scale, HAS_TEACHER)
        kl_row = tl.sum(kl, axis=0)
        delta = tl.sum(dq, axis=0)
        s2_row = tl.sum(s2, axis=0)
        n_big = tl.sum(big, axis=0)
        if HAS_TEACHER:
            kl_row = _kl_small(kl_row, delta, tl.sum(s1, axis=0), s2_row, n_big)
        grad, kl, dq, s1, s2, big = _row_outputs(
            s, tt, valid, cols, y, m_s, z_s, z_q, m_t, z_p, temperature, centre, delta, s2_row,
            n_big == 0, ce_grad_scale, kd_grad_scale, HAS_TEACHER)
        if store_grad:
            tl.store(g_base + cols, grad, mask=cols < L)
    else:
        # Pass 1: online max and rescaled sums of exp(s), exp(s/T) (sharing max(s)) and exp(t/T).
        m_s = float("-inf")
        z_s = 0.0
        z_q = 0.0
        m_t = float("-inf")
        z_p = 0.0
        w_q = 0.0  # sum of exp((s - max s)/T) (t - s): the series form's centre
        for start in range(0, L, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            valid = _valid_columns(m_base, cols, m_sl, L)
            s = _load_block(s_base, cols, s_sl, valid)
            m_new = tl.maximum(m_s, tl.max(s, axis=0))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            z_s = z_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            if HAS_TEACHER:
                e_q = tl.exp((s - m_new) / temperature)
                rescale = tl.exp((m_s - m_new) / temperature)
                z_q = z_q * rescale + tl.sum(e_q, axis=0)
                tt = _load_block(t_base, cols, t_sl, valid)
                w_q = w_q * rescale + tl.sum(tl.where(valid & (e_q > 0.0), e_q * (tt - s), 0.0),
                                             axis=0)
                mt_new = tl.maximum(m_t, tl.max(tt, axis=0))
                mt_new = tl.where(mt_new == float("-inf"), 0.0, mt_new)
                z_p = z_p * tl.exp((m_t - mt_new) / temperature) \
                    + tl.sum(tl.exp((tt - mt_new) / temperature), axis=0)
                m_t = mt_new
            m_s = m_new
        if not HAS_TEACHER:
            z_q = 1.0
            z_p = 1.0
        centre = (w_q / z_q + (m_s - m_t)) / temperature
        # Pass 2: gradients and the KL sums with the final statistics.
        kl_row = 0.0
        delta = 0.0
        s1_row = 0.0
        s2_row = 0.0
        n_big = 0
        for start in range(0, L, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            valid = _valid_columns(m_base, cols, m_sl, L)
            s = _load_block(s_base, cols, s_sl, valid)
            tt = s
            if HAS_TEACHER:
                tt = _load_block(t_base, cols, t_sl, valid)
            grad, kl, dq, s1, s2, big = _row_outputs(
                s, tt, valid, cols, y, m_s, z_s, z_q, m_t, z_p, temperature, centre, 0.0, 0.0,
                False, ce_grad_scale, kd_grad_scale, HAS_TEACHER)
            if store_grad:
                tl.store(g_base + cols, grad, mask=cols < L)
            kl_row += tl.sum(kl, axis=0)
            if HAS_TEACHER:
                delta += tl.sum(dq, axis=0)
                s1_row += tl.sum(s1, axis=0)
                s2_row += tl.sum(s2, axis=0)
                n_big += tl.sum(big, axis=0)
        if HAS_TEACHER:
            kl_row = _kl_small(kl_row, delta, s1_row, s2_row, n_big)
            # Pass 3, only for a row in series form: its gradient again, in that form.
            if store_grad:
                if n_big == 0:
                    for start in range(0, L, BLOCK):
                        cols = start + tl.arange(0, BLOCK).to(tl.int64)
                        valid = _valid_columns(m_base, cols, m_sl, L)
                        s = _load_block(s_base, cols, s_sl, valid)
                        tt = _load_block(t_base, cols, t_sl, valid)
                        grad, kl, dq, s1, s2, big = _row_outputs(
                            s, tt, valid, cols, y, m_s, z_s, z_q, m_t, z_p, temperature, centre,
                            delta, s2_row, True, ce_grad_scale, kd_grad_scale, HAS_TEACHER)
                        tl.store(g_base + cols, grad, mask=cols < L)

    # (m_s - s_y) + log z_s rather than (m_s + log z_s) - s_y: no cancellation for large logits.
    ce_row = tl.where(label_ok, ((m_s - s_y) + tl.log(z_s)) * 0.5 * inv_count, 0.0)
    n_rows = 2 * B
    tl.store(ROW_TERMS + row, ce_row)
    tl.store(ROW_TERMS + n_rows + row, kl_row * kd_row_scale)

    # The last program to arrive sums the row terms in a fixed order (no float atomics), then
    # resets the ticket for the next launch (and for CUDA-graph replays).
    tl.debug_barrier()  # every thread's stores above happen before the release below
    ticket = tl.atomic_add(TICKET, 1, sem="acq_rel")
    if ticket == n_rows - 1:
        ce_acc = tl.zeros([CHUNK], dtype=tl.float32)
        kd_acc = tl.zeros([CHUNK], dtype=tl.float32)
        for start in range(0, n_rows, CHUNK):
            idx = start + tl.arange(0, CHUNK)
            inside = idx < n_rows
            ce_acc += tl.load(ROW_TERMS + idx, mask=inside, other=0.0, cache_modifier=".cg")
            kd_acc += tl.load(ROW_TERMS + n_rows + idx, mask=inside, other=0.0,
                              cache_modifier=".cg")
        ce = tl.sum(ce_acc, axis=0)
        kd = tl.sum(kd_acc, axis=0)
        if HAS_TEACHER:
            loss = alpha_ce * ce + alpha_kd * kd
        else:
            kd = 0.0
            loss = alpha_ce * ce
        tl.store(OUT, loss)
        tl.store(OUT + 1, ce)
        tl.store(OUT + 2, kd)
        tl.atomic_xchg(TICKET, 0)


@triton.jit
def _qa_distill_bwd_kernel(GRAD, GRAD_OUT, G0, G1, n_per_side, BLOCK: tl.constexpr):
    """``G0/G1 [B, L]`` (student dtype, contiguous) = ``GRAD [2, B, L]`` float32 * ``GRAD_OUT``
    (a float32 scalar on the device); grid ``(cdiv(B L, BLOCK), 2)``."""
    which = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_per_side
    scale = tl.load(GRAD_OUT)
    g = tl.load(GRAD + which.to(tl.int64) * n_per_side + offs, mask=inside, other=0.0) * scale
    if which == 0:
        tl.store(G0 + offs, g.to(G0.dtype.element_ty), mask=inside)
    else:
        tl.store(G1 + offs, g.to(G1.dtype.element_ty), mask=inside)


@dataclasses.dataclass(frozen=True)
class Blocking:
    """How a row is walked: in one block held in registers, or in two passes over blocks."""

    single: bool
    block: int
    num_warps: int


def choose_blocking(L: int, block_size: Optional[int] = None) -> Blocking:
    """The launcher's choice for rows of L columns (the ahead-of-time compile test enumerates it).

    ``block_size`` forces a column block (a power of two); one smaller than L selects the two-pass
    path, which the tests use to cover it at small L.
    """
    if block_size is None:
        single = L <= SINGLE_BLOCK_MAX
        block = max(triton.next_power_of_2(L), MIN_BLOCK) if single else LOOP_BLOCK
    else:
        block = int(block_size)
        if block <= 0 or block & (block - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        single = block >= L
    # At most 8 elements per thread and at most 8 warps (up to 255 registers per thread): the
    # widest variant (teacher, every input strided, so every element carries 64-bit addresses)
    # uses about 110 on sm_80 and sm_90 (benchmarks/RESULTS.md), far from spilling.
    warps = 4 if block <= 1024 else 8
    if block > 8 * 32 * warps:
        raise ValueError(f"block_size {block} is above the largest block, {8 * 32 * warps}")
    if _OLDER_TRITON:
        warps = _OLDER_TRITON_WARPS.get((single, block), warps)
    return Blocking(single, block, warps)


def _triton_before(major: int, minor: int) -> bool:
    try:
        found = tuple(int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return found < (major, minor)


#: Triton before 3.9 (3.6, the GPU machines' compiler) gives the variants without a teacher an
#: 8-byte stack frame on sm_90 at (single block 1024, 4 warps) and (two passes of 2048, 8 warps);
#: these warp counts compile clean there for every variant (tests/test_qa_distill_compile.py
#: checks both Triton versions in CI).  {(single, block): warps}
_OLDER_TRITON = _triton_before(3, 9)
_OLDER_TRITON_WARPS = {(True, 1024): 8, (False, 2048): 4}


_TICKETS: dict = {}
_NO_MASK: dict = {}
_EVERY_ROW: dict = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """The zeroed int32 ticket of ``device``'s forward launches, allocated once per device (each
    launch leaves it at zero).  Shared by every forward on that device: two forwards must not run
    concurrently on different streams of one device."""
    ticket = _TICKETS.get(device)
    if ticket is None:
        ticket = _TICKETS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return ticket


def _no_mask(device: torch.device, L: int) -> torch.Tensor:
    """A row of at least L bytes of 1, read with row stride 0 as the mask when none is given: the
    same compiled variant as a contiguous mask serves both.  Cached per device and grown to the
    next power of two when a longer row comes (the only launches besides the kernel's)."""
    ones = _NO_MASK.get(device)
    if ones is None or ones.numel() < L:
        ones = _NO_MASK[device] = torch.ones(triton.next_power_of_2(L), dtype=torch.uint8,
                                             device=device)
    return ones


def _every_row(device: torch.device) -> torch.Tensor:
    """One byte of 1, read with stride 0 as ``ce_rows`` when none is given (CE on every row).
    Allocated on first use per device and never replaced (unlike the growing row of ones), so a
    CUDA graph captured after a warm-up keeps reading live memory."""
    one = _EVERY_ROW.get(device)
    if one is None:
        one = _EVERY_ROW[device] = torch.ones(1, dtype=torch.uint8, device=device)
    return one


@dataclasses.dataclass
class ForwardLaunch:
    """Everything the forward launch takes, decided without launching (tests compile from it)."""

    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    out: torch.Tensor
    grad: Optional[torch.Tensor]

    def run(self):
        _qa_distill_fwd_kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


def plan_forward(s_start, s_end, start_positions, end_positions, t_start=None, t_end=None,
                 mask=None, temperature=2.0, alpha_ce=0.5, alpha_kd=0.5, store_grad=True,
                 block_size=None, ce_rows=None) -> ForwardLaunch:
    """Outputs allocated (``torch.empty``: no device work) and the arguments of the one launch."""
    B, L = s_start.shape
    device = s_start.device
    has_teacher = t_start is not None
    blocking = choose_blocking(L, block_size)
    # Positions as int64 (a no-op for the int64 positions collators give).
    p0 = start_positions.to(torch.int64)
    p1 = end_positions.to(torch.int64)

    out = torch.empty(3, device=device, dtype=torch.float32)
    row_terms = torch.empty((2, 2 * B), device=device, dtype=torch.float32)
    grad = torch.empty((2, B, L), device=device, dtype=torch.float32) if store_grad else None
    t0 = t_start if has_teacher else s_start
    t1 = t_end if has_teacher else s_end
    # A bool tensor is passed as its bytes (same storage, no copy).
    if mask is not None:
        m = mask.view(torch.uint8)
        m_sb, m_sl = m.stride(0), m.stride(1)
    else:
        m, m_sb, m_sl = _no_mask(device, L), 0, 1
    # ce_rows likewise as bytes, in place; without it, one byte of 1 read for every row.
    c, c_s = (ce_rows.view(torch.uint8), ce_rows.stride(0)) if ce_rows is not None else \
        (_every_row(device), 0)
    T = float(temperature)
    args = (
        s_start, s_end, t0, t1, m, c, p0, p1, grad if store_grad else out, row_terms,
        _ticket(device), out,
        s_start.stride(0), s_start.stride(1), s_end.stride(0), s_end.stride(1),
        t0.stride(0), t0.stride(1), t1.stride(0), t1.stride(1), m_sb, m_sl, c_s,
        p0.stride(0), p1.stride(0),
        B, L, T, float(alpha_ce), float(alpha_kd), T * T * 0.5 / B,
        float(alpha_kd) * T * 0.5 / B, int(store_grad),
    )
    constexprs = dict(
        HAS_TEACHER=has_teacher, SINGLE=blocking.single,
        BLOCK=blocking.block, S_COL1=s_start.stride(1) == 1 and s_end.stride(1) == 1,
        T_COL1=t0.stride(1) == 1 and t1.stride(1) == 1, CHUNK=ROW_CHUNK)
    return ForwardLaunch((B, 2), args, constexprs, blocking.num_warps, out, grad)


def _on_device(device: torch.device, fn):
    if device.type == "cuda":
        with torch.cuda.device(device):
            return fn()
    return fn()


def qa_distill_forward(s_start, s_end, start_positions, end_positions, t_start=None, t_end=None,
                       mask=None, temperature=2.0, alpha_ce=0.5, alpha_kd=0.5, store_grad=True,
                       block_size=None, ce_rows=None):
    """One launch for all 2B rows and the final reductions.

    Inputs are assumed validated (``kdqa.loss`` does that).  Returns ``(loss, ce, kd, grad)``:
    float32 scalars (views of one 3-element buffer) and the float32 ``[2, B, L]`` gradient of
    ``loss`` w.r.t. the student rows (None when ``store_grad`` is False).
    """
    launch = plan_forward(s_start, s_end, start_positions, end_positions, t_start, t_end, mask,
                          temperature, alpha_ce, alpha_kd, store_grad, block_size, ce_rows)
    try:
        _on_device(s_start.device, launch.run)
    except BaseException:
        # A launch that failed part-way (an interpreter error) may have left the ticket counted.
        _TICKETS.pop(s_start.device, None)
        raise
    out = launch.out
    return out[0], out[1], out[2], launch.grad


def qa_distill_backward(grad, grad_output, dtype):
    """One launch: ``grad [2, B, L]`` float32 times ``grad_output`` (a device scalar, never read
    on the host), as two new contiguous ``[B, L]`` tensors of ``dtype``."""
    _, B, L = grad.shape
    g0 = torch.empty((B, L), device=grad.device, dtype=dtype)
    g1 = torch.empty((B, L), device=grad.device, dtype=dtype)
    scale = grad_output.to(torch.float32)
    grid = (triton.cdiv(B * L, BWD_BLOCK), 2)
    _on_device(grad.device, lambda: _qa_distill_bwd_kernel[grid](grad, scale, g0, g1, B * L,
                                                                 BLOCK=BWD_BLOCK, num_warps=4))
    return g0, g1


class QADistillFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the kernel and keeps its gradient; backward scales it.

    The stored gradient is float32 even for half inputs: the loss scale of a gradient scaler only
    arrives in backward, and a pre-scale gradient of order 1/(B L) stored in float16 would
    underflow to subnormals or zero before that scale could rescue it.
    """

    @staticmethod
    def forward(ctx, s_start, s_end, start_positions, end_positions, t_start, t_end, mask,
                temperature, alpha_ce, alpha_kd, block_size, ce_rows):
        store = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, ce, kd, grad = qa_distill_forward(
            s_start, s_end, start_positions, end_positions, t_start, t_end, mask,
            temperature, alpha_ce, alpha_kd, store_grad=store, block_size=block_size,
            ce_rows=ce_rows)
        ctx.mark_non_differentiable(ce, kd)
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of ce and kd
        ctx.save_for_backward(grad)
        ctx.dtype = s_start.dtype
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd):
        (grad,) = ctx.saved_tensors
        g_start = g_end = None
        if grad_loss is not None and grad is not None:
            g_start, g_end = qa_distill_backward(grad, grad_loss, ctx.dtype)
            g_start = g_start if ctx.needs_input_grad[0] else None
            g_end = g_end if ctx.needs_input_grad[1] else None
        return g_start, g_end, None, None, None, None, None, None, None, None, None, None


def qa_distill(s_start, s_end, start_positions, end_positions, t_start=None, t_end=None, mask=None,
               temperature=2.0, alpha_ce=0.5, alpha_kd=0.5, block_size=None, ce_rows=None):
    """Differentiable fused loss on validated inputs; returns ``(loss, ce, kd)`` float32 scalars.
    ``ce_rows`` ([B] bool or None): the rows CE applies to; KD applies to every row."""
    if t_start is not None:
        t_start, t_end = t_start.detach(), t_end.detach()
    return QADistillFunction.apply(s_start, s_end, start_positions, end_positions, t_start, t_end,
                                   mask, temperature, alpha_ce, alpha_kd, block_size, ce_rows)
