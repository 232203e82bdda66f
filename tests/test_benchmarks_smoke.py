"""The benchmarks' --smoke modes run on the CPU and produce well-formed outputs.

Each script runs in a subprocess (as CI and users run it) with TRITON_INTERPRET=1, writing into a
temporary folder. These tests check outputs, never timings: benchmarks measure, tests do not.
"""
import csv
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_smoke(script: str, out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--out", str(out), *extra],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{script} --smoke failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_csv(path: pathlib.Path, required: list[str]) -> list[dict]:
    assert path.is_file(), f"{path} was not written"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
    assert not missing, f"{path.name} lacks the columns {missing}"
    assert rows, f"{path.name} has a header but no rows"
    return rows


def assert_markdown_table(path: pathlib.Path, n_rows_at_least: int) -> str:
    assert path.is_file(), f"{path} was not written"
    text = path.read_text()
    assert text.startswith("# "), "the Markdown report has no title"
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert any(set(line.replace("|", "").strip()) <= set("-: ") for line in table), "no Markdown table separator"
    assert len(table) >= 2 + n_rows_at_least, f"the Markdown table has {len(table) - 2} rows"
    return text


def test_bench_loss_smoke(tmp_path):
    run_smoke("bench_loss.py", tmp_path)
    rows = read_csv(tmp_path / "bench_loss.csv",
                    ["kind", "dtype", "batch", "seq_len", "impl", "pass", "ms", "gbps", "copy_gbps", "agrees"])
    impls = {r["impl"] for r in rows}
    assert {"triton", "eager", "compile"} <= impls
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    assert all(r["agrees"] == "yes" for r in rows), "an implementation disagrees with the eager reference"
    assert all(float(r["ms"]) > 0 for r in rows)
    text = assert_markdown_table(tmp_path / "bench_loss.md", 4)
    assert "vs eager" in text and "vs compile" in text
    png = tmp_path / "bench_loss.png"
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC


def test_bench_train_smoke(tmp_path):
    proc = run_smoke("bench_train.py", tmp_path)
    rows = read_csv(tmp_path / "bench_train.csv",
                    ["variant", "features_per_s", "speedup_vs_usual", "peak_mb", "mfu_pct", "final_loss"])
    variants = [r["variant"] for r in rows]
    assert variants[0] == "usual" and {"ours", "+cache", "+group", "+sdpa", "all"} <= set(variants)
    for r in rows:
        assert float(r["features_per_s"]) > 0
        assert float(r["final_loss"]) == float(r["final_loss"])  # finite, not NaN
    by = {r["variant"]: r for r in rows}
    assert float(by["usual"]["mean_len_padded"]) == 384.0  # the usual recipe pads every batch to 384
    assert float(by["ours"]["mean_len_padded"]) < 384.0  # dynamic padding
    assert by["+cache"]["teacher"] == "cache" and float(by["+cache"]["cache_build_features_per_s"]) > 0
    text = assert_markdown_table(tmp_path / "bench_train.md", len(rows))
    assert "3-epoch distillation" in text
    proc_out = proc.stdout
    if importlib.util.find_spec("accelerate") is None:
        assert "skipped hf_trainer: Hugging Face's Trainer needs accelerate" in proc_out and "hf_trainer" not in by
        return
    hf = by["hf_trainer"]  # the real Trainer, at tiny size: as many optimizer steps as ours, a finite loss
    assert int(hf["optimizer_steps"]) == int(by["usual"]["optimizer_steps"]) == 3  # 1 warm-up + 2 timed
    assert float(hf["mean_len_padded"]) == 384.0 and float(hf["features_per_s"]) > 0
    assert float(hf["time_to_steps_s"]) >= float(hf["seconds"]) > 0
    assert all(float(r["speedup_vs_hf_trainer"]) > 0 for r in rows)
    assert "ours / hf_trainer:" in proc_out


def test_bench_train_hf_trainer_skipped_without_accelerate(tmp_path):
    """Where accelerate cannot be imported the HF row is skipped with one line; the other rows still run."""
    # sys.modules[name] = None is Python's own "not installed": import fails, find_spec returns None.
    launcher = ("import runpy, sys; sys.modules['accelerate'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    args = ["--smoke", "--out", str(tmp_path), "--variants", "usual,hf_trainer",
            "--train_file", str(tmp_path / "absent.json")]  # synthetic features: quicker
    proc = subprocess.run([sys.executable, "-c", launcher, str(BENCH / "bench_train.py"), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skip = [line for line in proc.stdout.splitlines() if line.startswith("skipped hf_trainer")]
    assert len(skip) == 1 and "pip install -e '.[bench]'" in skip[0], proc.stdout
    rows = read_csv(tmp_path / "bench_train.csv", ["variant", "features_per_s"])
    assert [r["variant"] for r in rows] == ["usual"]


def test_bench_inference_smoke(tmp_path):
    run_smoke("bench_inference.py", tmp_path)
    rows = read_csv(tmp_path / "bench_inference.csv",
                    ["model", "runtime", "precision", "questions", "wall_s", "ms_per_question", "speedup_vs_teacher",
                     "exact_match", "f1", "answered"])
    assert [(r["model"], r["runtime"], r["precision"]) for r in rows] == [
        ("teacher", "torch", "fp32"), ("student", "torch", "fp32"), ("student-int8", "torch", "int8"),
        ("student-onnx", "onnxruntime", "fp32"), ("student-onnx-int8", "onnxruntime", "int8")]
    for r in rows:
        assert int(r["questions"]) == 20 and int(r["answered"]) == 20
        assert float(r["wall_s"]) > 0 and 0 <= float(r["exact_match"]) <= float(r["f1"]) <= 100
    assert float(rows[0]["speedup_vs_teacher"]) == 1.0
    assert all(int(r["layers"]) < int(rows[0]["layers"]) for r in rows[1:])
    # The student in ONNX Runtime fp32 is the same function as in PyTorch: the same answers, the same scores.
    assert (rows[3]["exact_match"], rows[3]["f1"]) == (rows[1]["exact_match"], rows[1]["f1"])
    assert_markdown_table(tmp_path / "bench_inference.md", 5)


def load_script(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_teacher_cache_smoke(tmp_path):
    run_smoke("bench_teacher_cache.py", tmp_path)
    rows = read_csv(tmp_path / "bench_teacher_cache.csv", ["windows", "tokens", "seconds", "windows_per_s", "ranks"])
    assert len(rows) == 1 and int(rows[0]["windows"]) == 40 and int(rows[0]["ranks"]) == 1
    assert float(rows[0]["windows_per_s"]) > 0 and int(rows[0]["tokens"]) >= 40
    text = assert_markdown_table(tmp_path / "bench_teacher_cache.md", 1)
    assert "SMOKE" in text and "command: `python benchmarks/bench_teacher_cache.py --smoke" in text


@pytest.mark.parametrize("script", ["bench_loss.py", "bench_train.py", "bench_inference.py", "bench_teacher_cache.py"])
def test_help_documents_the_flags(script, capsys):
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--smoke" in text and "--out" in text and "default" in text
