"""The fused loss is two device launches in all: one Triton kernel forward, one backward.

At QA shapes the loss moves a few hundred kilobytes, so on a GPU its time is its number of
launches.  Counted on the CPU: aten ops that would launch a GPU kernel (views, ``empty`` and
other metadata ops excluded) plus Triton launches, for forward + backward at B = 32, L = 384 with
a mask and ignored rows.
"""

import pytest
import torch

from kdqa.kernels import qa_distill  # noqa: F401 (imported before the count, as the loss does)
from kdqa.kernels.launch_count import count_launches
from kdqa.loss import qa_distillation_loss, qa_distillation_loss_reference
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(dtype=torch.bfloat16, B=32, L=384):
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(B, L, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(2)]
    t = [torch.randn(B, L, generator=g).to(DEVICE, dtype) for _ in range(2)]
    pos = [torch.randint(0, L, (B,), generator=g).to(DEVICE) for _ in range(2)]
    pos[0][3] = -100
    pos[1][5] = L
    mask = torch.arange(L)[None, :] < torch.randint(L // 2, L + 1, (B,), generator=g)[:, None]
    return s, t, pos, mask.to(DEVICE)


def _count(fn, **kwargs):
    """(forward counter, backward counter) of one loss call and its backward, after a first call
    (which may allocate the kernel's per-device ticket once)."""
    s, t, pos, mask = _inputs(**kwargs)
    grad_output = torch.tensor(1.0, device=DEVICE)  # made outside: autograd's ones_like excluded
    fn(s[0], s[1], pos[0], pos[1], t[0], t[1], mask=mask)
    with count_launches() as fwd:
        out = fn(s[0], s[1], pos[0], pos[1], t[0], t[1], mask=mask)
    with count_launches() as bwd:
        torch.autograd.grad(out.loss, s, grad_outputs=grad_output)
    return fwd, bwd


def test_fused_loss_is_one_launch_forward_and_one_backward():
    fwd, bwd = _count(lambda *a, **k: qa_distillation_loss(*a, impl="triton", **k))
    ref_fwd, ref_bwd = _count(qa_distillation_loss_reference)
    print(f"\nlaunches forward + backward at B=32, L=384, mask: fused {fwd.total} + {bwd.total}, "
          f"reference {ref_fwd.total} + {ref_bwd.total}")
    assert (fwd.triton, fwd.aten) == (1, 0), f"forward ran aten ops {dict(fwd.ops)}"
    assert (bwd.triton, bwd.aten) == (1, 0), f"backward ran aten ops {dict(bwd.ops)}"
    assert fwd.total + bwd.total == 2
    # The counter sees what it should: the reference is plain aten ops, dozens of them.
    assert ref_fwd.triton == ref_bwd.triton == 0 and ref_fwd.aten + ref_bwd.aten > 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_launches_for_other_dtypes_and_int32_positions_cost_one_more(dtype):
    fwd, bwd = _count(lambda *a, **k: qa_distillation_loss(*a, impl="triton", **k), dtype=dtype)
    assert fwd.total + bwd.total == 2
    # Positions that are not int64 are converted first: one conversion each, said in the docs.
    s, t, pos, mask = _inputs(dtype)
    pos32 = [p.int() for p in pos]
    with count_launches() as c:  # (the ticket exists: _count ran first)
        qa_distillation_loss(s[0], s[1], pos32[0], pos32[1], t[0], t[1], mask=mask, impl="triton")
    assert c.triton == 1 and dict(c.ops) == {"_to_copy": 2}


def test_counter_counts_device_work_and_not_metadata():
    x = torch.randn(4, 5, device=DEVICE)
    with count_launches() as c:
        x.t()[1:].unsqueeze(0).view(-1, 4).detach()  # views: nothing moves
        torch.empty(3, device=DEVICE)
    assert c.total == 0
    with count_launches() as c:
        (x * 2).sum()
        torch.zeros(3, device=DEVICE)
    assert c.total == 3 and c.triton == 0


@pytest.mark.parametrize("stride", [1, 2])
def test_ce_rows_cost_no_launch(stride):
    """Per-row CE flags are read by the kernel in place (bytes of the bool tensor, any stride):
    still one launch forward and one backward, nothing else."""
    flags = (torch.arange(32 * stride) % 3 != 0).to(DEVICE)[::stride]
    fwd, bwd = _count(lambda *a, **k: qa_distillation_loss(*a, impl="triton", ce_rows=flags, **k))
    assert (fwd.triton, fwd.aten) == (1, 0), f"forward ran aten ops {dict(fwd.ops)}"
    assert (bwd.triton, bwd.aten) == (1, 0), f"backward ran aten ops {dict(bwd.ops)}"
