"""The main command (`python train.py`, the recipe): data discovery, the offline path on embedded
defaults end to end, its outputs, and resuming an interrupted recipe. Tiny models, synthetic data."""

import json
import logging
import os
import subprocess
import sys

import pytest

import kdqa.checkpoint
import kdqa.recipe as recipe
from kdqa.config import parse_args
from kdqa.data import SquadDataError
from kdqa.datafiles import find_squad_files
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max_seq_length", "64", "--doc_stride", "32", "--max_eval_samples", "12", "--speed_test_questions", "4",
        "--teacher_num_train_epochs", "1", "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
        "--loss_impl", "torch", "--disable_tqdm"]


def _squad_folder(folder, train_name="train-v1.1.json", dev_name="dev-v1.1.json.gz", n_train=40, n_dev=12):
    os.makedirs(folder, exist_ok=True)
    write_squad(os.path.join(folder, train_name), make_name_task(n_train, seed=1, prefix="t"))
    write_squad(os.path.join(folder, dev_name), make_name_task(n_dev, seed=2, prefix="d"))
    return str(folder)


@pytest.fixture()
def checkout(tmp_path):
    """A repository root with nothing beside it, so no real data can be found by accident."""
    root = tmp_path / "work" / "repo"
    root.mkdir(parents=True)
    return root


# --------------------------------------------------------------------------- data discovery

def test_data_is_found_in_order_under_the_official_names(tmp_path, checkout):
    beside = _squad_folder(checkout.parent / "shared" / "data" / "squad", "train-v1.1-reconstructed.json.gz",
                           "dev-v1.1.json")
    found = find_squad_files(repo_root=checkout, environ={})
    assert (found.folder, found.source) == (beside, "../shared/data/squad/ beside the checkout")
    assert found.train_file.endswith("train-v1.1-reconstructed.json.gz") and found.validation_file.endswith(
        "dev-v1.1.json")

    in_repo = _squad_folder(checkout / "data" / "squad")
    assert find_squad_files(repo_root=checkout, environ={}).folder == in_repo

    env_dir = _squad_folder(tmp_path / "env")
    assert find_squad_files(repo_root=checkout, environ={"KDQA_DATA_DIR": env_dir}).source == "$KDQA_DATA_DIR"

    flag_dir = _squad_folder(tmp_path / "flag")
    found = find_squad_files(flag_dir, repo_root=checkout, environ={"KDQA_DATA_DIR": env_dir})
    assert (found.folder, found.source) == (flag_dir, "--data_dir")


def test_a_named_folder_without_data_is_an_error_not_a_fallback(tmp_path, checkout):
    _squad_folder(checkout / "data" / "squad")
    only_dev = tmp_path / "only_dev"
    only_dev.mkdir()
    (only_dev / "dev-v1.1.json").write_text("{}")
    with pytest.raises(SquadDataError, match=r"--data_dir .*only_dev holds no train file \("):
        find_squad_files(str(only_dev), repo_root=checkout, environ={})
    with pytest.raises(SquadDataError, match=r"\$KDQA_DATA_DIR .*nowhere does not exist"):
        find_squad_files(repo_root=checkout, environ={"KDQA_DATA_DIR": str(tmp_path / "nowhere")})


def test_no_data_anywhere_names_the_flags_and_every_place_looked_at(checkout):
    (checkout / "data" / "squad").mkdir(parents=True)
    (checkout / "data" / "squad" / "train.json").write_text("{}")  # not an official name
    with pytest.raises(SquadDataError) as err:
        find_squad_files(repo_root=checkout, environ={})
    message = str(err.value)
    assert "hub cannot be reached" in message and "--train_file/--validation_file" in message
    assert str(checkout / "data" / "squad") in message
    assert str(checkout.parent / "shared" / "data" / "squad") in message


def test_cli_without_data_stops_with_one_line_naming_the_places(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("KDQA_DATA_DIR", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--data_dir", str(empty),
                           "--output_dir", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"--data_dir {empty} holds no train file and no dev file" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- the offline path end to end

@pytest.fixture()
def offline(monkeypatch, tmp_path, checkout):
    """No hub, nothing in the HF caches; the packaged teacher is a tiny 5-layer BERT; the repository is `checkout`."""
    teacher = make_model_folder(str(tmp_path / "packaged-teacher"), tiny_bert_config(layers=5), seed=3)
    monkeypatch.setattr(recipe, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(recipe, "hub_cache_holds", lambda name: False)  # whatever this machine's HF cache holds
    monkeypatch.setattr(recipe, "hub_dataset_cached", lambda name: False)
    monkeypatch.setattr(recipe, "embedded_teacher_path", lambda: teacher)
    monkeypatch.setattr("kdqa.datafiles.REPO_ROOT", checkout)
    monkeypatch.delenv("KDQA_DATA_DIR", raising=False)
    return teacher


def test_a_base_model_load_reports_the_new_qa_head_in_one_line(tmp_path, caplog, capfd):
    from transformers import BertModel

    from kdqa.modeling import load_qa_model

    BertModel(tiny_bert_config()).save_pretrained(str(tmp_path / "base"))
    with caplog.at_level(logging.INFO, logger="kdqa"):
        load_qa_model(str(tmp_path / "base"))
    ours = [r.getMessage() for r in caplog.records if "newly initialised" in r.getMessage()]
    assert len(ours) == 1 and "QA head newly initialised" in ours[0]
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out + caplog.text


# --------------------------------------------------------------------------- resume

class Interrupted(Exception):
    pass


def _assert_no_progress_bars(stderr: str) -> None:
    assert "Loading weights" not in stderr and "it/s" not in stderr and "s/it" not in stderr, stderr[-2000:]


def test_offline_recipe_end_to_end_interrupted_and_resumed(offline, checkout, tmp_path, monkeypatch, caplog,
                                                           capsys):
    """One run of the offline path (kept to one for speed): interrupted in its third stage, then resumed."""
    data = _squad_folder(checkout / "data" / "squad")
    out = tmp_path / "recipe"
    argv = ["--output_dir", str(out), "--save_steps", "2"] + TINY
    real_save = kdqa.checkpoint.save_checkpoint

    def save_then_die_in_distillation(output_dir, step, **kwargs):  # a crash right after a checkpoint
        real_save(output_dir, step, **kwargs)
        if os.path.basename(output_dir) == "distilled":
            raise Interrupted(step)

    monkeypatch.setattr(kdqa.checkpoint, "save_checkpoint", save_then_die_in_distillation)
    with caplog.at_level(logging.INFO, logger="kdqa"), pytest.raises(Interrupted):
        recipe.run_recipe(parse_args(argv))
    banner = caplog.text
    assert "teacher: all-MiniLM-L6-v2" in banner and "hub is unreachable for bert-base-uncased" in banner
    assert "student: layers 0,2,4 of the teacher" in banner
    assert f"data: SQuAD v1.1 from {data} (data/squad/ in the repository" in banner
    assert "size: CPU preset" in banner and "minutes on 2 idle cores" in banner
    monkeypatch.setattr(kdqa.checkpoint, "save_checkpoint", real_save)
    finished = {d: (out / d / "model.safetensors").read_bytes() for d in ("teacher", "student")}
    stamps = {d: (out / d / "model.safetensors").stat().st_mtime_ns for d in ("teacher", "student")}
    assert not (out / "distilled" / "model.safetensors").exists()

    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest"):
        recipe.run_recipe(parse_args(argv))
    caplog.clear()
    _assert_no_progress_bars(capsys.readouterr().err)
    with caplog.at_level(logging.INFO, logger="kdqa"):
        results = recipe.run_recipe(parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    assert "teacher: kept, finished earlier with the same settings" in caplog.text
    assert "student: kept, finished earlier with the same settings" in caplog.text
    assert f"distilled student: resuming from {out / 'distilled' / 'checkpoint-2'}" in caplog.text
    for d in ("teacher", "student"):
        assert (out / d / "model.safetensors").read_bytes() == finished[d]
        assert (out / d / "model.safetensors").stat().st_mtime_ns == stamps[d]
    assert set(results) == {"teacher", "student", "distilled student"}

    captured = capsys.readouterr()
    _assert_no_progress_bars(captured.err)  # --disable_tqdm: ours, datasets' and transformers' own
    table = captured.out
    assert "| teacher (all-MiniLM-L6-v2, 1 epoch) |" in table
    assert "| distilled student (layers 0,2,4 of all-MiniLM-L6-v2, distilled 1 epoch) |" in table
    assert str(tmp_path) not in table  # short names, no install paths
    assert (out / "recipe_results.md").read_text().strip() == table.strip()
    saved = json.loads((out / "recipe_results.json").read_text())
    rows = saved["models"]
    assert rows["teacher"]["f1"] == results["teacher"]["f1"] and rows["teacher"]["speedup"] == 1.0
    assert rows["distilled student"]["f1"] == results["distilled student"]["f1"]
    assert rows["student"]["parameters"] < rows["teacher"]["parameters"]
    assert all(row["ms_per_question"] > 0 for row in rows.values()) and saved["speed_test"]["questions"] == 4
    assert (out / "recipe_results.png").stat().st_size > 0
    # The served student: the best student exported with static int8, its own F1, its int8 drop in the cards.
    served = json.loads((out / "served" / "eval_results.json").read_text())
    assert rows["served student"]["f1"] == served["f1"] and "served student (ONNX Runtime int8" in table
    source = max(("student", "distilled student"), key=lambda n: results[n]["f1"])
    report = json.loads((out / "served" / "report.json").read_text())
    assert report["int8"]["f1_drop"] == round(served["f1"] - results[source]["f1"], 2)
    assert "int8 drop" in (out / "served" / "README.md").read_text() and "int8 drop" in (out / "report.md").read_text()
    # The preset applied where no flag was given, and kept the flags that were.
    student_args = json.loads((out / "student" / "training_args.json").read_text())
    assert student_args["learning_rate"] == recipe.CPU_PRESET["learning_rate"]
    assert student_args["max_seq_length"] == 64 and student_args["student_layers"] == "0,2,4"

    with pytest.raises(ValueError, match=r"other settings \(--learning_rate 0\.0001 -> 0\.001\)"):
        recipe.run_recipe(parse_args(argv + ["--resume_from_checkpoint", "latest", "--learning_rate", "1e-3"]))
