"""End to end on real data: fine-tune the packaged all-MiniLM-L6-v2 for a few dozen steps on a
slice of the shared SQuAD train set, evaluate on a slice of the dev set, all through train.py."""

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_py(*argv, cwd):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.real_data
@pytest.mark.slow
def test_finetune_minilm_on_a_slice_of_squad_through_train_py(squad_train_file, squad_dev_file, minilm_dir, tmp_path):
    common = ["--validation_file", squad_dev_file, "--max_eval_samples", 100, "--max_seq_length", 256,
              "--doc_stride", 128, "--disable_tqdm"]
    started = time.perf_counter()
    _train_py("finetune", "--model_name_or_path", minilm_dir, "--train_file", squad_train_file,
              "--max_train_samples", 400, "--per_device_train_batch_size", 8, "--max_steps", 40,
              "--learning_rate", 1e-4, "--warmup_ratio", 0.1, "--logging_steps", 5, "--output_dir",
              tmp_path / "ft", *common, cwd=tmp_path)
    elapsed = time.perf_counter() - started
    after = json.loads((tmp_path / "ft" / "eval_results.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"\nMiniLM, 40 steps of batch 8 on 400 train questions, dev slice of 100: EM/F1 "
          f"{after['exact_match']:.1f}/{after['f1']:.1f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {elapsed:.0f} s")
    assert after["total"] == 100 and after["missing"] == 0
    assert 0 <= after["exact_match"] <= after["f1"] <= 100
    assert losses[-1] < losses[0] - 0.5
    predictions = json.loads((tmp_path / "ft" / "eval_predictions.json").read_text())
    assert len(predictions) == 100
    from kdqa.data import load_squad_json
    from kdqa.dev_sample import take_sample

    contexts = {ex["id"]: ex["context"] for ex in take_sample(load_squad_json(squad_dev_file), 100)[0]}
    assert set(predictions) == set(contexts)  # 100 spread over the file: not the first article alone
    assert all(text and text in contexts[qid] for qid, text in predictions.items())
    # The official-style command line scores the same predictions the same way.
    proc = subprocess.run([sys.executable, "-m", "kdqa.evaluate", squad_dev_file,
                           str(tmp_path / "ft" / "eval_predictions.json")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    # Only 100 of the 10,570 dev questions were predicted: the rest count as wrong.
    official = json.loads(proc.stdout)
    assert official["f1"] == pytest.approx(after["f1"] * 100 / 10570, rel=1e-6)
