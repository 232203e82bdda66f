"""Checkpoints and the output dir under misuse: overwrite, changed flags, NaN, damage, full disk, unsafe
pickles, two runs at once, a broken teacher cache, a torn metrics line. Each bug class is met through
the command line (train.main) where a user meets it, with tiny models and a few optimizer steps.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from kdqa import checkpoint as ckpt
from kdqa import run_dir
from test_reliability import tiny_run_inputs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("ckpt"), 16, 4)


def argv(setup, out, *extra):
    # 16 questions, batch 4: 4 steps an epoch; a checkpoint every 2 steps.
    return ["finetune", "--train_file", setup["train"], "--validation_file", setup["dev"], "--output_dir", str(out),
            "--model_name_or_path", setup["student"], "--max_seq_length", "48", "--doc_stride", "16",
            "--loss_impl", "torch", "--disable_tqdm", "--per_device_train_batch_size", "4", "--max_steps", "4",
            "--save_steps", "2", "--logging_steps", "1", "--eval_strategy", "no", "--learning_rate", "1e-3",
            *map(str, extra)]


def interrupted(setup, out, at, *extra):
    """A run stopped right after its step-`at` checkpoint, as a crash would leave it."""
    import kdqa.trainer
    from kdqa.config import parse_args

    kdqa.trainer.INTERRUPT_AFTER_STEP = at
    try:
        assert kdqa.trainer.train(parse_args(argv(setup, out, *extra))) == {"interrupted_at_step": at}
    finally:
        kdqa.trainer.INTERRUPT_AFTER_STEP = None


def main(capsys, *args):
    """train.py's main in-process: (exit code, stderr)."""
    code = train.main(list(args))
    return code, capsys.readouterr().err


def error_line(stderr):
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def params(path):
    return load_file(os.path.join(path, "model.safetensors"))


# ----------------------------------------------------------------------------- 1: overwrite, run identity

def test_overwrite_starts_over_and_latest_never_resumes_the_previous_run(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(capsys, *argv(setup, out, "--max_steps", "6"))[0] == 0  # run A: checkpoints 4 and 6
    a_model = params(out)
    interrupted(setup, out, 2, "--overwrite_output_dir", "--seed", "1")  # run B, stopped at step 2
    names = sorted(os.listdir(out))
    assert "checkpoint-6" not in names and "model.safetensors" not in names and "checkpoint-2" in names, names
    code, _ = main(capsys, *argv(setup, out, "--seed", "1", "--resume_from_checkpoint", "latest"))
    assert code == 0
    b_model = params(out)
    assert not all(torch.equal(a_model[k], b_model[k]) for k in a_model)
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]  # B's four steps, none of A's six
    args = json.loads((out / "training_args.json").read_text())
    assert args["seed"] == 1


def test_latest_skips_checkpoints_of_another_run(setup, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    interrupted(setup, a, 4)
    interrupted(setup, b, 2)
    shutil.copytree(a / "checkpoint-4", b / "checkpoint-4")  # another run's, newer
    assert ckpt.resolve_checkpoint("latest", str(b)) == str(b / "checkpoint-2")
    code, err = main(capsys, *argv(setup, a, "--resume_from_checkpoint", str(b / "checkpoint-2")))
    assert code == 1 and "belongs to run" in error_line(err)


def test_overwrite_clears_only_a_runs_folder_and_a_run_that_failed_at_start_up_blocks_nothing(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    assert run_dir.prepare(str(other), resume=False, overwrite=True)
    run_dir.release(str(other))
    assert (other / "mine.txt").read_text() == "keep me"  # not a kdqa run's folder: nothing deleted
    fresh = tmp_path / "fresh"
    first = run_dir.prepare(str(fresh), resume=False, overwrite=False)
    run_dir.release(str(fresh))  # the run failed before writing anything: only run.json is there
    second = run_dir.prepare(str(fresh), resume=False, overwrite=False)
    run_dir.release(str(fresh))
    assert first != second and run_dir.read_run_id(str(fresh)) == second


# ----------------------------------------------------------------------------- 4: changed settings on resume

def test_resume_refuses_changed_settings_naming_the_flag_and_allows_safe_ones(setup, tmp_path, capsys):
    out = tmp_path / "out"
    interrupted(setup, out, 2)
    # --student_layers changes the model itself: named as a flag, before any weights are loaded.
    for flag, value in (("--learning_rate", "5e-4"), ("--seed", "7"), ("--gradient_accumulation_steps", "2"),
                        ("--student_layers", "0")):
        code, err = main(capsys, *argv(setup, out, flag, value, "--resume_from_checkpoint", "latest"))
        line = error_line(err)
        assert code == 1 and f"{flag}: now" in line and "--logging_steps" in line, line
    code, _ = main(capsys, *argv(setup, out, "--logging_steps", "2", "--save_total_limit", "3", "--eval_strategy",
                                 "steps", "--eval_steps", "3", "--resume_from_checkpoint", "latest"))
    assert code == 0


def test_the_recipes_own_flags_may_change_on_resume():
    """The recipe copies --speed_test_questions/--data_dir/--full into each stage's args; they must not
    block resuming an interrupted stage (what they decide is compared through the resolved flags)."""
    import argparse

    from kdqa.resume_settings import changed_settings, run_settings

    before = argparse.Namespace(learning_rate=1e-4, speed_test_questions=200, data_dir=None, full=False)
    after = argparse.Namespace(learning_rate=1e-4, speed_test_questions=50, data_dir="data/squad", full=True)
    assert changed_settings(run_settings(before, "cpu"), run_settings(after, "cpu")) == []
    after.learning_rate = 2e-4
    assert changed_settings(run_settings(before, "cpu"), run_settings(after, "cpu")) == [
        "--learning_rate: now 0.0002, in the checkpoint 0.0001"]


# ----------------------------------------------------------------------------- 6: never a non-finite checkpoint

def test_a_diverged_run_writes_no_checkpoint_and_names_no_bad_one_as_good(setup, tmp_path, capsys, monkeypatch):
    import kdqa.trainer

    real_build = kdqa.trainer.build_optimizer

    def diverging_optimizer(model, args):
        """Step 1's update turns a weight into NaN while its loss is still finite (as --learning_rate inf)."""
        optimizer = real_build(model, args)

        def poison(*_):
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(kdqa.trainer, "build_optimizer", diverging_optimizer)
    out = tmp_path / "out"
    code, err = main(capsys, *argv(setup, out, "--save_steps", "1"))
    line = error_line(err)
    assert code == 1 and "non-finite" in line and "step 1" in line and "Last good checkpoint: none" in line, line
    assert ckpt.list_checkpoints(str(out)) == [] and not (out / "model.safetensors").exists()


def test_each_rank_resumes_its_own_random_streams(tmp_path):
    """DDP: rank 0 writes every rank's RNG states; rank r restores entry r (its dropout stream), not rank 0's."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    parts = dict(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                 scaler=torch.amp.GradScaler("cpu", enabled=False))
    trainer_state = {k: 0 for k in ckpt.STATE_KEYS if k != "rng"}
    torch.manual_seed(0)
    rank0 = ckpt.rng_state()
    torch.manual_seed(1)
    rank1 = ckpt.rng_state()
    expected_rank1 = torch.rand(3)
    path = ckpt.save_checkpoint(str(tmp_path), 2, trainer_state=trainer_state, rng_by_rank=[rank0, rank1], **parts)
    torch.manual_seed(5)
    ckpt.load_checkpoint(path, rank=1, **parts)
    assert torch.equal(torch.rand(3), expected_rank1)
    torch.manual_seed(0)
    expected_rank0 = torch.rand(3)
    ckpt.load_checkpoint(path, rank=0, **parts)
    assert torch.equal(torch.rand(3), expected_rank0)


def test_checkpoint_weights_are_copied_to_the_cpu(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = ckpt._model_state(model)
    assert all(t.device.type == "cpu" and t.data_ptr() != p.data_ptr() for t, p in zip(state.values(), model.parameters()))


def test_save_checkpoint_refuses_nan_parameters(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ckpt.NonFiniteParametersError, match="weight"):
        ckpt.save_checkpoint(str(tmp_path), 3, model=model, optimizer=opt,
                             scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                             scaler=torch.amp.GradScaler("cpu", enabled=False), trainer_state={})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- 7: damaged checkpoints

def _rewrite_manifest(path):
    """Make checksums.json match the files again: damage the checksum cannot see."""
    files = {n: {"bytes": os.path.getsize(os.path.join(path, n)), "sha256": ckpt._sha256(os.path.join(path, n))}
             for n in ckpt.payload_files(path)}
    with open(os.path.join(path, ckpt.MANIFEST), "w") as f:
        json.dump({"files": files}, f)


def _truncate(path, name):
    with open(os.path.join(path, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, name)) // 2)


def _empty(path, name):
    open(os.path.join(path, name), "w").close()


def _drop_state_key(path, name):
    state = json.loads(open(os.path.join(path, name)).read())
    del state["rng"]
    with open(os.path.join(path, name), "w") as f:
        json.dump(state, f)
    _rewrite_manifest(path)


@pytest.fixture(scope="module")
def two_checkpoints(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("damage") / "run"
    interrupted(setup, out, 4)
    return out


@pytest.mark.parametrize("name,damage", [
    ("model.safetensors", _truncate), ("model.safetensors", _empty), ("optimizer.pt", _truncate),
    ("scheduler.pt", _empty), ("scaler.pt", _truncate), ("kdqa_state.json", _drop_state_key),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(two_checkpoints, tmp_path, name, damage,
                                                                      caplog):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    damage(str(out / "checkpoint-4"), name)
    with caplog.at_level("WARNING", logger="kdqa"):
        assert ckpt.resolve_checkpoint("latest", str(out)) == str(out / "checkpoint-2")
    assert name in caplog.text and "checkpoint-4" in caplog.text
    damage(str(out / "checkpoint-2"), name)
    with pytest.raises(ckpt.CheckpointError, match=f"no intact checkpoint.*{name}"):
        ckpt.resolve_checkpoint("latest", str(out))


def test_resume_after_damage_falls_back_and_ends_like_the_uninterrupted_run(setup, two_checkpoints, tmp_path,
                                                                           capsys, caplog):
    full, out = tmp_path / "full", tmp_path / "run"
    assert main(capsys, *argv(setup, full))[0] == 0
    shutil.copytree(two_checkpoints, out)
    _empty(str(out / "checkpoint-4"), "optimizer.pt")
    with caplog.at_level("WARNING", logger="kdqa"):
        code, _ = main(capsys, *argv(setup, out, "--resume_from_checkpoint", "latest"))
    assert code == 0 and "checkpoint-4/optimizer.pt has 0 bytes" in caplog.text
    a, b = params(full), params(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # None intact: one line naming the file.
    for step in (2, 4):
        _truncate(str(out / f"checkpoint-{step}"), "model.safetensors")
    code, err = main(capsys, *argv(setup, out, "--resume_from_checkpoint", "latest"))
    assert code == 1 and "model.safetensors" in error_line(err)


def test_each_checkpoint_file_and_the_folder_are_fsynced(two_checkpoints, tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(ckpt, "fsync_path", lambda p: synced.append(os.path.relpath(p, tmp_path)))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(str(tmp_path), 5, model=model, optimizer=opt,
                         scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         scaler=torch.amp.GradScaler("cpu", enabled=False), trainer_state={})
    assert {f"checkpoint-5.tmp/{n}" for n in ckpt.PAYLOAD_FILES} <= set(synced)
    assert synced[-1] == "."  # the output dir, after the rename
    assert ckpt.verify_checkpoint(str(tmp_path / "checkpoint-5")) is not None  # trainer_state lacks keys
    assert ckpt.verify_checkpoint(str(two_checkpoints / "checkpoint-4")) is None


# ----------------------------------------------------------------------------- 11: full disk, unsafe pickle, lock

def test_a_full_disk_during_a_checkpoint_gives_one_line_and_leaves_no_tmp(setup, tmp_path, capsys, monkeypatch):
    real, calls = torch.save, {"n": 0}

    def save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # the second file of the second checkpoint
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "out"
    code, err = main(capsys, *argv(setup, out))
    line = error_line(err)
    assert code == 1 and "No space left on device" in line and "checkpoint-2" in line, line
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2"]
    assert ckpt.verify_checkpoint(str(out / "checkpoint-2")) is None


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_malicious_pickle_is_refused_as_not_a_safe_checkpoint(setup, two_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for step in (2, 4):  # checksums made to match, as an attacker would
        torch.save({"state": Payload()}, out / f"checkpoint-{step}" / "optimizer.pt")
        _rewrite_manifest(str(out / f"checkpoint-{step}"))
    code, err = main(capsys, *argv(setup, out, "--resume_from_checkpoint", "latest"))
    line = error_line(err)
    assert code == 1 and "optimizer.pt is not a safe checkpoint" in line, line


def test_two_runs_into_one_output_dir_the_second_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = run_dir.RunLock(str(out))
    holder.acquire()  # a live run (another open file description: flock conflicts even in one process)
    try:
        code, err = main(capsys, *argv(setup, out))
        assert code == 1 and f"pid {os.getpid()}" in error_line(err) and "in use" in err
    finally:
        holder.release()


def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock_path = out / run_dir.LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'pid %d' % os.getpid())\n"
        "print('locked', flush=True)\ntime.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_dir.OutputDirBusyError, match=f"pid {holder.pid}"):
            run_dir.prepare(str(out), resume=False, overwrite=False)
    finally:
        holder.kill()  # SIGKILL: no clean-up; the kernel drops its lock
        holder.wait()
    assert lock_path.exists()
    assert run_dir.prepare(str(out), resume=False, overwrite=False)
    run_dir.release(str(out))


# ----------------------------------------------------------------------------- 8: metrics.jsonl on resume

def test_resume_after_a_torn_metrics_line_through_the_cli(setup, tmp_path, capsys):
    out = tmp_path / "out"
    interrupted(setup, out, 2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0.7')  # killed mid-write
    code, _ = main(capsys, *argv(setup, out, "--resume_from_checkpoint", "latest"))
    assert code == 0
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
