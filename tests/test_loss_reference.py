"""The PyTorch reference of the QA distillation loss: it is the kernel's oracle, so it is checked
against first principles here (gradcheck, the Hugging Face and seed formulations, masking rules,
ignored rows, argument errors)."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdqa.loss import QALoss, qa_distillation_loss, qa_distillation_loss_reference


def _logits(B, L, seed, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, generator=g, dtype=torch.float64) * scale).to(dtype)


def _hf_qa_loss(start_logits, end_logits, start_positions, end_positions):
    """BertForQuestionAnswering's loss, verbatim in substance."""
    ignored_index = start_logits.size(1)
    start_positions = start_positions.clamp(0, ignored_index)
    end_positions = end_positions.clamp(0, ignored_index)
    loss_fct = nn.CrossEntropyLoss(ignore_index=ignored_index)
    return (loss_fct(start_logits, start_positions) + loss_fct(end_logits, end_positions)) / 2


def _seed_kd(s, t, T):
    """The seed notebook's soft-target term for one side."""
    return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, dim=-1),
                                               F.softmax(t / T, dim=-1)) * T ** 2


def test_matches_hugging_face_and_seed_formulations():
    B, L, T = 5, 11, 2.0
    s0, s1, t0, t1 = (_logits(B, L, i) for i in range(4))
    p0 = torch.tensor([0, 3, 10, 11, 40])  # 11 and 40 are >= L: ignored by HF and by us
    p1 = torch.tensor([2, 11, 5, 7, 1])
    out = qa_distillation_loss_reference(s0, s1, p0, p1, t0, t1, temperature=T,
                                         alpha_ce=0.3, alpha_kd=0.7)
    assert isinstance(out, QALoss)
    hf = _hf_qa_loss(s0, s1, p0, p1)
    seed = (_seed_kd(s0, t0, T) + _seed_kd(s1, t1, T)) / 2
    torch.testing.assert_close(out.ce, hf, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.kd, seed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, 0.3 * hf + 0.7 * seed, rtol=1e-12, atol=1e-12)


def test_hugging_face_equality_in_float32_and_grad():
    B, L = 4, 384
    s0 = _logits(B, L, 1, torch.float32).requires_grad_()
    s1 = _logits(B, L, 2, torch.float32).requires_grad_()
    p0, p1 = torch.tensor([5, 384, 0, 100]), torch.tensor([7, 383, 384, 99])
    out = qa_distillation_loss_reference(s0, s1, p0, p1, alpha_ce=1.0)
    assert out.loss.dtype == torch.float32
    g = torch.autograd.grad(out.loss, [s0, s1])
    hf = _hf_qa_loss(s0, s1, p0, p1)
    g_hf = torch.autograd.grad(hf, [s0, s1])
    torch.testing.assert_close(out.loss, hf)
    for a, b in zip(g, g_hf):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_gradcheck_float64(with_teacher, with_mask):
    B, L = 3, 6
    s0 = _logits(B, L, 10).requires_grad_()
    s1 = _logits(B, L, 11).requires_grad_()
    t0, t1 = (_logits(B, L, 12), _logits(B, L, 13)) if with_teacher else (None, None)
    p0, p1 = torch.tensor([1, 6, 2]), torch.tensor([-100, 4, 0])
    mask = None
    if with_mask:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, 4:] = False
        mask[2, 0] = False  # row 2's end position is masked: that row is ignored
        mask[1, 3] = False

    def f(a, b):
        return qa_distillation_loss_reference(a, b, p0, p1, t0, t1, temperature=1.7,
                                              alpha_ce=0.6, alpha_kd=0.9, mask=mask).loss

    assert torch.autograd.gradcheck(f, (s0, s1))


def test_mask_equals_truncated_rows():
    """Masked columns take part in neither softmax: masking the tail equals cutting it off."""
    B, L, keep = 3, 20, 13
    s0, s1, t0, t1 = (_logits(B, L, 20 + i) for i in range(4))
    p0, p1 = torch.tensor([0, 5, 12]), torch.tensor([3, 12, 30])
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :keep] = True
    # Garbage (including NaN) behind the mask must not matter.
    s0[:, keep:] = float("nan")
    t1[:, keep:] = float("inf")
    full = qa_distillation_loss_reference(s0, s1, p0, p1, t0, t1, mask=mask)
    cut = qa_distillation_loss_reference(s0[:, :keep], s1[:, :keep], p0, p1, t0[:, :keep],
                                         t1[:, :keep])
    for a, b in zip(full, cut):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_masked_gold_row_is_ignored_and_fully_masked_row_contributes_zero():
    B, L = 3, 8
    s0 = _logits(B, L, 30).requires_grad_()
    s1 = _logits(B, L, 31).requires_grad_()
    t0, t1 = _logits(B, L, 32), _logits(B, L, 33)
    p0, p1 = torch.tensor([2, 3, 1]), torch.tensor([4, 0, 6])
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1] = False  # fully masked row
    out = qa_distillation_loss_reference(s0, s1, p0, p1, t0, t1, mask=mask, alpha_kd=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.all(s0.grad[1] == 0) and torch.all(s1.grad[1] == 0)
    # Same as the two remaining rows, with KL still divided by the full batch of 3.
    keep = torch.tensor([0, 2])
    part = qa_distillation_loss_reference(s0[keep].detach(), s1[keep].detach(), p0[keep],
                                          p1[keep], t0[keep], t1[keep])
    torch.testing.assert_close(out.ce, part.ce)
    torch.testing.assert_close(out.kd, part.kd * 2 / 3)


def test_all_rows_ignored_gives_zero_ce_not_nan():
    B, L = 4, 9
    s0 = _logits(B, L, 40).requires_grad_()
    s1 = _logits(B, L, 41).requires_grad_()
    p = torch.tensor([-100, 9, 50, -1])
    out = qa_distillation_loss_reference(s0, s1, p, p, alpha_ce=1.0)
    assert out.ce.item() == 0.0 and out.loss.item() == 0.0
    out.loss.backward()
    assert torch.all(s0.grad == 0) and torch.all(s1.grad == 0)


def test_ce_only_path_and_zero_kd():
    B, L = 2, 5
    s0, s1 = _logits(B, L, 50), _logits(B, L, 51)
    p = torch.tensor([1, 2])
    out = qa_distillation_loss_reference(s0, s1, p, p, alpha_ce=0.25, alpha_kd=3.0)
    assert out.kd.shape == () and out.kd.item() == 0.0
    torch.testing.assert_close(out.loss, 0.25 * _hf_qa_loss(s0, s1, p, p))


def test_teacher_equal_to_student_gives_zero_kd_and_teacher_gets_no_grad():
    B, L = 3, 7
    s0 = _logits(B, L, 60).requires_grad_()
    s1 = _logits(B, L, 61).requires_grad_()
    t0 = s0.detach().clone().requires_grad_()
    t1 = s1.detach().clone().requires_grad_()
    p = torch.tensor([0, 1, 2])
    out = qa_distillation_loss_reference(s0, s1, p, p, t0, t1, alpha_ce=0.0, alpha_kd=1.0)
    assert abs(out.kd.item()) < 1e-12
    out.loss.backward()
    assert t0.grad is None and t1.grad is None
    assert s0.grad.abs().max() < 1e-12


def test_inf_and_nan_handling():
    B, L = 2, 6
    s0, s1, t0, t1 = (_logits(B, L, 70 + i) for i in range(4))
    p = torch.tensor([1, 2])
    # A teacher probability of exactly 0 (teacher logit -inf) is 0 log 0 = 0, not NaN.
    t0[0, 3] = float("-inf")
    t1[:, 0] = float("-inf")
    out = qa_distillation_loss_reference(s0, s1, p, p, t0, t1)
    assert torch.isfinite(out.loss)
    # Student -inf where the teacher has mass: an infinite KL, shown, not hidden.
    s_inf = s0.clone()
    s_inf[1, 4] = float("-inf")
    out = qa_distillation_loss_reference(s_inf, s1, p, p, t0, t1)
    assert out.kd.item() == float("inf")
    # A NaN anywhere that counts shows in the loss, even with its weight at 0.
    s_nan = s1.clone()
    s_nan[0, 5] = float("nan")
    out = qa_distillation_loss_reference(s0, s_nan, p, p, t0, t1, alpha_ce=0.0)
    assert torch.isnan(out.loss)


def test_positions_of_shape_b1_and_int32():
    B, L = 3, 5
    s0, s1 = _logits(B, L, 80), _logits(B, L, 81)
    p = torch.tensor([0, 4, 2])
    a = qa_distillation_loss_reference(s0, s1, p, p)
    b = qa_distillation_loss_reference(s0, s1, p[:, None].int(), p[:, None].int())
    torch.testing.assert_close(a.loss, b.loss)


def _base_args(B=2, L=5):
    s = torch.zeros(B, L)
    return [s, s.clone(), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)]


@pytest.mark.parametrize("fn", [qa_distillation_loss, qa_distillation_loss_reference])
@pytest.mark.parametrize("change, kwargs, exc, words", [
    (lambda a: a.__setitem__(1, torch.zeros(2, 6)), {}, ValueError, "student_end_logits"),
    (lambda a: a.__setitem__(0, torch.zeros(2, 5, 1)), {}, ValueError, "student_start_logits"),
    (lambda a: a.__setitem__(0, torch.zeros(0, 5)), {}, ValueError, "non-empty"),
    (lambda a: a.__setitem__(0, torch.zeros(2, 5, dtype=torch.long)), {}, TypeError,
     "floating-point"),
    (lambda a: a.__setitem__(1, torch.zeros(2, 5, dtype=torch.float64)), {}, TypeError,
     "share a dtype"),
    (lambda a: a.__setitem__(2, torch.zeros(2)), {}, TypeError, "start_positions"),
    (lambda a: a.__setitem__(3, torch.zeros(3, dtype=torch.long)), {}, ValueError,
     "end_positions"),
    (lambda a: a.__setitem__(3, [0, 1]), {}, TypeError, "end_positions"),
    (lambda a: a.append(torch.zeros(2, 5)), {}, ValueError, "teacher_end_logits"),
    (lambda a: a.extend([torch.zeros(2, 5), torch.zeros(2, 4)]), {}, ValueError,
     "teacher_end_logits"),
    (lambda a: a.extend([torch.zeros(2, 5, dtype=torch.int32)] * 2), {}, TypeError,
     "teacher_start_logits"),
    (None, {"temperature": 0.0}, ValueError, "temperature"),
    (None, {"temperature": -1}, ValueError, "temperature"),
    (None, {"temperature": float("nan")}, ValueError, "temperature"),
    (None, {"temperature": torch.tensor(2.0)}, ValueError, "temperature"),
    (None, {"temperature": 2e6}, ValueError, "temperature must be at most 1e\\+06"),
    (None, {"alpha_ce": -0.1}, ValueError, "alpha_ce"),
    (None, {"alpha_kd": -1}, ValueError, "alpha_kd"),
    (None, {"mask": torch.ones(2, 5)}, TypeError, "mask"),
    (None, {"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "mask"),
    (lambda a: a.__setitem__(1, torch.zeros(2, 5, device="meta")), {}, ValueError, "device"),
])
def test_errors_name_the_argument(fn, change, kwargs, exc, words):
    args = _base_args()
    if change is not None:
        change(args)
    with pytest.raises(exc, match=words):
        fn(*args, **kwargs)


def test_impl_errors_and_dispatch(monkeypatch):
    args = _base_args()
    with pytest.raises(ValueError, match="impl"):
        qa_distillation_loss(*args, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        qa_distillation_loss(*args, impl="triton")
    # auto on the CPU without the interpreter is the reference; errors still come first.
    out = qa_distillation_loss(*args, impl="auto")
    torch.testing.assert_close(out.loss, qa_distillation_loss_reference(*args).loss)
    with pytest.raises(ValueError, match="temperature"):
        qa_distillation_loss(*args, impl="triton", temperature=0)


def test_import_without_triton():
    """kdqa.loss must import, and impl='torch' work, where triton is not installed."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from kdqa.loss import qa_distillation_loss, triton_available\n"
        "s = torch.randn(2, 5); p = torch.tensor([1, 2])\n"
        "print(float(qa_distillation_loss(s, s, p, p, impl='torch').loss) > 0)\n"
        "try:\n"
        "    qa_distillation_loss(s, s, p, p, impl='triton')\n"
        "except ImportError as e:\n"
        "    print('impl=' in str(e))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True"]


#: The whole accepted temperature range, log-spaced, up to MAX_TEMPERATURE.
LARGE_T_RANGE = [0.05, 0.5, 2.0, 20.0, 1e2, 1e3, 1e4, 1e5, 1e6]


def _kd_rows(B, L, seed, teacher_noise, mask=False):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(B, L, generator=g, dtype=torch.float64) * 2.5 for _ in range(2)]
    t = [x + torch.randn(B, L, generator=g, dtype=torch.float64) * teacher_noise for x in s]
    pos = torch.randint(0, L, (B,), generator=g)
    m = None
    if mask:
        m = torch.rand(B, L, generator=g) > 0.2
        m[0] = False  # a fully masked row
    return s, t, pos, m


@pytest.mark.parametrize("T", LARGE_T_RANGE)
@pytest.mark.parametrize("noise, mask", [(1.5, False), (0.01, True), (30.0, False)])
def test_float32_kd_agrees_with_float64_over_the_accepted_temperatures(T, noise, mask):
    """``T^2 KL`` stays of order one for large T while KL shrinks as 1/T^2: the direct
    ``sum p (log p - log q)`` lost it in float32 (5 % off at T = 1e3, negative at 1e4)."""
    s, t, pos, m = _kd_rows(4, 384, seed=int(T * 10) % 1000 + int(noise), teacher_noise=noise, mask=mask)
    ref = qa_distillation_loss_reference(*s, pos, pos, *t, temperature=T, mask=m)
    got = qa_distillation_loss_reference(*[x.float() for x in s], pos, pos, *[x.float() for x in t],
                                         temperature=T, mask=m)
    assert float(got.kd) >= 0.0
    err = abs(float(got.kd) - float(ref.kd)) / max(1.0, abs(float(ref.kd)))
    assert err <= 2e-5, f"T={T}: float32 kd {float(got.kd)!r} vs float64 {float(ref.kd)!r}"
    # float64 itself against the plain formula of the seed (exact enough there up to 1e6).
    if T <= 1e3:
        seed = sum(_seed_kd(a, b, T) for a, b in zip(s, t)) / 2 if m is None else None
        if seed is not None:
            torch.testing.assert_close(ref.kd, seed, rtol=1e-9, atol=1e-12)


def test_temperature_bound_is_one_clear_line_at_parse_time():
    from kdqa.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match=r"--temperature must be > 0 and finite, at most 1e\+06"):
        parse_args(["distill", "--teacher_model_name_or_path", "t", "--model_name_or_path", "s",
                    "--train_file", "x.json", "--output_dir", "o", "--temperature", "1e7"])


# --- Per-row CE flags (``ce_rows``): transfer windows take KD and no CE (issue 32) ---

def _by_hand(s0, s1, p0, p1, t0, t1, ce_rows, T, alpha_ce, alpha_kd):
    """The loss written out with plain torch: cross-entropy over the flagged rows only (PyTorch
    ignores -100), averaged over them (0 when there are none), plus T^2 KL(batchmean) over every
    row."""
    rows = ce_rows.nonzero()[:, 0]

    def ce(s, p):
        counted = rows[p[rows] != -100]
        if len(counted) == 0:
            return s.sum() * 0.0
        return F.cross_entropy(s[counted], p[counted])

    def kl(s, t):
        return F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1),
                        reduction="batchmean") * T ** 2

    ce_term = (ce(s0, p0) + ce(s1, p1)) / 2
    kd_term = (kl(s0, t0) + kl(s1, t1)) / 2
    return alpha_ce * ce_term + alpha_kd * kd_term, ce_term, kd_term


@pytest.mark.parametrize("flags", [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1],
                                   [0, 0, 0, 1, 0]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ce_rows_against_a_loss_written_by_hand(flags, dtype):
    B, L, T = 5, 13, 2.0
    s0 = _logits(B, L, 90, dtype).requires_grad_()
    s1 = _logits(B, L, 91, dtype).requires_grad_()
    t0, t1 = _logits(B, L, 92, dtype), _logits(B, L, 93, dtype)
    p0, p1 = torch.tensor([3, 0, 12, -100, 7]), torch.tensor([5, 2, 12, 9, -100])
    ce_rows = torch.tensor(flags, dtype=torch.bool)
    out = qa_distillation_loss_reference(s0, s1, p0, p1, t0, t1, temperature=T, alpha_ce=0.4,
                                         alpha_kd=1.3, ce_rows=ce_rows)
    hand = _by_hand(s0, s1, p0, p1, t0, t1, ce_rows, T, 0.4, 1.3)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for got, want in zip(out, hand):
        torch.testing.assert_close(got, want.detach(), **tol)
    grads = torch.autograd.grad(out.loss, [s0, s1])
    hand_grads = torch.autograd.grad(hand[0], [s0, s1], retain_graph=True)
    for g, h in zip(grads, hand_grads):
        torch.testing.assert_close(g, h, **tol)
    if not any(flags):  # no CE at all: CE is 0, and the gradient is the KD term's alone
        assert out.ce.item() == 0.0
        kd_only = torch.autograd.grad(1.3 * hand[2], [s0, s1])
        for g, h in zip(grads, kd_only):
            torch.testing.assert_close(g, h, **tol)
    # The rows without CE still have their KD: the flags never touch it.
    plain = qa_distillation_loss_reference(s0, s1, p0, p1, t0, t1, temperature=T)
    assert torch.equal(out.kd, plain.kd)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_gradcheck_float64_with_ce_rows(with_teacher):
    B, L = 4, 6
    s0 = _logits(B, L, 100).requires_grad_()
    s1 = _logits(B, L, 101).requires_grad_()
    t0, t1 = (_logits(B, L, 102), _logits(B, L, 103)) if with_teacher else (None, None)
    p0, p1 = torch.tensor([1, 5, 2, 0]), torch.tensor([-100, 4, 0, 3])
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    ce_rows = torch.tensor([True, False, True, False])

    def f(a, b):
        return qa_distillation_loss_reference(a, b, p0, p1, t0, t1, temperature=1.7, alpha_ce=0.6,
                                              alpha_kd=0.9, mask=mask, ce_rows=ce_rows).loss

    assert torch.autograd.gradcheck(f, (s0, s1))


@pytest.mark.parametrize("fn", [qa_distillation_loss, qa_distillation_loss_reference])
@pytest.mark.parametrize("ce_rows, exc, words", [
    (torch.ones(2), TypeError, r"ce_rows must have dtype torch.bool \(True where the row has a "
                               r"gold answer\), got torch.float32"),
    (torch.ones(2, dtype=torch.uint8), TypeError, "ce_rows must have dtype torch.bool"),
    (torch.ones(3, dtype=torch.bool), ValueError,
     r"ce_rows must have shape \[2\] \(one flag per row\), got \(3,\)"),
    (torch.ones(2, 1, dtype=torch.bool), ValueError, r"ce_rows must have shape \[2\]"),
    (torch.ones(2, 5, dtype=torch.bool), ValueError, r"ce_rows must have shape \[2\]"),
    ([True, False], TypeError, r"ce_rows must be a bool torch.Tensor of shape \[2\] or None, "
                               "got list"),
    (torch.ones(2, dtype=torch.bool, device="meta"), ValueError, "ce_rows is on meta"),
])
def test_bad_ce_rows_is_one_line_naming_it(fn, ce_rows, exc, words):
    with pytest.raises(exc, match=words) as info:
        fn(*_base_args(), ce_rows=ce_rows)
    assert "\n" not in str(info.value)
