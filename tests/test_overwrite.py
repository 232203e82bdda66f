"""--overwrite_output_dir removes exactly what a kdqa run wrote, and no run may write into the checkout,
$HOME or /. Met through train.main, as a user meets it (issue 20, item 1)."""

import json
import os
import shutil

import pytest

from kdqa import run_dir
from kdqa.config import ConfigError, parse_args
from test_checkpoint import argv, error_line, main
from test_reliability import tiny_run_inputs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("overwrite"), 16, 4)


def users_folder(tmp_path, setup):
    """An output folder that already holds the user's own things, the run's inputs among them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "run.sh").write_text("#!/bin/sh\npython train.py finetune ...\n")
    shutil.copy(setup["train"], out / "train.json")
    (out / "my_config.json").write_text(json.dumps({"seed": 3}))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "ckpt").mkdir(parents=True)
    (elsewhere / "ckpt" / "trainer_state.json").write_text("{}")
    (elsewhere / "file.txt").write_text("linked")
    os.symlink(elsewhere / "ckpt", out / "checkpoint-7")  # a decoy run marker: a link, not kdqa's folder
    os.symlink(elsewhere / "file.txt", out / "link.txt")
    (out / "checkpoint-9").mkdir()  # a real folder of that name, but none of kdqa's files in it
    (out / "checkpoint-9" / "mine.txt").write_text("mine")
    (out / "checkpoint-1").mkdir()  # another trainer's checkpoint: neither rotated away nor overwritten
    (out / "checkpoint-1" / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    return out


def users_things(out):
    return {"notes.txt": (out / "notes.txt").read_text(), "run.sh": (out / "run.sh").read_text(),
            "train.json": (out / "train.json").read_bytes(), "my_config.json": (out / "my_config.json").read_text(),
            "checkpoint-7": os.readlink(out / "checkpoint-7"), "link.txt": os.readlink(out / "link.txt"),
            "checkpoint-9": (out / "checkpoint-9" / "mine.txt").read_text(),
            "checkpoint-1": (out / "checkpoint-1" / "trainer_state.json").read_text(),
            "linked": (out / "link.txt").read_text(), "linked ckpt": sorted(os.listdir(out / "checkpoint-7"))}


def test_overwrite_twice_keeps_the_users_files_and_inputs_and_replaces_the_first_runs_outputs(setup, tmp_path,
                                                                                           capsys):
    out = users_folder(tmp_path, setup)
    before = users_things(out)

    def run(*extra):
        args = argv(setup, out, "--overwrite_output_dir", "--config", str(out / "my_config.json"), *extra)
        args[args.index("--train_file") + 1] = str(out / "train.json")
        return main(capsys, *args)

    # First run: evaluates (eval_* files) and checkpoints at steps 2 and 4.
    code, err = run("--eval_strategy", "epoch")
    assert code == 0, err[-3000:]
    first_id = run_dir.read_run_id(str(out))
    assert (out / "eval_predictions.json").is_file() and (out / "checkpoint-4").is_dir()
    assert users_things(out) == before

    # Second run: no evaluation, 3 steps: nothing of the first run may be left to be taken for its own.
    code, err = run("--max_steps", "3", "--save_steps", "3")
    assert code == 0, err[-3000:]
    assert users_things(out) == before
    names = set(os.listdir(out))
    assert not names & {"eval_predictions.json", "eval_nbest_predictions.json", "eval_results.json",
                        "checkpoint-2", "checkpoint-4"}, names
    assert {"checkpoint-3", "model.safetensors", "config.json", "train_results.json"} <= names
    assert run_dir.read_run_id(str(out)) != first_id
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    assert json.loads((out / "training_args.json").read_text())["seed"] == 3  # the --config was read both times
    assert not [n for n in names if n.startswith(".kdqa-staging") or n.endswith(".tmp")]


def test_an_older_run_folder_without_a_record_loses_only_kdqas_own_names(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"run_id": "0" * 32}))
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "eval_results.json", "notes.txt"):
        (out / name).write_text("x")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(
        {"run_id": "0" * 32, "batches_per_epoch": 4, "batch_in_epoch": 2, "step": 2}))
    (out / "checkpoint-5").mkdir()  # another trainer's checkpoint: not kdqa's to delete
    (out / "checkpoint-5" / "model.safetensors").write_text("x")
    (out / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    assert run_dir.prepare(str(out), resume=False, overwrite=True)
    run_dir.release(str(out))
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["checkpoint-5", "notes.txt", "run.json"]
    assert sorted(os.listdir(out / "checkpoint-5")) == ["model.safetensors", "trainer_state.json"]


def test_an_input_of_the_command_is_never_removed_even_under_a_name_kdqa_wrote(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run_dir.write_run_id(str(out), "1" * 32)
    run_dir.record_outputs(str(out), "train_results.json", "metrics.jsonl")
    for name in ("train_results.json", "metrics.jsonl"):
        (out / name).write_text("{}")
    removed = run_dir.clear_previous_run(str(out), keep=[str(out / "train_results.json")])
    assert sorted(removed) == ["metrics.jsonl", "run.json"]
    assert (out / "train_results.json").is_file()


@pytest.mark.parametrize("kind", ["pyproject.toml", ".git", "git subfolder", "home"])
def test_output_dir_that_is_the_checkout_home_or_root_is_refused_in_one_line(setup, tmp_path, monkeypatch, capsys,
                                                                           kind):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "README.md").write_text("the user's")
    cwd, target = checkout, "."
    if kind == "pyproject.toml":
        (checkout / "pyproject.toml").write_text("[project]\n")
    elif kind == ".git":
        (checkout / ".git").mkdir()
    elif kind == "git subfolder":  # --output_dir .. from inside the repository names its root too
        (checkout / ".git").mkdir()
        cwd, target = checkout / "src", ".."
        cwd.mkdir()
    else:
        monkeypatch.setenv("HOME", str(checkout))
        target = str(checkout)
    monkeypatch.chdir(cwd)
    code, err = main(capsys, *argv(setup, target, "--overwrite_output_dir"))
    line = error_line(err)
    assert code == 2 and "a folder of its own" in line, line
    assert sorted(os.listdir(checkout)) == sorted(["README.md", *([".git"] if "git" in kind else []),
                                                   *(["src"] if kind == "git subfolder" else []),
                                                   *(["pyproject.toml"] if kind == "pyproject.toml" else [])])


def test_output_dir_root_is_refused_before_anything_runs(setup):
    # Parsed only: code that failed to refuse it must not get to write into / while the test finds out.
    with pytest.raises(ConfigError, match="root of the file system.*a folder of its own"):
        parse_args(argv(setup, "/", "--overwrite_output_dir"))


def test_a_folder_beside_the_checkout_is_still_fine(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    monkeypatch.chdir(tmp_path)
    assert run_dir.precious_dir_reason("runs/a") is None and run_dir.precious_dir_reason(".") is not None
