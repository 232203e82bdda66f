"""Compile the fused loss's kernels for real GPUs on a machine without one, and read their resources.

Triton compiles ahead of time from a target description alone (its ptxas ships in the wheel), and
``cuobjdump -res-usage`` (also in the wheel) reads registers and local memory (spills) from the
cubin.  The variants are the launcher's own: ``plan_forward`` is called on small CPU tensors for
every blocking that ``choose_blocking`` returns for any row length, and its arguments go through
Triton's own specialisation (the code path of a real launch) into ``triton.compile``.

Variants compiled, for each target: every blocking x every student dtype x (no teacher; a teacher
of the student's dtype; a teacher of another dtype with every input non-contiguous, the widest
variant), and the backward kernel for each student dtype.  The forward kernel has no mask axis
(without a mask it reads a row of ones with row stride 0, the same specialisation), no ``ce_rows``
axis (without it, the same row of ones with an unspecialised stride of 0; each forward variant is
checked to specialise identically with a real ``ce_rows``) and no int32/int64 axis (column offsets
are always int64), so those are covered too.  Every dtype appears as a teacher dtype; the remaining
dtype pairs, e.g. a float16 student with a bfloat16 teacher, differ from a compiled pair only in
the conversion instruction of the teacher's load.

Needs the compiler, not the interpreter: run it with TRITON_INTERPRET unset (the test starts it in
a subprocess for that reason).  ``python -m kdqa.kernels.compile_check --markdown`` prints the table of
``benchmarks/RESULTS.md``; ``--json`` prints one record per variant.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

TARGETS = (80, 90)
DTYPES = ("float32", "float16", "bfloat16")
OTHER_TEACHER = {"float32": "bfloat16", "float16": "float32", "bfloat16": "float32"}
BATCH = 32  # a typical batch: Triton specialises ints on == 1 and on divisibility by 16


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str  # fwd | bwd
    length: int  # a row length that makes the launcher choose this variant's blocking
    student: str
    teacher: str  # a dtype name, or "none"
    contiguous: bool

    def label(self) -> str:
        if self.kernel == "bwd":
            return f"bwd {self.student}"
        return (f"fwd L={self.length} s={self.student} t={self.teacher}"
                f"{'' if self.contiguous else ' strided'}")


def forward_blockings():
    """{blocking: largest row length that selects it}, over every length up to twice the
    single-block limit (beyond it the choice no longer changes).  The largest, so that Triton's
    value specialisation does not see the untypical L = 1."""
    from . import qa_distill

    found = {}
    for length in range(1, 2 * qa_distill.SINGLE_BLOCK_MAX + 1):
        found[qa_distill.choose_blocking(length)] = length
    return found


def variants():
    out = []
    for length in sorted(forward_blockings().values()):
        for student in DTYPES:
            out += [Variant("fwd", length, student, "none", True),
                    Variant("fwd", length, student, student, True),
                    Variant("fwd", length, student, OTHER_TEACHER[student], False)]
    out += [Variant("bwd", 1, d, "none", True) for d in DTYPES]
    return out


def _logits(B, L, dtype, contiguous):
    import torch

    if contiguous:
        return torch.zeros(B, L, dtype=dtype)
    return torch.zeros(L, B, dtype=dtype).t()  # column stride B


def launch_of(v: Variant, ce_rows: bool = False):
    """(kernel, positional args, keyword args) exactly as the launcher would launch them
    (``ce_rows``: with a per-row CE flag tensor, as transfer data gives)."""
    import torch
    from . import qa_distill

    if v.kernel == "bwd":
        grad = torch.zeros(2, BATCH, 384)
        g = torch.zeros(BATCH, 384, dtype=getattr(torch, v.student))
        return (qa_distill._qa_distill_bwd_kernel, (grad, torch.ones(()), g, g, BATCH * 384),
                dict(BLOCK=qa_distill.BWD_BLOCK, num_warps=4))
    B, L = BATCH, v.length
    s = [_logits(B, L, getattr(torch, v.student), v.contiguous) for _ in range(2)]
    t = [None, None]
    if v.teacher != "none":
        t = [_logits(B, L, getattr(torch, v.teacher), v.contiguous) for _ in range(2)]
    mask = _logits(B, L, torch.bool, v.contiguous)
    pos = torch.zeros(B, dtype=torch.int64)
    flags = torch.ones(2 * B, dtype=torch.bool)[::1 if v.contiguous else 2][:B] if ce_rows else None
    plan = qa_distill.plan_forward(s[0], s[1], pos, pos, t[0], t[1], mask, ce_rows=flags)
    return (qa_distill._qa_distill_fwd_kernel, plan.args,
            dict(plan.constexprs, num_warps=plan.num_warps))


def compile_variant(v: Variant, arch: int, num_warps=None) -> dict:
    """Compile one variant for sm_<arch> as a launch would, and read its resource usage
    (``num_warps`` overrides the launcher's, for the probe that shows the spill check works)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, args, kwargs = launch_of(v)
    if num_warps is not None:
        kwargs["num_warps"] = num_warps
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # The JIT's own specialisation of these arguments (types, constants, alignment attributes).
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    if v.kernel == "fwd" and binder(*launch_of(v, ce_rows=True)[1], **kwargs)[1] != specialization:
        raise RuntimeError(f"{v.label()}: ce_rows given and ce_rows=None specialise differently; "
                           "the compiled variants no longer cover both")
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    usage = resource_usage(compiled.asm["cubin"])
    return dict(dataclasses.asdict(v), arch=f"sm_{arch}", label=v.label(),
                num_warps=kwargs["num_warps"], block=kwargs.get("BLOCK"),
                single=kwargs.get("SINGLE", True), **usage)


def qa_distill_single_max() -> int:
    from . import qa_distill

    return qa_distill.SINGLE_BLOCK_MAX


def cuobjdump_path() -> str:
    import triton

    return triton.knobs.nvidia.cuobjdump.path


def resource_usage(cubin: bytes) -> dict:
    """Registers, local memory, stack frame and shared memory of the cubin's kernel, and its
    number of local-memory instructions (ptxas spills registers to the stack frame, which
    ``-res-usage`` shows as STACK, with STL/LDL in the SASS; LOCAL counts declared locals)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text, sass = (subprocess.run([cuobjdump_path(), flag, f.name], check=True,
                                     capture_output=True, text=True).stdout
                      for flag in ("-res-usage", "-sass"))
    found = {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", text)}
    missing = {"REG", "LOCAL"} - set(found)
    if missing:
        raise RuntimeError(f"cuobjdump -res-usage printed no {sorted(missing)}:\n{text}")
    return {"registers": found["REG"], "local_bytes": found["LOCAL"],
            "stack_bytes": found.get("STACK", 0), "shared_bytes": found.get("SHARED", 0),
            "local_instructions": len(re.findall(r"\b(?:STL|LDL)\b", sass))}


def spills(record: dict) -> bool:
    """Any local memory, stack frame or local load/store: registers did not suffice."""
    return bool(record["local_bytes"] or record["stack_bytes"] or record["local_instructions"])


def _compile_all(pairs):
    return [compile_variant(v, arch) for v, arch in pairs]


def compile_everything(workers: int):
    pairs = [(v, arch) for arch in TARGETS for v in variants()]
    if workers <= 1:
        return _compile_all(pairs)
    chunks = [pairs[i::workers] for i in range(workers)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = [r for part in pool.map(_compile_all, chunks) for r in part]
    order = {(v.label(), f"sm_{arch}"): i for i, (v, arch) in enumerate(pairs)}
    return sorted(results, key=lambda r: order[(r["label"], r["arch"])])


def markdown(results) -> str:
    """One row per variant, registers (and local bytes) for each target side by side."""
    by_label = {}
    for r in results:
        by_label.setdefault(r["label"], {})[r["arch"]] = r
    archs = [f"sm_{a}" for a in TARGETS]
    lines = ["| variant | block | warps | " + " | ".join(f"{a} regs / spill B" for a in archs)
             + " |",
             "|---|---|---|" + "---|" * len(archs)]
    for label, per_arch in by_label.items():
        first = next(iter(per_arch.values()))
        block = f"{first['block']}{'' if first['single'] else ' x2 passes'}"
        cells = [f"{per_arch[a]['registers']} / "
                 f"{per_arch[a]['local_bytes'] + per_arch[a]['stack_bytes']}" for a in archs]
        lines.append(f"| {label} | {block} | {first['num_warps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON record per variant")
    parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md table")
    parser.add_argument("--spill_probe", action="store_true",
                        help="compile only one variant squeezed into one warp (it must spill)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per CPU)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    if args.spill_probe:
        results = [compile_variant(Variant("fwd", qa_distill_single_max(), "float32", "float32",
                                           False), 80, num_warps=1)]
    else:
        results = compile_everything(args.workers)
    if args.json:
        print(json.dumps(results))
    if args.markdown or not args.json:
        print(markdown(results))
    spilled = [f"{r['label']} {r['arch']}" for r in results if spills(r)]
    if spilled:
        print("local memory (spills) in: " + ", ".join(spilled), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
