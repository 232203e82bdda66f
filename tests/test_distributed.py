"""Data-parallel training on the CPU: torchrun, two processes, gloo.

Two ranks with batch 4 must train exactly like one process with batch 8 (within float32
tolerance), and both ranks must end with identical parameters.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(tmp_path, out, nproc, batch, *extra):
    root = tmp_path
    argv = ["finetune", "--model_name_or_path", str(root / "model"), "--train_file", str(root / "train.json"),
            "--validation_file", str(root / "dev.json"), "--output_dir", str(out), "--max_seq_length", "64",
            "--doc_stride", "32", "--per_device_train_batch_size", str(batch), "--max_steps", "6",
            "--logging_steps", "1", "--learning_rate", "1e-3", "--adam_epsilon", "1e-4", "--loss_impl", "torch",
            "--disable_tqdm", "--eval_strategy", "epoch", "--save_steps", "3", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", KDQA_TRACEBACK="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO, "train.py"), *argv]
    else:
        cmd = [sys.executable, os.path.join(REPO, "train.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # Dropout off: each rank draws its own dropout masks, which one process cannot reproduce.
    make_model_folder(str(root / "model"), tiny_bert_config(dropout=0.0))
    write_squad(str(root / "train.json"), make_name_task(96, seed=11))
    write_squad(str(root / "dev.json"), make_name_task(24, seed=12, prefix="d"))
    return root


@pytest.mark.slow
def test_two_ranks_of_batch_4_match_one_process_of_batch_8(setup):
    _train(setup, setup / "single", 1, 8)
    _train(setup, setup / "ddp", 2, 4)
    single, ddp = _losses(setup / "single"), _losses(setup / "ddp")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, 7))
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-5)
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4)
    a, b = load_file(str(setup / "single" / "model.safetensors")), load_file(str(setup / "ddp" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst

    results = json.loads((setup / "ddp" / "train_results.json").read_text())
    checksums = results["rank_param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    # Rank 0 alone wrote the outputs and evaluated on the whole dev set.
    evals = json.loads((setup / "ddp" / "eval_results.json").read_text())
    single_evals = json.loads((setup / "single" / "eval_results.json").read_text())
    assert evals["total"] == 24 and evals["f1"] == pytest.approx(single_evals["f1"], abs=1e-6)
    assert sorted(n for n in os.listdir(setup / "ddp") if n.startswith("checkpoint-")) == ["checkpoint-3",
                                                                                          "checkpoint-6"]


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(setup):
    out = setup / "ddp-resume"
    _train(setup, out, 2, 4)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "finetune", "--model_name_or_path", str(setup / "model"),
         "--train_file", str(setup / "train.json"), "--validation_file", str(setup / "dev.json"),
         "--output_dir", str(out), "--max_seq_length", "64", "--doc_stride", "32",
         "--per_device_train_batch_size", "4", "--max_steps", "6", "--resume_from_checkpoint", "latest",
         "--disable_tqdm"], capture_output=True, text=True, timeout=300, cwd=setup)
    assert proc.returncode == 1
    assert "written by a run with 2 process(es), this run has 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_ranks_in_sync_names_diverged_checksums(monkeypatch):
    """Every rank's parameter checksum is gathered; unequal ones stop the run, naming them."""
    from kdqa.distributed import DistState, check_ranks_in_sync

    model = torch.nn.Linear(3, 2)
    offsets = iter([0.0, 1.0])

    def fake_all_gather(gathered, checksum):
        for g, offset in zip(gathered, offsets):
            g.copy_(checksum + offset)

    monkeypatch.setattr(torch.distributed, "all_gather", fake_all_gather)
    with pytest.raises(RuntimeError, match="ranks ended with different parameters"):
        check_ranks_in_sync(model, DistState(rank=0, world_size=2))
    monkeypatch.setattr(torch.distributed, "all_gather", lambda gathered, c: [g.copy_(c) for g in gathered])
    values = check_ranks_in_sync(model, DistState(rank=0, world_size=2))
    assert len(values) == 2 and values[0] == values[1]
