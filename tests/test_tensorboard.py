"""Issue 24 §3: --report_to tensorboard writes what metrics.jsonl holds, read back with TensorBoard's reader."""

import json
import os
import time

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

import kdqa.reporting  # noqa: E402
import train  # noqa: E402
from kdqa.tensorboard_log import tag_for  # noqa: E402
from test_reliability import tiny_run_inputs  # noqa: E402


class Kill(BaseException):
    """Stands for SIGKILL: nothing in kdqa catches it."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("tb"), 16, 4)


def argv(setup, out, *extra):
    # 16 questions, batch 4: 4 steps an epoch, 2 epochs; a record every step, dev scored every 2 steps.
    return ["finetune", "--train_file", setup["train"], "--validation_file", setup["dev"], "--output_dir", str(out),
            "--model_name_or_path", setup["student"], "--max_seq_length", "48", "--doc_stride", "16",
            "--loss_impl", "torch", "--disable_tqdm", "--per_device_train_batch_size", "4", "--num_train_epochs", "2",
            "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2",
            "--learning_rate", "1e-3", "--report_to", "tensorboard", *map(str, extra)]


def scalars(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0,
                                                                          event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(out):
    """Every numeric key of every metrics.jsonl record, by TensorBoard tag: [(step, value)]."""
    expected = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    expected.setdefault(tag_for(key), []).append((record["step"], value))
    return expected


def assert_same(got, expected):
    assert set(got) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 in events


def test_tensorboard_holds_every_metrics_record_and_the_flags(setup, tmp_path):
    out = tmp_path / "run"
    assert train.main(argv(setup, out)) == 0
    acc, got = scalars(out / "runs")
    expected = expected_scalars(out)
    for tag in ("train/loss", "train/ce", "train/kd", "train/learning_rate", "train/epoch", "train/grad_norm",
                "train/features_per_second", "train/peak_memory_mb", "eval/f1", "eval/exact_match"):
        assert tag in expected and tag in got  # Trainer's names (HF TensorBoardCallback) where Trainer logs it
    assert "train/lr" not in got
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 9))
    assert [s for s, _ in expected["eval/f1"]] == [2, 4, 6, 8]
    assert_same(got, expected)
    text = acc.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"learning_rate": 0.001' in text and '"report_to": [\n    "tensorboard"' in text


def test_a_killed_and_resumed_run_appends_without_duplicating_steps(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = kdqa.reporting.MetricsLog.write

    # Checkpoints at steps 2, 4, 6: the records of step 5 are written after checkpoint-4, then the
    # kill comes, so the resumed run logs step 5 a second time.
    def killed_after_step_5(self, record):
        real(self, record)
        if record["step"] == 5 and "loss" in record:
            raise Kill()

    monkeypatch.setattr(kdqa.reporting.MetricsLog, "write", killed_after_step_5)
    with pytest.raises(Kill):
        train.main(argv(setup, out))
    _, before = scalars(out / "runs")
    assert [s for s, _ in before["train/loss"]][-1] == 5  # an orphan record beyond checkpoint-4
    monkeypatch.setattr(kdqa.reporting.MetricsLog, "write", real)
    # Event files are named by the second, then by a per-process writer counter: two writers of one
    # process within one second can sort in the wrong order ("...9" after "...10") and the reader
    # then drops the earlier run's steps. A resumed run is a new process, a second later at least.
    time.sleep(1.1)
    assert train.main(argv(setup, out, "--resume_from_checkpoint", "latest")) == 0
    _, got = scalars(out / "runs")
    expected = expected_scalars(out)
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 9))
    assert_same(got, expected)
    # A fresh start over the same folder does not mix the old run's events in.
    assert train.main(argv(setup, out, "--overwrite_output_dir", "--max_steps", "3")) == 0
    _, got = scalars(out / "runs")
    assert_same(got, expected_scalars(out))
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3]


def test_report_to_none_writes_no_events_and_the_env_var_moves_them(setup, tmp_path, monkeypatch):
    out = tmp_path / "none"
    assert train.main(argv(setup, out, "--max_steps", "2", "--report_to", "none")) == 0
    assert not (out / "runs").exists()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    out = tmp_path / "env"
    assert train.main(argv(setup, out, "--max_steps", "2")) == 0
    assert not (out / "runs").exists()
    assert_same(scalars(tmp_path / "tb")[1], expected_scalars(out))


def test_an_unusable_tensorboard_folder_is_one_line_before_the_run(setup, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(blocker / "tb"))
    out = tmp_path / "run"
    code = train.main(argv(setup, out))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert f"$TENSORBOARD_LOGGING_DIR ({blocker / 'tb'})" in lines[0] and f"{blocker} is a file" in lines[0]
    assert "set $TENSORBOARD_LOGGING_DIR to a folder you can write" in lines[0]
    assert not (out / "metrics.jsonl").exists()  # before the run began
