"""Kill a run anywhere, resume it, and get exactly what the run that never stopped gets.

A "kill" is an exception no code of kdqa catches (BaseException), raised at a chosen call of a
function the run goes through: while a metrics record is half written, in the middle of writing a
checkpoint (its checkpoint-N.tmp stays behind, as after kill -9), right after a checkpoint's
rename, during an evaluation, while the final model is written. The kill points are drawn with a
fixed seed from the calls the uninterrupted run made. One test also kills a real process with SIGKILL.
"""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import kdqa.checkpoint
import kdqa.reporting
import kdqa.run_outputs
import kdqa.trainer
from kdqa.config import parse_args
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_timing(key: str) -> bool:
    """Wall-clock measurements differ from run to run; everything else must match exactly."""
    return key.endswith(("per_second", "runtime_s", "memory_mb"))


class Killed(BaseException):
    """Stands for SIGKILL: nothing in kdqa catches it, so no clean-up code of the writer runs."""


def tiny_run_inputs(root, n_train: int, n_dev: int) -> dict:
    """Train and dev files of the synthetic task, a tiny student and a tiny teacher (dropout on)."""
    return {
        "train": write_squad(str(root / "train.json"), make_name_task(n_train, seed=11, prefix="t")),
        "dev": write_squad(str(root / "dev.json"), make_name_task(n_dev, seed=12, prefix="d")),
        "student": make_model_folder(str(root / "student"), tiny_bert_config(dropout=0.1), seed=1),
        "teacher": make_model_folder(str(root / "teacher"), tiny_bert_config(dropout=0.1), seed=2),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return dict(tiny_run_inputs(root, 24, 6), root=root)


def argv_for(mode, setup, out, *extra):
    # 24 questions, batch 4, accumulation 2: 3 optimizer steps an epoch (windows of 2, 2, 2 batches);
    # checkpoints every 2 steps land mid-epoch and at epoch ends, logs every 2 steps straddle them.
    argv = [mode, "--train_file", setup["train"], "--validation_file", setup["dev"], "--output_dir", str(out),
            "--model_name_or_path", setup["student"], "--max_seq_length", "48", "--doc_stride", "16",
            "--loss_impl", "torch", "--disable_tqdm", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--save_steps", "2",
            "--logging_steps", "2", "--learning_rate", "1e-3", "--save_total_limit", "2", *map(str, extra)]
    if mode == "distill":
        argv += ["--teacher_model_name_or_path", setup["teacher"]]
    return argv


def comparable_log(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in records]


def final_model(out):
    return load_file(os.path.join(out, "model.safetensors"))


def same_model(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Where a kill can land: (where, what it patches, how it dies).
def _kill_points():
    def before(name):
        return lambda real: lambda *a, **k: (_ for _ in ()).throw(Killed(name))

    def torn_metrics_line(real):
        def write(self, record):
            with open(self.path, "a") as f:
                f.write(json.dumps(record)[: len(json.dumps(record)) // 2])
            raise Killed("mid metrics line")
        return write

    def after(name):
        def wrap(real):
            def call(*a, **k):
                real(*a, **k)
                raise Killed(name)
            return call
        return wrap

    return {
        "metrics line": (kdqa.reporting.MetricsLog, "write", torn_metrics_line),
        "checkpoint file": (kdqa.checkpoint.torch, "save", after("after one checkpoint file")),
        "checkpoint fsync": (kdqa.checkpoint, "fsync_path", after("after an fsync")),
        "evaluation": (kdqa.trainer.QAPredictor, "evaluate", before("mid evaluation")),
        "final model": (kdqa.run_outputs, "save_model", before("writing the final model")),
    }


KILL_POINTS = _kill_points()


_references: dict = {}


def reference_run(setup, mode, extra, monkeypatch):
    """The uninterrupted run of (mode, extra), trained once per module: (output dir, kill-point call counts)."""
    key = (mode, extra)
    if key not in _references:
        out = setup["root"] / f"full-{len(_references)}"
        counts = count_calls(monkeypatch, lambda: kdqa.trainer.train(parse_args(argv_for(mode, setup, out, *extra))))
        _references[key] = (out, counts)
    return _references[key]


def count_calls(monkeypatch, fn):
    """Run fn() counting the calls of every kill point."""
    counts = dict.fromkeys(KILL_POINTS, 0)
    for name, (owner, attr, _) in KILL_POINTS.items():
        real = getattr(owner, attr)

        def counting(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(owner, attr, counting)
    fn()
    monkeypatch.undo()
    return counts


def run_killed_at(monkeypatch, point, nth, fn) -> bool:
    """Run fn() with a kill at the nth call of the kill point; True when the kill happened."""
    owner, attr, make = KILL_POINTS[point]
    real = getattr(owner, attr)
    killer = make(real)
    calls = {"n": 0}

    def maybe_kill(*a, **k):
        calls["n"] += 1
        return (killer if calls["n"] == nth else real)(*a, **k)
    monkeypatch.setattr(owner, attr, maybe_kill)
    try:
        fn()
        return False
    except Killed:
        return True
    finally:
        monkeypatch.undo()


def kill_and_resume(monkeypatch, mode, setup, out, extra, kills):
    """Start, kill at each (point, nth) in turn (resuming in between), then resume to the end."""
    def start():
        resume = ["--resume_from_checkpoint", "latest"] if kdqa.checkpoint.list_checkpoints(str(out)) else []
        overwrite = ["--overwrite_output_dir"] if not resume and os.path.isdir(out) else []
        kdqa.trainer.train(parse_args(argv_for(mode, setup, out, *extra, *resume, *overwrite)))

    for point, nth in kills:
        run_killed_at(monkeypatch, point, nth, start)
    start()


@pytest.mark.parametrize("mode,extra", [
    ("finetune", ("--eval_strategy", "epoch")),
    ("distill", ("--eval_strategy", "steps", "--eval_steps", "4")),
    ("distill", ("--eval_strategy", "epoch", "--teacher_logits_cache", "CACHE")),
], ids=["finetune", "distill-online", "distill-cache"])
def test_kills_anywhere_then_resume_give_the_uninterrupted_model_and_log(setup, tmp_path, monkeypatch, mode,
                                                                        extra):
    extra = tuple(str(setup["root"] / "cache") if e == "CACHE" else e for e in extra)
    full, counts = reference_run(setup, mode, extra, monkeypatch)
    reference_log, reference_model = comparable_log(full), final_model(full)
    assert sum("eval_f1" in r for r in reference_log) >= 2

    # Fixed: inside the step-4 checkpoint (resume from step 3, mid logging window, just after an
    # evaluation), then the resumed run's first evaluation; then two random points.
    rng = random.Random(f"{mode}{extra}")
    points = [(p, n) for p, c in counts.items() for n in range(1, c + 1)]
    kills = [("checkpoint file", 7), ("evaluation", 1)] + rng.sample(points, 2)
    out = tmp_path / "killed"
    kill_and_resume(monkeypatch, mode, setup, out, extra, kills)
    assert same_model(final_model(out), reference_model), kills
    assert comparable_log(out) == reference_log, kills
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], kills

    # Resuming the finished run changes nothing and logs nothing twice.
    kdqa.trainer.train(parse_args(argv_for(mode, setup, full, *extra, "--resume_from_checkpoint", "latest")))
    assert comparable_log(full) == reference_log
    assert same_model(final_model(full), reference_model)
    assert json.loads((full / "eval_results.json").read_text())["f1"] == reference_log[-1]["eval_f1"]


CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import kdqa.checkpoint, train
real, calls = kdqa.checkpoint.torch.save, [0]
def save(*a, **k):
    calls[0] += 1
    if calls[0] == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
kdqa.checkpoint.torch.save = save
sys.exit(train.main({argv!r}))
"""


def test_sigkill_in_the_middle_of_a_checkpoint_write_then_resume(setup, tmp_path, monkeypatch):
    full, _ = reference_run(setup, "finetune", ("--eval_strategy", "epoch"), monkeypatch)
    out = tmp_path / "killed"
    # torch.save runs 3 times a checkpoint: the 5th call is inside the second one (step 3, an epoch end).
    child = CHILD.format(repo=REPO, nth=5, argv=argv_for("finetune", setup, out, "--eval_strategy", "epoch"))
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoint-3.tmp").is_dir() and (out / "checkpoint-2").is_dir()
    import train

    assert train.main(argv_for("finetune", setup, out, "--eval_strategy", "epoch", "--resume_from_checkpoint",
                               "latest")) == 0
    assert not (out / "checkpoint-3.tmp").exists()
    assert same_model(final_model(out), final_model(full))
    assert comparable_log(out) == comparable_log(full)


@pytest.mark.slow
def test_a_kill_in_the_final_save_never_leaves_a_model_without_its_tokenizer(setup, tmp_path, monkeypatch):
    """The final model folder is staged and moved into place with config.json last: a kill between the
    model's and the tokenizer's save_pretrained, or before config.json's move, leaves no folder that
    loads as a model with a missing tokenizer; resuming writes the complete one."""
    import kdqa.staging
    from kdqa.modeling import load_tokenizer

    extra = ("--eval_strategy", "epoch")
    full, _ = reference_run(setup, "finetune", extra, monkeypatch)

    def kill(real):
        return lambda *a, **k: (_ for _ in ()).throw(Killed("final save"))

    def kill_before_config(real):
        return lambda source, target: (kill(real) if target.endswith("config.json") else real)(source, target)

    points = {"between model and tokenizer": (type(load_tokenizer(setup["student"])), "save_pretrained", kill),
              "before config.json moves": (kdqa.staging, "_move", kill_before_config)}
    for where, (owner, attr, make) in points.items():
        out = tmp_path / where.replace(" ", "-")
        monkeypatch.setattr(owner, attr, make(getattr(owner, attr)))
        with pytest.raises(Killed):
            kdqa.trainer.train(parse_args(argv_for("finetune", setup, out, *extra)))
        monkeypatch.undo()
        names = set(os.listdir(out))
        assert "config.json" not in names, (where, names)
        kdqa.trainer.train(parse_args(argv_for("finetune", setup, out, *extra, "--resume_from_checkpoint", "latest")))
        names = set(os.listdir(out))
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names, names
        assert ".kdqa-staging" not in names
        assert same_model(final_model(out), final_model(full)) and comparable_log(out) == comparable_log(full)
