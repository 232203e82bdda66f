"""Benchmark of the QA distillation loss: our fused Triton kernel against its peers.

What it measures, for every shape and dtype, the forward, the backward and the forward+backward of
the distillation loss of extractive QA (cross-entropy on the gold start/end positions plus the
temperature-scaled KL divergence to the teacher's start/end distributions) for:

- ``triton``:  ``kdqa.loss.qa_distillation_loss(..., impl="triton")`` (kernels/qa_distill.py);
- ``eager``:   the seed notebook's formulation written out below (``log_softmax``, ``softmax``,
  ``nn.KLDivLoss(reduction="batchmean") * T**2``, ``nn.CrossEntropyLoss``, start and end,
  ``alpha_ce * ce + alpha_kd * kd``), in eager PyTorch;
- ``compile``: that same function under ``torch.compile``;
- ``liger``:   Liger-Kernel's ``LigerKLDIVLoss`` + ``LigerCrossEntropyLoss`` combined in the same
  formulation, when ``liger_kernel`` is importable (skipped with a printed note otherwise; on a
  machine without internet, carry its wheel and ``pip install --no-deps`` it).

Shapes: the QA case (start and end logits of shape [B, L], B in {8,16,32,64,128}, L in {384,512})
and long rows ([rows, L] up to 4096 x 32768), in bfloat16 and float32.

Timing (CUDA): ``triton.testing.do_bench`` (median, its warm-up and L2 flush, gradients reset to
None between calls with ``grad_to_none``), on fresh random normal inputs for every case (never
zeros). Peak memory: ``torch.cuda.max_memory_allocated`` over one forward+backward after
``reset_peak_memory_stats`` (``peak_mb`` includes the inputs, which are the same for every impl;
``extra_mb`` is the peak minus what was allocated before the call).

Bandwidth (reported for every row, meaningful for the long rows): bytes moved are counted as the
minimum any implementation must move: forward reads the student and teacher start/end logits
(4 * B * L * itemsize); backward and forward+backward read those 4 tensors and write the 2
gradients (6 * B * L * itemsize). Positions (2 * B int64) are ignored. ``GB/s = bytes / time``.
Next to it, a device-to-device copy (``dst.copy_(src)``) moving the same number of bytes (a
buffer of bytes/2, read once and written once) is timed in the same run; ``pct_copy`` is the
loss's bandwidth as a percentage of the copy's.

Launches: each impl's device launches for one forward and one backward (``launches`` in the CSV,
in brackets after the time in the tables): on a GPU the CUDA kernels, copies and memsets that the
profiler records; on the CPU the aten ops that would launch a kernel plus the Triton launches
(``kernels/launch_count.py``).  The fused loss is 1 + 1.

Every row is also checked numerically: loss and gradients of each impl against the eager
formulation run in float32 on the same inputs (``max_err``: largest gradient difference relative to
the largest reference gradient; ``loss_err``: relative loss difference).

Outputs in ``--out`` (default benchmarks/results): ``bench_loss.csv``, ``bench_loss.md`` (tables with
speed-up columns vs eager and vs torch.compile) and ``bench_loss.png`` (time against size).

Run on a GPU machine:   python benchmarks/bench_loss.py
Quick check on the CPU: python benchmarks/bench_loss.py --smoke --out /tmp/bench_smoke
(``--smoke`` runs the kernel under the Triton interpreter on two tiny shapes, times with
``time.perf_counter``, writes all three outputs, and exits non-zero if the impls disagree.)
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this script, also under runpy
from common import command_line, device_name, environment_lines, fmt, parser, utc_date, write_csv  # noqa: E402

# The interpreter must be switched on before any Triton kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

QA_BATCHES = [8, 16, 32, 64, 128]
QA_LENGTHS = [384, 512]
LONG_SHAPES = [(4096, 4096), (1024, 16384), (2048, 32768), (4096, 32768)]
SMOKE_SHAPES = [("qa", 2, 384), ("long", 4, 1024)]
ALL_IMPLS = ["triton", "eager", "compile", "liger"]
PASSES = ["fwd", "bwd", "fwd+bwd"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def seed_distillation_loss(s_start, s_end, start_positions, end_positions, t_start, t_end,
                           temperature: float = 2.0, alpha_ce: float = 0.5, alpha_kd: float = 0.5):
    """The seed notebook's loss, as written there: KLDivLoss(batchmean) * T^2 and CrossEntropyLoss,
    each averaged over start and end, mixed with alpha_ce / alpha_kd."""
    ce_fct = nn.CrossEntropyLoss()
    kd_fct = nn.KLDivLoss(reduction="batchmean")
    T = temperature
    kd_start = kd_fct(F.log_softmax(s_start / T, dim=-1), F.softmax(t_start / T, dim=-1)) * (T ** 2)
    kd_end = kd_fct(F.log_softmax(s_end / T, dim=-1), F.softmax(t_end / T, dim=-1)) * (T ** 2)
    kd = (kd_start + kd_end) / 2.0
    ce = (ce_fct(s_start, start_positions) + ce_fct(s_end, end_positions)) / 2.0
    return alpha_ce * ce + alpha_kd * kd


def make_liger_loss():
    """The same formulation with Liger-Kernel's KL-divergence and cross-entropy kernels, or None."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except Exception as err:  # ImportError, or a broken install on this platform
        print(f"note: liger_kernel is not importable ({type(err).__name__}: {err}); skipping the liger rows. "
              "Install it (pip install liger-kernel, or carry its wheel and pip install --no-deps) to include them.")
        return None
    kd_fct = LigerKLDIVLoss(reduction="batchmean")
    ce_fct = LigerCrossEntropyLoss()

    def liger_loss(s_start, s_end, start_positions, end_positions, t_start, t_end,
                   temperature=2.0, alpha_ce=0.5, alpha_kd=0.5):
        T = temperature
        # KL first: Liger's cross-entropy writes its gradient into its input in place during the
        # forward, so the student logits must have been consumed by log_softmax before it runs.
        kd_start = kd_fct(F.log_softmax(s_start / T, dim=-1), F.softmax(t_start / T, dim=-1)) * (T ** 2)
        kd_end = kd_fct(F.log_softmax(s_end / T, dim=-1), F.softmax(t_end / T, dim=-1)) * (T ** 2)
        kd = (kd_start + kd_end) / 2.0
        ce = (ce_fct(s_start, start_positions) + ce_fct(s_end, end_positions)) / 2.0
        return alpha_ce * ce + alpha_kd * kd

    return liger_loss


def make_triton_loss():
    from kdqa.loss import qa_distillation_loss

    def triton_loss(s_start, s_end, start_positions, end_positions, t_start, t_end,
                    temperature=2.0, alpha_ce=0.5, alpha_kd=0.5):
        return qa_distillation_loss(s_start, s_end, start_positions, end_positions, t_start, t_end,
                                    temperature=temperature, alpha_ce=alpha_ce, alpha_kd=alpha_kd,
                                    impl="triton").loss

    return triton_loss


def make_inputs(batch: int, length: int, dtype: torch.dtype, device: str, seed: int):
    """Fresh random inputs: normal logits (student scale 2, teacher scale 3), uniform positions."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def logits(scale):
        return (torch.randn(batch, length, generator=gen) * scale).to(device=device, dtype=dtype)

    inputs = {
        "s_start": logits(2.0).requires_grad_(True),
        "s_end": logits(2.0).requires_grad_(True),
        "start_positions": torch.randint(0, length, (batch,), generator=gen).to(device),
        "end_positions": torch.randint(0, length, (batch,), generator=gen).to(device),
        "t_start": logits(3.0),
        "t_end": logits(3.0),
    }
    return inputs


def clone_inputs(inputs):
    out = {}
    for k, v in inputs.items():
        c = v.detach().clone()
        if v.requires_grad:
            c.requires_grad_(True)
        out[k] = c
    return out


def call(fn, inputs, args):
    return fn(inputs["s_start"], inputs["s_end"], inputs["start_positions"], inputs["end_positions"],
              inputs["t_start"], inputs["t_end"], temperature=args.temperature,
              alpha_ce=args.alpha_ce, alpha_kd=args.alpha_kd)


def check_agreement(fn, inputs, args):
    """(relative loss error, max gradient error relative to max |reference gradient|) against the
    eager formulation in float32 on the same values."""
    ref_in = {k: (v.detach().float().clone() if v.is_floating_point() else v.clone()) for k, v in inputs.items()}
    ref_in["s_start"].requires_grad_(True)
    ref_in["s_end"].requires_grad_(True)
    ref_loss = call(seed_distillation_loss, ref_in, args)
    ref_loss.backward()
    test_in = clone_inputs(inputs)
    loss = call(fn, test_in, args)
    loss.backward()
    loss_v, ref_v = float(loss.detach()), float(ref_loss.detach())
    loss_err = abs(loss_v - ref_v) / max(abs(ref_v), 1e-12)
    grad_err = 0.0
    for name in ("s_start", "s_end"):
        ref_g = ref_in[name].grad
        g = test_in[name].grad.float()
        scale = float(ref_g.abs().max()) or 1.0
        grad_err = max(grad_err, float((g - ref_g).abs().max()) / scale)
    return loss_err, grad_err


def tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


class Timer:
    """do_bench on CUDA (median ms); perf_counter median on the CPU (do_bench needs CUDA)."""

    def __init__(self, device: str, warmup_ms: int, rep_ms: int, cpu_reps: int):
        self.device = device
        self.warmup_ms, self.rep_ms, self.cpu_reps = warmup_ms, rep_ms, cpu_reps

    def __call__(self, fn, grad_to_none=None) -> float:
        if self.device == "cuda":
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grad_to_none,
                                  return_mode="median"))
        times = []
        fn()  # warm-up
        for _ in range(self.cpu_reps):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def count_launches(fn, inputs, args):
    """{pass: device launches} of one call after a warm-up: the CUDA kernels, copies and memsets
    the profiler sees on a GPU; on the CPU, the aten ops that would launch one plus the Triton
    launches (``kdqa.kernels.launch_count``).  The gradient seed is made outside the count."""
    test_in = clone_inputs(inputs)
    leaves = [test_in["s_start"], test_in["s_end"]]
    seed = torch.ones((), device=args.device)
    torch.autograd.grad(call(fn, test_in, args), leaves, grad_outputs=seed)  # warm-up

    if args.device == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        def counted(step):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                result = step()
                torch.cuda.synchronize()
            return result, sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    else:
        from kdqa.kernels.launch_count import count_launches as counter

        def counted(step):
            with counter() as c:
                result = step()
            return result, c.total

    loss, fwd = counted(lambda: call(fn, test_in, args))
    _, bwd = counted(lambda: torch.autograd.grad(loss, leaves, grad_outputs=seed))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def bench_case(fn, inputs, args, timer, passes):
    """Times the requested passes of one impl on one input set; returns {pass: ms} and peak memory."""
    leaves = [inputs["s_start"], inputs["s_end"]]
    out = {}

    def fwd():
        return call(fn, inputs, args)

    def fwd_bwd():
        call(fn, inputs, args).backward()

    if "fwd" in passes:
        out["fwd"] = timer(fwd, grad_to_none=leaves)
    if "bwd" in passes:
        loss = call(fn, inputs, args)
        out["bwd"] = timer(lambda: loss.backward(retain_graph=True), grad_to_none=leaves)
        del loss
    if "fwd+bwd" in passes:
        out["fwd+bwd"] = timer(fwd_bwd, grad_to_none=leaves)
    peak_mb = extra_mb = float("nan")
    if args.device == "cuda":
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        peak_mb, extra_mb = peak / 2**20, (peak - before) / 2**20
        for t in leaves:
            t.grad = None
    return out, peak_mb, extra_mb


def bytes_moved(batch, length, dtype, pass_name):
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = batch * length
    return (4 if pass_name == "fwd" else 6) * n * itemsize


def copy_bandwidth(nbytes, device, timer):
    """GB/s of dst.copy_(src) for a buffer of nbytes/2 (read once + written once = nbytes)."""
    half = max(nbytes // 2, 1)
    src = torch.randint(0, 255, (half,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * half / (ms * 1e-3) / 1e9


def build_shapes(args):
    shapes = []
    if args.smoke:
        return list(SMOKE_SHAPES)
    if "qa" in args.kinds:
        shapes += [("qa", b, l) for l in args.qa_lengths for b in args.qa_batches]
    if "long" in args.kinds:
        shapes += [("long", r, l) for r, l in args.long_shapes]
    return shapes


def parse_shape_list(text):
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        rows, length = part.lower().split("x")
        out.append((int(rows), int(length)))
    return out


def parse_args(argv=None):
    p = parser(__doc__, out_help="folder for bench_loss.csv / .md / .png")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check in seconds: Triton interpreter, two tiny shapes (2x384 QA, 4x1024 long), "
                        "perf_counter timing, fp32 and bf16, torch.compile with --smoke_compile_backend; "
                        "exits 1 if the impls disagree")
    p.add_argument("--impls", default=",".join(ALL_IMPLS),
                   help="comma-separated subset of triton,eager,compile,liger (liger is skipped when not importable)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated subset of bf16,fp32,fp16")
    p.add_argument("--kinds", default="qa,long", help="which shape families: qa, long or both")
    p.add_argument("--qa_batches", default=",".join(map(str, QA_BATCHES)), help="batch sizes of the QA shapes")
    p.add_argument("--qa_lengths", default=",".join(map(str, QA_LENGTHS)), help="sequence lengths of the QA shapes")
    p.add_argument("--long_shapes", default=",".join(f"{r}x{l}" for r, l in LONG_SHAPES),
                   help="long-row shapes ROWSxL (start and end logits are each [ROWS, L])")
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated subset of fwd,bwd,fwd+bwd")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    p.add_argument("--alpha_ce", type=float, default=0.5, help="weight of the cross-entropy term")
    p.add_argument("--alpha_kd", type=float, default=0.5, help="weight of the KL term")
    p.add_argument("--warmup_ms", type=int, default=25, help="do_bench warm-up time (ms, CUDA)")
    p.add_argument("--rep_ms", type=int, default=100, help="do_bench measuring time (ms, CUDA)")
    p.add_argument("--cpu_reps", type=int, default=3, help="timed repetitions per measurement on the CPU (median)")
    p.add_argument("--compile_mode", default="default",
                   help="torch.compile mode of the compiled reference (default, max-autotune-no-cudagraphs, ...)")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend outside --smoke")
    p.add_argument("--smoke_compile_backend", default="eager",
                   help="torch.compile backend under --smoke (eager: traces with dynamo, no C++/Triton code "
                        "generation, so it stays within seconds on the CPU; inductor: the real thing, slower)")
    p.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available (cpu under --smoke)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = p.parse_args(argv)
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [i for i in args.impls if i not in ALL_IMPLS]
    if bad:
        p.error(f"unknown --impls {bad}; choose from {ALL_IMPLS}")
    args.dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown --dtypes {bad}; choose from {list(DTYPES)}")
    args.kinds = [s.strip() for s in args.kinds.split(",") if s.strip()]
    args.qa_batches = [int(x) for x in args.qa_batches.split(",") if x.strip()]
    args.qa_lengths = [int(x) for x in args.qa_lengths.split(",") if x.strip()]
    args.long_shapes = parse_shape_list(args.long_shapes)
    args.passes = [s.strip() for s in args.passes.split(",") if s.strip()]
    bad = [x for x in args.passes if x not in PASSES]
    if bad:
        p.error(f"unknown --passes {bad}; choose from {PASSES}")
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    return args


def environment(args):
    import triton
    return {
        "device": device_name(args.device),
        "date": utc_date(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "-",
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "command": command_line(),
    }


CSV_FIELDS = ["kind", "dtype", "batch", "seq_len", "impl", "pass", "ms", "launches", "peak_mb", "extra_mb",
              "bytes", "gbps", "copy_gbps", "pct_copy", "loss_err", "max_err", "agrees", "note"]


def write_markdown(path, rows, env, args, impls):
    lines = [f"# bench_loss ({'SMOKE, CPU, Triton interpreter: timings say nothing about the GPU' if args.smoke else 'full'})", ""]
    lines += environment_lines(env, ("device", "date", "torch", "triton", "cuda", "python", "triton_interpret", "command"))
    lines.append(f"- loss: T={args.temperature}, alpha_ce={args.alpha_ce}, alpha_kd={args.alpha_kd}; "
                 "times in ms (median), each followed by the impl's device launches in brackets "
                 "(CUDA kernels, copies and memsets seen by the profiler; on the CPU, launching aten ops + "
                 "Triton launches); speed-up = other impl's time / triton's time")
    lines.append("- bytes (GB/s): forward 4*B*L*itemsize (read student+teacher start/end logits); backward and "
                 "forward+backward 6*B*L*itemsize (also write the 2 gradients); copy = `dst.copy_(src)` of the same bytes")
    lines.append("")
    index = {(r["kind"], r["dtype"], r["batch"], r["seq_len"], r["impl"], r["pass"]): r for r in rows}
    cases = []
    for r in rows:
        key = (r["kind"], r["dtype"], r["batch"], r["seq_len"])
        if key not in cases:
            cases.append(key)
    summary = []
    for pass_name in args.passes:
        lines.append(f"## {pass_name}")
        lines.append("")
        head = ["kind", "dtype", "B", "L"] + [f"{i} ms" for i in impls] + ["vs eager", "vs compile"]
        if "liger" in impls:
            head.append("vs liger")
        head += ["triton GB/s", "copy GB/s", "% of copy", "triton peak MB", "eager peak MB", "agree"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for kind, dtype, b, l in cases:
            get = lambda impl: index.get((kind, dtype, b, l, impl, pass_name))  # noqa: E731
            tri = get("triton")
            cells = [kind, dtype, str(b), str(l)]
            for impl in impls:
                r = get(impl)
                if r and r["ms"] is not None:
                    cells.append(fmt(r["ms"]) + (f" ({r['launches']})" if r["launches"] is not None else ""))
                else:
                    cells.append(r["note"] if r else "-")

            def ratio(other):
                o = get(other)
                if tri and o and tri["ms"] and o["ms"]:
                    return o["ms"] / tri["ms"]
                return None
            ve, vc = ratio("eager"), ratio("compile")
            cells += [fmt(ve) + "x" if ve else "-", fmt(vc) + "x" if vc else "-"]
            if "liger" in impls:
                vl = ratio("liger")
                cells.append(fmt(vl) + "x" if vl else "-")
            cells += [fmt(tri["gbps"]) if tri else "-", fmt(tri["copy_gbps"]) if tri else "-",
                      (fmt(tri["pct_copy"]) + "%") if tri and tri["pct_copy"] is not None else "-",
                      fmt(tri["peak_mb"]) if tri else "-",
                      fmt(get("eager")["peak_mb"]) if get("eager") else "-"]
            agrees = [index[(kind, dtype, b, l, i, pass_name)]["agrees"] for i in impls
                      if (kind, dtype, b, l, i, pass_name) in index]
            cells.append("yes" if all(a == "yes" for a in agrees if a != "-") else "NO")
            lines.append("| " + " | ".join(cells) + " |")
            if pass_name == "fwd+bwd":
                summary.append((kind, dtype, ve, vc, tri["pct_copy"] if tri else None))
        lines.append("")
    if summary:
        lines.append("## Against the targets of issue 5 (forward+backward)")
        lines.append("")
        qa_e = [s[2] for s in summary if s[0] == "qa" and s[2]]
        qa_c = [s[3] for s in summary if s[0] == "qa" and s[3]]
        long_p = [s[4] for s in summary if s[0] == "long" and s[4] is not None]
        if qa_e:
            lines.append(f"- QA shapes, speed-up vs eager (target >= 5x): min {min(qa_e):.2f}x, median {statistics.median(qa_e):.2f}x")
        if qa_c:
            lines.append(f"- QA shapes, speed-up vs torch.compile (target >= 1.5x): min {min(qa_c):.2f}x, median {statistics.median(qa_c):.2f}x")
        if long_p:
            lines.append(f"- long rows, bandwidth as % of the copy (target >= 80%): min {min(long_p):.1f}%, median {statistics.median(long_p):.1f}%")
        if args.smoke:
            lines.append("- (smoke run on the CPU under the interpreter: these ratios are not GPU results)")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path, rows, args, impls):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [d for d in args.dtypes if any(r["dtype"] == d for r in rows)] or args.dtypes
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for n, impl in enumerate(impls):
            color = f"C{n}"
            for kind, marker, style in (("qa", "o", "-"), ("long", "s", "--")):
                pts = sorted((r["batch"] * r["seq_len"], r["ms"]) for r in rows
                             if r["dtype"] == dtype and r["impl"] == impl and r["kind"] == kind
                             and r["pass"] == "fwd+bwd" and r["ms"])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style, color=color,
                            label=f"{impl} ({kind})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("B x L (elements per logit tensor)")
        ax.set_ylabel("forward+backward time (ms, median)")
        ax.set_title(f"QA distillation loss, {dtype}" + (" (smoke, CPU)" if args.smoke else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --smoke on the CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        torch.set_num_threads(1)  # a correctness check: one thread avoids oversubscribing a shared CI machine
    if args.smoke:
        args.dtypes = ["fp32", "bf16"]
        args.compile_backend = args.smoke_compile_backend
    try:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    except AttributeError:
        pass

    fns = {}
    for impl in args.impls:
        if impl == "triton":
            fns[impl] = make_triton_loss()
        elif impl == "eager":
            fns[impl] = seed_distillation_loss
        elif impl == "liger":
            if args.device != "cuda":
                print("note: skipping liger (its kernels need CUDA)")
                continue
            fn = make_liger_loss()
            if fn is not None:
                fns[impl] = fn
        elif impl == "compile":
            fns[impl] = None  # compiled per case (fresh dynamo cache), see below
    impls = [i for i in args.impls if i in fns]

    timer = Timer(args.device, args.warmup_ms, args.rep_ms, args.cpu_reps)
    env = environment(args)
    print(f"bench_loss on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"TRITON_INTERPRET={env['triton_interpret']})")
    rows = []
    failures = []
    case_id = 0
    for kind, batch, length in build_shapes(args):
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            case_id += 1
            copy_bw = {}
            if args.device == "cuda":
                torch.cuda.empty_cache()
            for pass_name in args.passes:
                nbytes = bytes_moved(batch, length, dtype, pass_name)
                if nbytes not in copy_bw:
                    try:
                        copy_bw[nbytes] = copy_bandwidth(nbytes, args.device, timer)
                    except torch.cuda.OutOfMemoryError:
                        copy_bw[nbytes] = float("nan")
            for impl in impls:
                fn = fns[impl]
                if impl == "compile":
                    torch._dynamo.reset()
                    fn = torch.compile(seed_distillation_loss, backend=args.compile_backend,
                                       mode=None if args.compile_backend != "inductor" or args.compile_mode == "default"
                                       else args.compile_mode)
                row_base = {"kind": kind, "dtype": dname, "batch": batch, "seq_len": length, "impl": impl}
                try:
                    inputs = make_inputs(batch, length, dtype, args.device, seed=args.seed * 1000 + case_id)
                    loss_err, grad_err = check_agreement(fn, inputs, args)
                    agrees = loss_err <= tolerance(dtype) and grad_err <= tolerance(dtype)
                    if not agrees:
                        failures.append(f"{impl} {kind} {dname} {batch}x{length}: loss_err={loss_err:.2e} grad_err={grad_err:.2e}")
                    times, peak_mb, extra_mb = bench_case(fn, inputs, args, timer, args.passes)
                    launches = count_launches(fn, inputs, args)
                    note = ""
                except torch.cuda.OutOfMemoryError:
                    times, peak_mb, extra_mb, launches = {}, float("nan"), float("nan"), {}
                    loss_err = grad_err = agrees = None
                    note = "OOM"
                except Exception as err:  # an impl that cannot run this case is recorded, not fatal
                    if args.smoke:
                        raise
                    times, peak_mb, extra_mb, launches = {}, float("nan"), float("nan"), {}
                    loss_err = grad_err = agrees = None
                    note = f"error: {type(err).__name__}"
                    print(f"  {impl} {kind} {dname} {batch}x{length}: {type(err).__name__}: {err}")
                finally:
                    inputs = None
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                for pass_name in args.passes:
                    ms = times.get(pass_name)
                    nbytes = bytes_moved(batch, length, dtype, pass_name)
                    gbps = nbytes / (ms * 1e-3) / 1e9 if ms else None
                    cbw = copy_bw.get(nbytes)
                    rows.append({**row_base, "pass": pass_name, "ms": ms, "launches": launches.get(pass_name),
                                 "peak_mb": peak_mb, "extra_mb": extra_mb,
                                 "bytes": nbytes, "gbps": gbps, "copy_gbps": cbw,
                                 "pct_copy": 100.0 * gbps / cbw if gbps and cbw and not math.isnan(cbw) else None,
                                 "loss_err": loss_err, "max_err": grad_err,
                                 "agrees": "-" if agrees is None else ("yes" if agrees else "no"), "note": note})
                print(f"  {kind:4s} {dname:4s} B={batch:<5d} L={length:<6d} {impl:8s} "
                      + " ".join(f"{p}={times[p]:.3f}ms ({launches[p]} launches)" for p in args.passes if p in times)
                      + (f"  err={grad_err:.1e}" if grad_err is not None else "") + (f" {note}" if note else ""))
    csv_path = os.path.join(args.out, "bench_loss.csv")
    write_csv(csv_path, rows, CSV_FIELDS)
    md_path = os.path.join(args.out, "bench_loss.md")
    write_markdown(md_path, rows, env, args, impls)
    png_path = os.path.join(args.out, "bench_loss.png")
    write_plot(png_path, rows, args, impls)
    print(f"wrote {csv_path}, {md_path}, {png_path}")
    if failures:
        print("impls disagree with the float32 eager reference:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
