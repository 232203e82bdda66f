"""Two commands on one folder, and symlinks inside an output folder (issue 34, items 1 and 2).

A recipe holds the lock of its folder and of every stage folder until it ends: a second recipe, or a
single run into a stage folder, is refused in one line while it runs, and its finished stages stay
as they were. Nothing kdqa writes follows a symlink out of the output folder: the link is replaced,
its target is never written. Real processes for the running recipe and the lock holder."""

import hashlib
import json
import os
import logging
import subprocess
import sys

import pytest

import train
from kdqa import atomic_io, run_dir
from kdqa.reporting import MetricsLog
from test_reliability import REPO, argv_for, tiny_run_inputs
from tiny_models import make_model_folder, tiny_bert_config

# The real recipe, paused for good when its second stage (the student) starts: the teacher stage has
# finished, its folder is complete, and the recipe is still running.
PAUSED_RECIPE = """
import sys, time
sys.path.insert(0, {repo!r})
import kdqa.trainer, train
real_train = kdqa.trainer.train
def train_until_the_student(args):
    if args.output_dir.endswith("student"):
        print("student stage", flush=True)
        time.sleep(600)
    return real_train(args)
kdqa.trainer.train = train_until_the_student
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    inputs = tiny_run_inputs(root, 16, 4)
    inputs["base"] = make_model_folder(str(root / "base"), tiny_bert_config(layers=3), seed=5)
    return inputs


def recipe_argv(setup, out, *extra):
    return ["--teacher_model_name_or_path", setup["base"], "--student_layers", "0,2", "--train_file", setup["train"],
            "--validation_file", setup["dev"], "--output_dir", str(out), "--max_seq_length", "48", "--doc_stride",
            "16", "--max_train_samples", "8", "--max_eval_samples", "4", "--teacher_num_train_epochs", "1",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--loss_impl", "torch",
            "--disable_tqdm", "--speed_test_questions", "2", *extra]


def start(argv):
    env = dict(os.environ)
    env.pop("KDQA_TRACEBACK", None)
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finished(proc, timeout=120):
    """The ended process with its stderr as proc.stderr (a string), as subprocess.run gives it."""
    _, proc.stderr = proc.communicate(timeout=timeout)
    return proc


def command(argv, timeout=120):
    return finished(start(argv), timeout)


def digest(folder):
    """Every file under folder (but the lock) with its sha256."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name != run_dir.LOCK_NAME:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def one_line_refusal(proc, folder):
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert "is in use by a run that is still going" in lines[0] and str(folder) in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- item 1: two commands, one folder

@pytest.mark.slow
def test_while_a_recipe_runs_a_second_recipe_or_a_run_into_its_stage_is_refused(setup, tmp_path):
    out = tmp_path / "recipe"
    env = dict(os.environ)
    env.pop("KDQA_TRACEBACK", None)
    recipe = subprocess.Popen([sys.executable, "-c", PAUSED_RECIPE.format(repo=REPO), *recipe_argv(setup, out)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert recipe.stdout.readline().strip() == "student stage", recipe.stderr.read()[-3000:]
        teacher = digest(out / "teacher")
        assert "model.safetensors" in teacher and "recipe_stage.json" in teacher

        second = start(recipe_argv(setup, out, "--overwrite_output_dir"))
        single = start(argv_for("finetune", setup, out / "teacher", "--overwrite_output_dir"))
        one_line_refusal(finished(second), out)
        one_line_refusal(finished(single), out / "teacher")
        assert digest(out / "teacher") == teacher
    finally:
        recipe.kill()
        recipe.wait()
        recipe.stdout.close()
        recipe.stderr.close()


def test_a_recipe_is_refused_where_another_process_holds_a_stage_folder(setup, tmp_path):
    """The recipe takes every stage folder's lock before it clears any stage (here: its finished teacher)."""
    out = tmp_path / "recipe"
    teacher = out / "teacher"
    teacher.mkdir(parents=True)
    run_dir.write_run_id(str(teacher), "a" * 32)
    run_dir.record_outputs(str(teacher), "model.safetensors", "recipe_stage.json")
    (teacher / "model.safetensors").write_bytes(b"the finished teacher")
    (teacher / "recipe_stage.json").write_text("{}")
    before = digest(teacher)
    (out / "student").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        f"import sys, time\nsys.path.insert(0, {REPO!r})\nfrom kdqa import run_dir\n"
        f"run_dir.lock({str(out / 'student')!r})\nprint('locked', flush=True)\ntime.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line_refusal(command(recipe_argv(setup, out, "--overwrite_output_dir"), timeout=90), out / "student")
        assert digest(teacher) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_held_folders_stay_locked_through_the_runs_inside_and_are_released_after(tmp_path):
    stage = str(tmp_path / "stage")
    with run_dir.HeldFolders() as held:
        held.add(stage)
        run_dir.prepare(stage, resume=False, overwrite=False)  # a stage's own run: locks and releases it
        run_dir.release(stage)
        other = run_dir.RunLock(stage)  # another open file description: conflicts as another process would
        with pytest.raises(run_dir.OutputDirBusyError):
            other.acquire()
    other.acquire()
    other.release()


# ----------------------------------------------------------------------------- item 2: symlinks in an output folder

def plant_links(folder, names, outside):
    """Each name in folder a symlink to its own file outside, holding 'precious NAME'."""
    targets = {}
    for name in names:
        target = outside / f"target-{name.strip('.')}"
        target.write_text(f"precious {name}")
        os.symlink(target, folder / name)
        targets[name] = target
    return targets


def assert_targets_untouched(targets):
    for name, target in targets.items():
        assert target.read_text() == f"precious {name}", name


def test_a_run_never_writes_through_a_symlink_in_its_output_folder(setup, tmp_path, caplog):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    names = [run_dir.LOCK_NAME, "metrics.jsonl", "metrics.jsonl.tmp", "run.json", ".kdqa-outputs.json",
             "train_results.json", "eval_results.json", "training_curves.png", "README.md", "model.safetensors"]
    targets = plant_links(out, names, outside)
    for name in ("checkpoint-2", "checkpoint-2.tmp", run_dir.STAGING_NAME):  # folders kdqa writes into
        (outside / name).mkdir()
        (outside / name / "model.safetensors").write_text("precious folder")
        os.symlink(outside / name, out / name)
    with caplog.at_level(logging.WARNING, logger="kdqa"):
        assert train.main(argv_for("finetune", setup, out, "--overwrite_output_dir", "--max_steps", "2")) == 0
    assert_targets_untouched(targets)
    for name in ("checkpoint-2", "checkpoint-2.tmp", run_dir.STAGING_NAME):
        assert os.listdir(outside / name) == ["model.safetensors"], name
        assert (outside / name / "model.safetensors").read_text() == "precious folder"
    assert (out / "checkpoint-2").is_dir() and not os.path.islink(out / "checkpoint-2")
    for name in names:
        if name != "metrics.jsonl.tmp":
            assert not os.path.islink(out / name) and (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]  # the run's own log, whole
    assert f"{out / 'metrics.jsonl'} was a symlink" in caplog.text


def test_the_writers_replace_a_link_and_leave_its_target(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    targets = plant_links(tmp_path, ["a.json", "b.json.tmp", "log.jsonl", run_dir.LOCK_NAME], outside)
    atomic_io.write_json_atomic(str(tmp_path / "a.json"), {"x": 1})
    atomic_io.write_text_atomic(str(tmp_path / "b.json"), "text")
    log = MetricsLog(str(tmp_path / "log.jsonl"))
    log.write({"step": 1, "loss": 1.0})
    os.remove(tmp_path / "log.jsonl")  # a link planted while the run goes on: the next append replaces it
    (outside / "later").mkdir()
    planted = plant_links(tmp_path, ["log.jsonl"], outside / "later")
    log.write({"step": 2, "loss": 0.5})
    run_dir.lock(str(tmp_path))
    run_dir.release(str(tmp_path))
    assert_targets_untouched(targets)
    assert_targets_untouched(planted)
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1} and (tmp_path / "b.json").read_text() == "text"
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 2, "loss": 0.5}\n'
    assert not any(os.path.islink(tmp_path / n) for n in ("a.json", "b.json", "log.jsonl", run_dir.LOCK_NAME))
    assert "pid" in (tmp_path / run_dir.LOCK_NAME).read_text()


def test_a_symlinked_runs_folder_is_refused_in_one_line_before_the_run(setup, tmp_path, capsys):
    out, outside = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    outside.mkdir()
    (outside / "events.out.tfevents.1.host").write_text("someone else's events")
    os.symlink(outside, out / "runs")
    code = train.main(argv_for("finetune", setup, out, "--overwrite_output_dir", "--report_to", "tensorboard"))
    err = capsys.readouterr().err
    assert code == 1 and "runs is a symlink" in err and "Traceback" not in err, err[-2000:]
    assert os.listdir(outside) == ["events.out.tfevents.1.host"]
    assert not (out / "metrics.jsonl").exists()  # refused before the run began
