"""benchmarks/gpu_check.sh --dry-run: every step of the one-call GPU check runs on the CPU (tiny
shapes, models and steps), so the script cannot rot before a GPU comes.  Checks outputs, never
timings."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_a_summary_that_comes_back(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    rows = [line.split("|")[1:-1] for line in summary.splitlines() if line.startswith("| ")]
    parts = {r[0].strip(): r[1].strip() for r in rows[1:] if len(r) == 5}
    assert set(parts) == {"install", "kernel_tests", "bench_loss", "train_bf16", "train_fp16", "recipe"}
    assert all(status in ("ok", "skipped") for status in parts.values()), parts
    assert parts["kernel_tests"] == parts["bench_loss"] == parts["train_bf16"] == parts["recipe"] == "ok"
    assert "- device:" in summary and "- torch " in summary and "- triton " in summary
    assert "| teacher" in summary  # the recipe's table made it into the summary
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in files)
    assert {"summary.md", "loss_bench_loss.csv", "train_bf16_bench_train.csv"} <= {p.name for p in files}


def test_prepare_refuses_a_folder_git_does_not_ignore(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--prepare",
                           str(REPO / "benchmarks" / "not-ignored-gpu-check")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    try:
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "is not git-ignored" in lines[0]
    finally:
        import shutil
        shutil.rmtree(REPO / "benchmarks" / "not-ignored-gpu-check", ignore_errors=True)
