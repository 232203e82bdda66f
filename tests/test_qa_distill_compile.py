"""The fused loss's kernels compile for real GPUs (sm_80, sm_90) on the CPU, without spilling.

``kdqa.kernels.compile_check`` compiles every variant the launcher can pick, through Triton's own
specialisation of the launcher's arguments, and reads registers and local memory from each cubin
with ``cuobjdump``.  It runs in a subprocess with TRITON_INTERPRET unset: under the interpreter
(which tests/conftest.py switches on without a GPU) ``triton.jit`` returns interpreted functions
that cannot be compiled.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest


triton = pytest.importorskip("triton")
from kdqa.kernels import compile_check, qa_distill  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool(name):
    """Path of an NVIDIA tool that Triton uses (shipped in its wheel), or None when absent."""
    try:
        path = getattr(triton.knobs.nvidia, name).path
    except Exception:  # an older Triton without knobs, or a wheel without the tool
        return shutil.which(name)
    return path if path and os.path.exists(path) else shutil.which(name)


def _compile_check(*args):
    """Run ``python -m kdqa.kernels.compile_check ARGS`` with the compiler (not the interpreter)."""
    missing = [t for t in ("ptxas", "cuobjdump") if _tool(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found (neither in the triton wheel nor on PATH)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 = its default
    proc = subprocess.run([sys.executable, "-m", "kdqa.kernels.compile_check", "--json", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode not in (0, 1):  # 1: compiled, but something spilled (asserted below)
        pytest.fail(f"compile_check failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[0])


@pytest.fixture(scope="module")
def compiled():
    return _compile_check()


@pytest.mark.slow
def test_every_launcher_variant_compiles_for_sm80_and_sm90(compiled):

    blocks = {(b.single, b.block, b.num_warps) for b in compile_check.forward_blockings()}
    seen = {(r["single"], r["block"], r["num_warps"]) for r in compiled if r["kernel"] == "fwd"}
    assert seen == blocks and len(blocks) >= 4  # every blocking the launcher uses, both paths
    assert {r["arch"] for r in compiled} == {"sm_80", "sm_90"}
    for kernel in ("fwd", "bwd"):
        assert {r["student"] for r in compiled if r["kernel"] == kernel} == set(compile_check.DTYPES)
    teachers = {r["teacher"] for r in compiled if r["kernel"] == "fwd"}
    assert teachers == set(compile_check.DTYPES) | {"none"}
    assert {r["contiguous"] for r in compiled} == {True, False}
    assert len(compiled) == 2 * len(compile_check.variants())
    assert all(r["registers"] > 0 for r in compiled)
    assert qa_distill.choose_blocking(384).block == 512  # the QA shape's variant is among them


@pytest.mark.slow
def test_no_variant_spills_registers(compiled):
    spilled = [f"{r['label']} {r['arch']}: {r['registers']} registers, "
               f"{r['stack_bytes']} B stack, {r['local_instructions']} local loads/stores"
               for r in compiled if compile_check.spills(r)]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


@pytest.mark.slow
def test_the_spill_check_sees_a_spilling_variant():
    """One warp holding a 2048-column row with a strided teacher (64 values per thread) must
    spill: proof that the check above can fail."""
    (probe,) = _compile_check("--spill_probe")
    assert compile_check.spills(probe), probe
