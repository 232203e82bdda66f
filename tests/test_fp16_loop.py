"""The fp16 (gradient scaler) and bf16 training loops, driven on the CPU before they meet a GPU.

``--precision fp16`` is CUDA-only for users; ``kdqa.precision.CPU_FP16_FOR_TESTS`` lets these tests
run the real loop with float16 autocast and an enabled ``torch.amp.GradScaler("cpu")``.  The scaler
is given a huge initial scale (so the first steps overflow) and a short growth interval (so the
scale grows back within a few steps).  Tiny models, a handful of steps each.
"""

import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from kdqa.config import parse_args
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

INIT_SCALE = 2.0 ** 19  # float16 gradients times this overflow on the first steps (tiny models)
GROWTH_INTERVAL = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    return {
        "train": write_squad(str(root / "train.json"), make_name_task(48, seed=1, prefix="t")),
        "dev": write_squad(str(root / "dev.json"), make_name_task(8, seed=2, prefix="d")),
        "teacher": make_model_folder(str(root / "teacher"), tiny_bert_config(layers=2, dropout=0.0), seed=7),
        "student": make_model_folder(str(root / "student"), tiny_bert_config(layers=1, dropout=0.1), seed=1),
    }


@pytest.fixture
def cpu_fp16(monkeypatch):
    """fp16 allowed on the CPU, the scaler starting high and growing back after 2 good steps; every
    optimizer step's scale (read after the step, test-side) recorded in order."""
    import kdqa.precision
    import kdqa.trainer as trainer

    monkeypatch.setattr(kdqa.precision, "CPU_FP16_FOR_TESTS", True)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(
        torch.amp.GradScaler, init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL))
    scales = []
    real_step = trainer.optimizer_step

    def recording_step(run):
        real_step(run)
        scales.append(run.scaler.get_scale() if run.scaler.is_enabled() else None)

    monkeypatch.setattr(trainer, "optimizer_step", recording_step)
    return scales


def train(setup, out, command, *extra, interrupt=None):
    import kdqa.trainer as trainer

    argv = [command, "--train_file", setup["train"], "--validation_file", setup["dev"],
            "--output_dir", str(out), "--model_name_or_path", setup["student"], "--max_seq_length", "48",
            "--doc_stride", "16", "--disable_tqdm", "--per_device_train_batch_size", "8",
            "--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--eval_strategy", "no",
            "--learning_rate", "1e-3", *map(str, extra)]
    if command == "distill":
        argv += ["--teacher_model_name_or_path", setup["teacher"]]
    trainer.INTERRUPT_AFTER_STEP = interrupt
    try:
        return trainer.train(parse_args(argv))
    finally:
        trainer.INTERRUPT_AFTER_STEP = None


def log_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def assert_same_model(a, b):
    ma, mb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_fp16_overflow_steps_are_skipped_counted_and_the_scale_grows_back(setup, tmp_path, cpu_fp16):
    out = tmp_path / "fp16"
    results = train(setup, out, "finetune", "--precision", "fp16", "--loss_impl", "torch")
    scales = [INIT_SCALE] + cpu_fp16
    halved = [i for i in range(1, len(scales)) if scales[i] == scales[i - 1] / 2]
    grown = [i for i in range(1, len(scales)) if scales[i] == scales[i - 1] * 2]
    assert halved, f"no overflow step: {scales}"
    assert grown and grown[-1] > halved[0], f"the scale never grew back: {scales}"
    # Every halving is one skipped step, counted on the device and logged cumulatively per step.
    assert results["skipped_steps"] == len(halved)
    log = log_of(out)
    assert [r["skipped_steps"] for r in log] == [sum(1 for h in halved if h <= r["step"]) for r in log]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # The scaler state is checkpointed with the scale reached at that step.
    state = torch.load(out / "checkpoint-8" / "scaler.pt", weights_only=True)
    assert state["scale"] == scales[8] and state["growth_interval"] == GROWTH_INTERVAL


def test_fp16_kill_and_resume_is_bit_identical(setup, tmp_path, cpu_fp16):
    common = ("--precision", "fp16", "--loss_impl", "torch")
    train(setup, tmp_path / "full", "finetune", *common)
    full_scales = list(cpu_fp16)
    cpu_fp16.clear()
    assert train(setup, tmp_path / "cut", "finetune", *common, interrupt=4) == {"interrupted_at_step": 4}
    results = train(setup, tmp_path / "cut", "finetune", *common, "--resume_from_checkpoint", "latest")
    # The resumed run went on from the checkpointed scale (not from INIT_SCALE again).
    assert cpu_fp16 == full_scales
    assert_same_model(tmp_path / "full", tmp_path / "cut")
    assert [r["loss"] for r in log_of(tmp_path / "cut")] == [r["loss"] for r in log_of(tmp_path / "full")]
    assert results["skipped_steps"] == sum(1 for a, b in zip([INIT_SCALE] + full_scales, full_scales) if b < a)


def test_fp16_fused_loss_and_hidden_term_train(setup, tmp_path, cpu_fp16):
    """Distillation under float16 autocast through the fused kernel (interpreter) with the
    hidden-state term: finite terms, the kernel's KD equal to the reference's on the same run."""
    common = ("--precision", "fp16", "--alpha_hidden", "0.5", "--max_steps", "3", "--save_steps", "3")
    train(setup, tmp_path / "triton", "distill", *common, "--loss_impl", "triton")
    train(setup, tmp_path / "torch", "distill", *common, "--loss_impl", "torch")
    fused, ref = log_of(tmp_path / "triton"), log_of(tmp_path / "torch")
    for r in fused:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "ce", "kd", "hidden"))
        assert r["kd"] > 0 and r["hidden"] > 0
    assert [r["kd"] for r in fused] == pytest.approx([r["kd"] for r in ref], rel=1e-3, abs=1e-5)
    assert [r["hidden"] for r in fused] == pytest.approx([r["hidden"] for r in ref], rel=1e-3)


@pytest.mark.parametrize("mode", ["finetune", "distill-cache", "distill-hidden"])
def test_bf16_runs_and_resumes_bit_exact(setup, tmp_path, mode):
    command = "finetune" if mode == "finetune" else "distill"
    extra = ["--precision", "bf16", "--loss_impl", "torch"]
    if mode == "distill-cache":
        extra += ["--teacher_logits_cache", str(tmp_path / "cache")]
    if mode == "distill-hidden":
        extra += ["--alpha_hidden", "0.5"]
    results = train(setup, tmp_path / "full", command, *extra)
    assert results["skipped_steps"] == 0  # no scaler in bf16
    assert train(setup, tmp_path / "cut", command, *extra, interrupt=4) == {"interrupted_at_step": 4}
    train(setup, tmp_path / "cut", command, *extra, "--resume_from_checkpoint", "latest")
    assert_same_model(tmp_path / "full", tmp_path / "cut")
    full, cut = log_of(tmp_path / "full"), log_of(tmp_path / "cut")
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in full)
    if mode == "distill-cache":
        assert len(os.listdir(tmp_path / "cache")) == 1  # the resumed run reused the cache


def test_fp16_on_the_cpu_stays_refused_for_users():
    from kdqa.precision import resolve_precision

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def test_fp16_steps_read_the_scale_back_only_when_saving(setup, tmp_path, monkeypatch):
    """The skipped-step count stays on the device: no per-step ``get_scale()`` host read (the
    scaler's ``state_dict`` reads it once per checkpoint)."""
    import kdqa.precision

    monkeypatch.setattr(kdqa.precision, "CPU_FP16_FOR_TESTS", True)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(
        torch.amp.GradScaler, init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL))
    reads = []
    real_get_scale = torch.amp.grad_scaler.GradScaler.get_scale
    monkeypatch.setattr(torch.amp.grad_scaler.GradScaler, "get_scale",
                        lambda self: reads.append(1) or real_get_scale(self))
    results = train(setup, tmp_path / "out", "finetune", "--precision", "fp16", "--loss_impl", "torch",
                    "--max_steps", "6", "--save_steps", "6", "--logging_steps", "3")
    assert results["skipped_steps"] >= 1
    assert len(reads) <= 1, f"{len(reads)} host reads of the scale in 6 steps and 1 checkpoint"
