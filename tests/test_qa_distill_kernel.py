"""Gradient-parity suite of the fused Triton QA distillation kernel against the float64 reference.

On the CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET),
which is slow: there a fixed-seed sample of the grid plus the important corners runs.  Where CUDA
exists the full grid runs compiled on the GPU.  Every case draws its own data from its own seed.
"""

import dataclasses
import importlib.util
import itertools
import math
import pathlib
import random
import subprocess
import sys
from typing import Optional

import pytest
import torch

from kdqa.kernels import qa_distill as kernel
from kdqa.loss import QALoss, qa_distillation_loss, qa_distillation_loss_reference


ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf - inf, masked

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Fixed bounds on the errors against float64 (values relative to max(1, |v|), gradients relative
# to the largest gradient entry).  Values are computed in float32 for every input dtype; the
# gradients are returned in the student's dtype, so they carry its rounding.
VALUE_TOL = {F32: 2e-5, F16: 2e-5, BF16: 2e-5}
GRAD_TOL = {F32: 2e-5, F16: 2e-3, BF16: 1.6e-2}
# The kernel may be at most FACTOR times worse than the reference run in the same dtype, with a
# floor of a few roundings so that a reference that happens to be exact does not demand exactness.
FACTOR = 4.0
VALUE_FLOOR = {F32: 2e-6, F16: 2e-6, BF16: 2e-6}
GRAD_FLOOR = {F32: 2e-6, F16: 1e-3, BF16: 8e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    L: int
    dtype: torch.dtype
    T: float
    alpha_ce: float = 0.5
    alpha_kd: float = 0.5
    teacher: str = "same"  # none | same | other (another dtype) | equal (teacher == student)
    ignore: str = "some"  # none | some | all
    mask: bool = False
    noncontig: bool = False
    extreme: bool = False  # logits uniform in [-1e4, 1e4]
    grad_out: float = 1.0
    block: Optional[int] = None  # a column block < L forces the two-pass path
    seed: int = 0
    ce_rows: Optional[str] = None  # None (not passed) | some | no (all False) | all (all True)

    def __str__(self):
        dt = str(self.dtype).replace("torch.", "")
        flags = [f"B{self.B}", f"L{self.L}", dt, f"T{self.T}", f"a{self.alpha_ce}-{self.alpha_kd}",
                 f"t-{self.teacher}", f"ign-{self.ignore}"]
        flags += [n for n in ("mask", "noncontig", "extreme") if getattr(self, n)]
        if self.grad_out != 1.0:
            flags.append(f"go{self.grad_out}")
        if self.block:
            flags.append(f"blk{self.block}")
        if self.ce_rows is not None:
            flags.append(f"ce-{self.ce_rows}")
        return "-".join(flags)


def _grid():
    """All of B x L x dtype x T, each with variations drawn from its own index."""
    cases = []
    combos = itertools.product([1, 3, 41], [1, 7, 383, 384, 385, 512, 4099], [F32, F16, BF16],
                               [0.5, 1.0, 2.0, 4.0])
    for i, (B, L, dtype, T) in enumerate(combos):
        r = random.Random(1000 + i)
        alpha_ce, alpha_kd = r.choice([(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.3, 2.0)])
        cases.append(Case(
            B, L, dtype, T, alpha_ce, alpha_kd,
            teacher=r.choice(["same", "same", "other", "equal", "none"]),
            ignore=r.choice(["none", "some", "some", "all"]),
            mask=r.random() < 0.35, noncontig=r.random() < 0.35, extreme=r.random() < 0.15,
            grad_out=r.choice([1.0, 0.37, 1024.0]),
            block=((r.choice([128, 256]) if L <= 512 else 1024) if L > 256 and r.random() < 0.3
                   else None),
            seed=i))
    return cases


GRID = _grid()
SAMPLED = GRID if ON_GPU else random.Random(2024).sample(GRID, 40)

CORNERS = [
    # Two-pass path at small L (forced block), with everything switched on.
    Case(3, 385, F32, 2.0, 0.5, 0.5, "other", "some", mask=True, noncontig=True, grad_out=0.37,
         block=128, seed=1),
    Case(3, 4099, BF16, 1.0, 0.3, 2.0, "same", "some", mask=True, block=1024, seed=2),
    Case(41, 512, F16, 4.0, 1.0, 1.0, "other", "some", noncontig=True, block=128, seed=3),
    # Every row ignored, with and without a teacher.
    Case(3, 384, F16, 2.0, 0.5, 0.5, "same", "all", seed=4),
    Case(41, 7, F32, 1.0, 1.0, 0.0, "none", "all", mask=True, seed=5),
    # Logits of +-1e4 in every dtype, small temperature.
    Case(3, 383, F32, 0.5, 0.5, 0.5, "same", "some", extreme=True, seed=6),
    Case(3, 383, F16, 0.5, 0.5, 0.5, "other", "some", extreme=True, mask=True, seed=7),
    Case(1, 4099, BF16, 0.5, 0.5, 0.5, "same", "none", extreme=True, block=1024, seed=8),
    # Teacher equal to the student, alphas of 0, CE only, tiny rows.
    Case(3, 385, F32, 2.0, 0.0, 1.0, "equal", "some", mask=True, seed=9),
    Case(41, 1, F32, 4.0, 0.5, 0.5, "same", "some", seed=10),
    Case(3, 512, BF16, 1.0, 0.0, 0.0, "same", "some", grad_out=1024.0, seed=11),
    Case(41, 384, F16, 2.0, 1.0, 0.5, "none", "some", mask=True, noncontig=True, seed=12),
    Case(1, 7, F16, 1.0, 0.5, 0.5, "other", "none", noncontig=True, seed=13),
]

LONG = [
    Case(1, 32768, F32, 2.0, 0.5, 0.5, "same", "none", mask=True, seed=20),
    Case(1, 32768, BF16, 1.0, 0.5, 0.5, "other", "none", noncontig=True, seed=21),
    Case(1, 70001, F32, 4.0, 0.3, 2.0, "same", "none", mask=True, noncontig=True, seed=22),
    Case(1, 70001, F16, 2.0, 0.5, 0.5, "other", "none", seed=23),
]
if ON_GPU:  # compiled, the long rows afford a real batch
    LONG += [dataclasses.replace(c, B=41, ignore="some", seed=c.seed + 100) for c in LONG]


def _to_layout(x: torch.Tensor, how: int) -> torch.Tensor:
    """x as a non-contiguous view: 0 transposed storage (column stride B), 1 every other column."""
    B, L = x.shape
    if how == 0:
        out = torch.empty(L, B, dtype=x.dtype, device=x.device).t()
    else:
        out = torch.zeros(B, 2 * L, dtype=x.dtype, device=x.device)[:, 1::2]
    out.copy_(x)
    return out


def make_inputs(c: Case):
    g = torch.Generator().manual_seed(c.seed * 7919 + 17)
    B, L = c.B, c.L

    def rand_logits():
        if c.extreme:
            return (torch.rand(B, L, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
        return torch.randn(B, L, generator=g, dtype=torch.float64) * 2.5

    pos = [torch.randint(0, L, (B,), generator=g) for _ in range(2)]
    student = [rand_logits() for _ in range(2)]
    if not c.extreme:  # a realistic peak at the gold position
        for s, p in zip(student, pos):
            s[torch.arange(B), p] += 6.0
    if c.teacher == "none":
        teacher = [None, None]
    elif c.teacher == "equal":
        teacher = [s.clone() for s in student]
    elif c.extreme:
        teacher = [rand_logits() for _ in range(2)]
    else:
        teacher = [s + torch.randn(B, L, generator=g, dtype=torch.float64) * 1.5 for s in student]
    if c.ignore != "none":
        choices = torch.tensor([L, L + 7, -100, -1])
        for p in pos:
            rows = (torch.rand(B, generator=g) < 0.35) if c.ignore == "some" else torch.ones(B, dtype=torch.bool)
            p[rows] = choices[torch.randint(0, 4, (B,), generator=g)][rows]
    mask = None
    if c.mask:
        lengths = torch.randint(max(1, L // 2), L + 1, (B,), generator=g)
        mask = torch.arange(L)[None, :] < lengths[:, None]
        mask &= torch.rand(B, L, generator=g) > 0.1
        if B >= 3:
            mask[1] = False  # a fully masked row
    t_dtype = c.dtype if c.teacher != "other" else (BF16 if c.dtype == F32 else F32)
    s_q = [s.to(c.dtype).to(DEVICE) for s in student]
    t_q = [None if t is None else t.to(t_dtype).to(DEVICE) for t in teacher]
    pos = [p.to(DEVICE) for p in pos]
    mask = None if mask is None else mask.to(DEVICE)
    if c.noncontig:
        s_q = [_to_layout(s_q[0], 0), _to_layout(s_q[1], 1)]
        if t_q[0] is not None:
            t_q = [_to_layout(t_q[0], 1), _to_layout(t_q[1], 0)]
        if mask is not None:
            mask = _to_layout(mask, 1)
    return s_q, pos, t_q, mask


def make_ce_rows(c: Case) -> Optional[torch.Tensor]:
    """The case's per-row CE flags ([B] bool; strided when the case is non-contiguous), drawn
    from a generator of their own so that ``make_inputs`` draws what it always drew."""
    if c.ce_rows is None:
        return None
    g = torch.Generator().manual_seed(c.seed * 7919 + 23)
    flags = {"no": torch.zeros(c.B, dtype=torch.bool), "all": torch.ones(c.B, dtype=torch.bool),
             "some": torch.rand(c.B, generator=g) < 0.5}[c.ce_rows]
    if c.ce_rows == "some" and c.B > 1:
        flags[0], flags[-1] = True, False  # some rows with CE and some without, always
    if c.noncontig:
        flags = torch.stack([flags, ~flags], dim=1)[:, 0]  # stride 2
    return flags.to(DEVICE)


def _leaf(x):
    """A leaf requiring grad with x's values and (dense or not) layout."""
    return x.detach().requires_grad_()


def _run(fn, s, pos, t, mask, c: Case, **extra):
    s = [_leaf(x) for x in s]
    out = fn(s[0], s[1], pos[0], pos[1], t[0], t[1], temperature=c.T, alpha_ce=c.alpha_ce,
             alpha_kd=c.alpha_kd, mask=mask, **extra)
    go = torch.tensor(c.grad_out, device=out.loss.device, dtype=out.loss.dtype)
    grads = torch.autograd.grad(out.loss, s, grad_outputs=go, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(s, grads)]
    return out, grads


def _kernel_fn(block):
    if block is None:
        return lambda *a, **k: qa_distillation_loss(*a, impl="triton", **k)

    def fn(s0, s1, p0, p1, t0, t1, *, temperature, alpha_ce, alpha_kd, mask, ce_rows=None):
        return QALoss(*kernel.qa_distill(s0, s1, p0, p1, t0, t1, mask, temperature, alpha_ce,
                                         alpha_kd, block_size=block, ce_rows=ce_rows))
    return fn


def _value_err(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).abs() / ref.abs().clamp(min=1.0))


def _grad_err(gs, refs):
    # The floor keeps a float64 gradient that is only roundoff (teacher == student, alpha_ce = 0)
    # from turning an exact 0 of the kernel into a "relative error" of 1.
    scale = max(max(float(r.abs().max()) for r in refs), 1e-6)
    diff = max(float((g.double().cpu() - r.cpu()).abs().max()) for g, r in zip(gs, refs))
    return diff / scale


def check_case(c: Case):
    """Kernel vs float64 reference: forward values and gradients; returns the errors seen."""
    s, pos, t, mask = make_inputs(c)
    extra = {} if c.ce_rows is None else {"ce_rows": make_ce_rows(c)}
    ref64, g64 = _run(qa_distillation_loss_reference, [x.double() for x in s], pos,
                      [None if x is None else x.double() for x in t], mask, c, **extra)
    refd, gd = _run(qa_distillation_loss_reference, s, pos, t, mask, c, **extra)
    out, gk = _run(_kernel_fn(c.block), s, pos, t, mask, c, **extra)

    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert out.ce.shape == () and out.kd.shape == () and out.kd.device == out.loss.device
    for g, x in zip(gk, s):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert torch.isfinite(g).all()
    assert torch.isfinite(ref64.loss)
    if c.teacher == "none":
        assert float(out.kd) == 0.0
    if c.teacher == "equal":
        assert abs(float(out.kd)) <= 1e-6
    if c.ignore == "all" or c.ce_rows == "no":
        assert float(out.ce) == 0.0

    errs = {}
    for name in ("loss", "ce", "kd"):
        ek = _value_err(getattr(out, name), getattr(ref64, name))
        er = _value_err(getattr(refd, name), getattr(ref64, name))
        assert ek <= VALUE_TOL[c.dtype], f"{name}: {ek:.3g} vs float64 ({c})"
        assert ek <= max(FACTOR * er, VALUE_FLOOR[c.dtype]), \
            f"{name}: kernel {ek:.3g} worse than reference-in-dtype {er:.3g} ({c})"
        errs[name] = ek
    ek, er = _grad_err(gk, g64), _grad_err(gd, g64)
    # For T > 100 the KD gradient (q - p, of size 1/T) keeps float32's rounding of q and p: held
    # to the reference-in-dtype rule below only (the values above stay exact at any accepted T).
    assert c.T > 100 or ek <= GRAD_TOL[c.dtype], f"grad: {ek:.3g} vs float64 ({c})"
    assert ek <= max(FACTOR * er, GRAD_FLOOR[c.dtype]), \
        f"grad: kernel {ek:.3g} worse than reference-in-dtype {er:.3g} ({c})"
    errs["grad"] = ek
    return errs


@pytest.mark.parametrize("case", SAMPLED, ids=str)
def test_parity_grid(case):
    check_case(case)


@pytest.mark.parametrize("case", CORNERS, ids=str)
def test_parity_corners(case):
    check_case(case)


#: The whole accepted temperature range (kdqa.loss.MAX_TEMPERATURE is its top), single-block and
#: two-pass, with a mask, a teacher close to the student and one far from it, every dtype.
LARGE_T = [
    Case(3, 384, dtype, T, 0.5, 0.5, teacher, "some", mask=i % 2 == 0, seed=300 + i,
         block=128 if i % 3 == 0 else None)
    for i, (T, dtype, teacher) in enumerate(itertools.product(
        [20.0, 1e3, 1e4, 1e6], [F32, BF16], ["same", "other"]))
]


@pytest.mark.parametrize("case", LARGE_T, ids=str)
def test_parity_large_temperatures(case):
    """KD = T^2 KL with KL ~ 1/T^2: the kernel's series form keeps it at float64's value."""
    check_case(case)
    s, pos, t, mask = make_inputs(case)
    out = kernel.qa_distill(s[0], s[1], pos[0], pos[1], t[0], t[1], mask, case.T, 0.5, 0.5,
                            block_size=case.block)
    assert float(out[2]) > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("case", LONG, ids=str)
def test_parity_long_rows(case):
    """L = 32,768 and L > 2^16: the two-pass path at real length (B = 1 under the interpreter)."""
    check_case(case)


def test_positions_of_any_integer_dtype_and_stride():
    """Positions as int32 and as strided views (one side stride 1, the other not), with a mask:
    the kernel reads them where they lie, as the reference does."""
    c = Case(3, 385, F16, 2.0, 0.5, 0.5, "other", "some", mask=True, noncontig=True, seed=30)
    s, pos, t, mask = make_inputs(c)
    both = torch.stack([pos[0], pos[1]], dim=1)  # [B, 2]: columns of stride 2
    for p0, p1 in ((pos[0].to(torch.int32), pos[1].to(torch.int32)), (both[:, 0], pos[1]),
                   (both[:, 0:1], both[:, 1])):
        ref, g_ref = _run(qa_distillation_loss_reference, s, [p0, p1], t, mask, c)
        out, g_out = _run(_kernel_fn(None), s, [p0, p1], t, mask, c)
        torch.testing.assert_close(out.loss, ref.loss, rtol=2e-5, atol=2e-6)
        for g, r in zip(g_out, g_ref):
            torch.testing.assert_close(g.float(), r.float(), rtol=2e-3, atol=2e-3)


def test_repeated_calls_are_bit_identical_and_leave_the_ticket_at_zero():
    """The last program's fixed-order sum is deterministic, and it resets the ticket that finds
    it, so a second launch (or a CUDA-graph replay) starts from the same state."""
    c = Case(41, 384, BF16, 2.0, 0.5, 0.5, "other", "some", mask=True, seed=32)
    s, pos, t, mask = make_inputs(c)
    first = _run(_kernel_fn(None), s, pos, t, mask, c)
    assert int(kernel._ticket(DEVICE)) == 0
    second = _run(_kernel_fn(None), s, pos, t, mask, c)
    assert int(kernel._ticket(DEVICE)) == 0
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


def test_grad_output_from_device_and_accumulation():
    """Backward multiplies by grad_output as given (a loss scale), and can run twice."""
    c = Case(3, 64, F32, 2.0, 0.5, 0.5, "same", "some", mask=True, seed=40)
    s, pos, t, mask = make_inputs(c)
    s = [_leaf(x) for x in s]
    out = qa_distillation_loss(s[0], s[1], pos[0], pos[1], t[0], t[1], temperature=c.T,
                               mask=mask, impl="triton")
    g1 = [g.clone() for g in torch.autograd.grad(out.loss, s, retain_graph=True)]
    scale = torch.tensor(65536.0, device=DEVICE)
    out.loss.backward(scale, retain_graph=True)
    out.loss.backward(scale)  # gradient accumulation: grads add up
    for x, g in zip(s, g1):
        torch.testing.assert_close(x.grad, 2 * 65536.0 * g, rtol=1e-6, atol=0)
    # Scaling the loss before backward (as GradScaler does) gives the same thing.
    s2 = [_leaf(x.detach().clone()) for x in s]
    out2 = qa_distillation_loss(s2[0], s2[1], pos[0], pos[1], t[0], t[1], temperature=c.T,
                                mask=mask, impl="triton")
    (out2.loss * 3.0).backward()
    for x, g in zip(s2, g1):
        torch.testing.assert_close(x.grad, 3.0 * g, rtol=1e-6, atol=0)


def test_half_gradient_survives_loss_scale():
    """Gradients far below float16's normal range come out right once the loss scale is applied:
    the stored gradient is float32, so nothing underflows before backward scales it."""
    B, L = 41, 4099
    g = torch.Generator().manual_seed(50)
    s = [(torch.randn(B, L, generator=g) * 0.01).to(F16).to(DEVICE) for _ in range(2)]
    pos = [torch.randint(0, L, (B,), generator=g).to(DEVICE) for _ in range(2)]
    c = Case(B, L, F16, 1.0, 1.0, 0.0, "none", "none", grad_out=2.0 ** 16)
    out, gk = _run(_kernel_fn(None), s, pos, [None, None], None, c)
    ref, g64 = _run(qa_distillation_loss_reference, [x.double() for x in s], pos, [None, None],
                    None, c)
    # Unscaled, the off-gold gradient is about 1/(2 B L) ~ 3e-6: subnormal in float16.
    assert _grad_err(gk, g64) <= 1e-3


def test_no_grad_path_stores_no_gradient():
    c = Case(3, 100, F32, 2.0, seed=60)
    s, pos, t, mask = make_inputs(c)
    loss, ce, kd, grad = kernel.qa_distill_forward(s[0], s[1], pos[0], pos[1], t[0], t[1],
                                                   store_grad=False)
    assert grad is None
    with torch.no_grad():
        out = qa_distillation_loss(s[0], s[1], pos[0], pos[1], t[0], t[1], impl="triton")
    torch.testing.assert_close(out.loss, loss)
    assert not out.loss.requires_grad


def test_nan_and_inf_show_or_vanish_as_defined():
    c = Case(3, 50, F32, 2.0, 0.5, 0.5, "same", "none", seed=70)
    s, pos, t, _ = make_inputs(c)
    # Teacher -inf (probability exactly 0): 0 log 0 = 0, finite loss and gradient.
    t_inf = [x.clone() for x in t]
    t_inf[0][0, 3] = float("-inf")
    t_inf[1][:, 10] = float("-inf")
    pos_safe = [torch.where(p == 10, p + 1, p) for p in pos]
    out, gk = _run(_kernel_fn(None), s, pos_safe, t_inf, None, c)
    ref, gr = _run(qa_distillation_loss_reference, s, pos_safe, t_inf, None, c)
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in gk)
    torch.testing.assert_close(out.loss, ref.loss)
    # Masked NaN does not matter; unmasked NaN shows in the loss even with its alpha at 0.
    s_nan = [x.clone() for x in s]
    s_nan[1][2, 7] = float("nan")
    mask = torch.ones(3, 50, dtype=torch.bool, device=DEVICE)
    mask[2, 7] = False
    out = qa_distillation_loss(*s_nan, *pos, *t, mask=mask, impl="triton")
    assert torch.isfinite(out.loss)
    for block in (None, 16):
        out = _kernel_fn(block)(*s_nan, *pos, *t, temperature=2.0, alpha_ce=0.0, alpha_kd=1.0,
                                mask=None)
        assert torch.isnan(out.loss)
    # +inf student logit: NaN/inf, not hidden.
    s_inf = [x.clone() for x in s]
    s_inf[0][0, 0] = float("inf")
    out = qa_distillation_loss(*s_inf, *pos, *t, impl="triton")
    assert not torch.isfinite(out.loss)


def test_errors_raised_before_any_launch(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("kernel launched despite invalid arguments")

    monkeypatch.setattr(kernel, "_qa_distill_fwd_kernel", NoLaunch())
    s = torch.zeros(2, 5, device=DEVICE)
    p = torch.zeros(2, dtype=torch.long, device=DEVICE)
    bad = [
        dict(args=(s, torch.zeros(2, 6, device=DEVICE), p, p)),
        dict(args=(s, s, p, p), kw=dict(temperature=0)),
        dict(args=(s, s, p, p), kw=dict(alpha_kd=-1.0)),
        dict(args=(s.long(), s.long(), p, p)),
        dict(args=(s, s, p.float(), p)),
        dict(args=(s, s, p, p), kw=dict(mask=torch.ones(2, 5, device=DEVICE))),
        dict(args=(s, s, p, p, s, s.cpu() if ON_GPU else s.to("meta"))),
        dict(args=(s, s, p, p), kw=dict(impl="cuda")),
    ]
    for b in bad:
        with pytest.raises((ValueError, TypeError)):
            qa_distillation_loss(*b["args"], impl=b.get("kw", {}).pop("impl", "triton"),
                                 **b.get("kw", {}))


def test_auto_uses_the_kernel_here(monkeypatch):
    calls = []
    real = kernel.qa_distill
    monkeypatch.setattr(kernel, "qa_distill", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = torch.randn(2, 9, device=DEVICE)
    p = torch.tensor([1, 2], device=DEVICE)
    qa_distillation_loss(s, s, p, p, impl="auto")
    assert calls == [1]


def test_no_host_sync_in_forward_or_backward(monkeypatch):
    """Every way a tensor value reaches Python is booby-trapped while the loss runs forward and
    backward (the interpreter itself reads memory through pointers, not through these)."""
    c = Case(3, 300, BF16, 2.0, 0.5, 0.5, "other", "some", mask=True, noncontig=True, seed=90)
    s, pos, t, mask = make_inputs(c)
    s = [_leaf(x) for x in s]
    go = torch.tensor(0.5, device=DEVICE)

    def trap(name):
        def f(*a, **k):
            raise AssertionError(f"host synchronisation through {name}")
        return f

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy",
                 "nonzero", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    monkeypatch.setattr(torch, "equal", trap("torch.equal"))
    for block in (None, 128):
        out = _kernel_fn(block)(s[0], s[1], pos[0], pos[1], t[0], t[1], temperature=c.T,
                                alpha_ce=c.alpha_ce, alpha_kd=c.alpha_kd, mask=mask)
        out.loss.backward(go)
    monkeypatch.undo()
    assert all(torch.isfinite(x.grad).all() for x in s)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and sync debugging need a CUDA device")
def test_cuda_graph_capture_and_no_sync():
    c = Case(41, 384, BF16, 2.0, 0.5, 0.5, "other", "some", mask=True, seed=80)
    s, pos, t, mask = make_inputs(c)
    static_s = [x.clone().requires_grad_() for x in s]

    def step():
        for x in static_s:
            x.grad = None
        out = qa_distillation_loss(static_s[0], static_s[1], pos[0], pos[1], t[0], t[1],
                                   temperature=c.T, mask=mask, impl="triton")
        out.loss.backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    for x in static_s:
        x.grad = None
    with torch.cuda.graph(graph):
        static_out = qa_distillation_loss(static_s[0], static_s[1], pos[0], pos[1], t[0], t[1],
                                          temperature=c.T, mask=mask, impl="triton")
        static_out.loss.backward()
    new = make_inputs(dataclasses.replace(c, seed=81))[0]
    with torch.no_grad():
        for x, n in zip(static_s, new):
            x.copy_(n)
            x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    eager = _run(_kernel_fn(None), new, pos, t, mask, dataclasses.replace(c, grad_out=1.0))
    torch.testing.assert_close(static_out.loss, eager[0].loss)
    for x, g in zip(static_s, eager[1]):
        torch.testing.assert_close(x.grad, g)


# --- Per-row CE flags (``ce_rows``, issue 32's transfer windows: KD on every row, CE on some) ---

#: Some rows, no row and every row with CE; every dtype, both paths, with and without a teacher
#: and a mask, strided flags with non-contiguous inputs, a batch of 41 and a row of 7.
CE_ROWS = [
    Case(5, 384, F32, 2.0, 0.5, 0.5, "same", "some", mask=True, seed=400, ce_rows="some"),
    Case(5, 384, F16, 2.0, 0.5, 0.5, "other", "some", noncontig=True, seed=401, ce_rows="some"),
    Case(5, 384, BF16, 1.0, 0.3, 2.0, "same", "none", mask=True, seed=402, ce_rows="some"),
    Case(3, 385, F32, 2.0, 0.5, 0.5, "other", "some", mask=True, noncontig=True, grad_out=0.37,
         block=128, seed=403, ce_rows="some"),
    Case(41, 384, BF16, 2.0, 0.5, 0.5, "other", "some", mask=True, seed=404, ce_rows="some"),
    Case(3, 385, BF16, 4.0, 1.0, 1.0, "same", "none", block=128, seed=405, ce_rows="no"),
    Case(5, 384, F32, 2.0, 0.5, 0.5, "same", "some", mask=True, seed=406, ce_rows="no"),
    Case(5, 384, F16, 2.0, 1.0, 0.0, "none", "none", seed=407, ce_rows="no"),
    Case(1, 7, F32, 1.0, 0.5, 0.5, "same", "none", seed=412, ce_rows="no"),
    Case(5, 384, F32, 2.0, 0.5, 0.5, "same", "some", mask=True, seed=409, ce_rows="all"),
    Case(3, 385, F16, 2.0, 0.5, 0.5, "other", "some", noncontig=True, block=128, seed=410,
         ce_rows="all"),
]


@pytest.mark.parametrize("case", CE_ROWS, ids=str)
def test_parity_ce_rows(case):
    """Kernel against the float64 reference with per-row CE flags, gradients included."""
    check_case(case)


def _assert_bitwise(got, expected, what, names=("loss", "ce", "kd")):
    (out, grads), (out_e, grads_e) = got, expected
    for name in names:
        a, b = getattr(out, name), getattr(out_e, name)
        assert torch.equal(a, b), f"{what}: {name} {float(a)!r} != {float(b)!r}"
    for side, a, b in zip(("start", "end"), grads, grads_e):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: {side} gradient differs"


@pytest.mark.parametrize("case", [CE_ROWS[1], CE_ROWS[3]], ids=str)
def test_a_row_without_ce_is_an_ignored_label_and_keeps_its_kd(case):
    """ce_rows False is, bit for bit, the label ignored (position -100): KD untouched; all True
    is ce_rows=None; all False is alpha_ce = 0.  Kernel and reference alike."""
    s, pos, t, mask = make_inputs(case)
    flags = make_ce_rows(case)
    ignored = [torch.where(flags, p, torch.full_like(p, -100)) for p in pos]
    for fn in (_kernel_fn(case.block), qa_distillation_loss_reference):
        got = _run(fn, s, pos, t, mask, case, ce_rows=flags)
        _assert_bitwise(got, _run(fn, s, ignored, t, mask, case), "flags vs ignored labels")
        none = _run(fn, s, pos, t, mask, case)
        assert not torch.equal(got[0].ce, none[0].ce)  # the flags do change CE...
        assert torch.equal(got[0].kd, none[0].kd)  # ...and nothing of KD
        every = torch.ones(case.B, dtype=torch.bool, device=DEVICE)
        _assert_bitwise(_run(fn, s, pos, t, mask, case, ce_rows=every), none, "all True vs None")
        no_ce = _run(fn, s, pos, t, mask, case, ce_rows=torch.zeros_like(every))
        assert float(no_ce[0].ce) == 0.0
        _assert_bitwise(no_ce, _run(fn, s, pos, t, mask, dataclasses.replace(case, alpha_ce=0.0)),
                        "all False vs alpha_ce = 0", names=("loss", "kd"))  # (that one logs CE)


REPO = pathlib.Path(__file__).resolve().parents[1]


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def code_before_ce_rows(tmp_path_factory):
    """(kdqa/loss.py, kernels/qa_distill.py) as modules, as they were before ``ce_rows``: the
    parent of the first commit that wrote ``ce_rows`` into the kernel, read from git."""
    found = _git("log", "--format=%H", "--reverse", "-S", "ce_rows", "--",
                 "kernels/qa_distill.py")
    first = found.stdout.split()[:1] if found.returncode == 0 else []
    if not first:
        pytest.skip("no git history holding the commit that added ce_rows (an export or a "
                    "shallow clone, or not committed yet)")
    folder = tmp_path_factory.mktemp("before_ce_rows")
    modules = []
    for path in ("kdqa/loss.py", "kernels/qa_distill.py"):
        shown = _git("show", f"{first[0]}^:{path}")
        assert shown.returncode == 0, shown.stderr
        file = folder / f"before_ce_rows_{pathlib.Path(path).stem}.py"
        file.write_text(shown.stdout)  # on disk: triton.jit reads a kernel's source from its file
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[file.stem] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


#: Both paths, every dtype, mask, strided inputs, ignored rows (some and all), +-1e4 logits.
BEFORE_CE_ROWS = [CORNERS[0], CORNERS[3], CORNERS[6], CORNERS[11],
                  Case(5, 384, BF16, 2.0, 0.3, 2.0, "other", "some", mask=True, seed=420),
                  Case(3, 4099, F32, 1.0, 0.5, 0.5, "same", "some", block=1024, seed=421)]


@pytest.mark.parametrize("case", BEFORE_CE_ROWS, ids=str)
def test_without_ce_rows_the_loss_is_todays_bit_for_bit(case, code_before_ce_rows):
    """ce_rows=None runs the code of before ce_rows, to the bit: values and gradients of the
    kernel, of the reference and of impl='torch', against that code on the same inputs."""
    old_loss, old_kernel = code_before_ce_rows
    s, pos, t, mask = make_inputs(case)

    def old_fused(s0, s1, p0, p1, t0, t1, *, temperature, alpha_ce, alpha_kd, mask):
        return QALoss(*old_kernel.qa_distill(s0, s1, p0, p1, t0, t1, mask, temperature,
                                             alpha_ce, alpha_kd, block_size=case.block))

    pairs = {"kernel": (_kernel_fn(case.block), old_fused),
             "reference": (qa_distillation_loss_reference, old_loss.qa_distillation_loss_reference),
             "impl=torch": (lambda *a, **k: qa_distillation_loss(*a, impl="torch", **k),
                            old_loss.qa_distillation_loss_reference)}
    for what, (new, old) in pairs.items():
        _assert_bitwise(_run(new, s, pos, t, mask, case), _run(old, s, pos, t, mask, case), what)


def test_no_host_sync_with_ce_rows(monkeypatch):
    """The flags are read on the device: no path to the host opens while the loss runs."""
    c = dataclasses.replace(CE_ROWS[3], B=5, seed=411)
    s, pos, t, mask = make_inputs(c)
    flags = make_ce_rows(c)
    s = [_leaf(x) for x in s]

    def trap(name):
        def f(*a, **k):
            raise AssertionError(f"host synchronisation through {name}")
        return f

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy",
                 "nonzero", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    for block in (None, 128):
        out = _kernel_fn(block)(s[0], s[1], pos[0], pos[1], t[0], t[1], temperature=c.T,
                                alpha_ce=c.alpha_ce, alpha_kd=c.alpha_kd, mask=mask, ce_rows=flags)
        out.loss.backward()
    monkeypatch.undo()
    assert all(torch.isfinite(x.grad).all() for x in s)
