"""The main command (`python train.py`, the recipe): data discovery, the offline path on embedded
defaults end to end, its outputs, and resuming an interrupted recipe. Tiny models, synthetic data."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest

import kdqa.checkpoint
import kdqa.recipe as recipe
import kdqa.reporting as reporting
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
    first = argv + ["--report_to", "none"]  # the resume below turns TensorBoard on: a logging-only change
    with caplog.at_level(logging.INFO, logger="kdqa"), pytest.raises(Interrupted):
        recipe.run_recipe(parse_args(first))
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
        recipe.run_recipe(parse_args(first))
    caplog.clear()
    _assert_no_progress_bars(capsys.readouterr().err)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    with caplog.at_level(logging.INFO, logger="kdqa"):
        results = recipe.run_recipe(parse_args(argv + ["--resume_from_checkpoint", "latest", "--report_to",
                                                       "tensorboard"]))
    assert "teacher: kept, finished earlier with the same settings" in caplog.text
    assert "student: kept, finished earlier with the same settings" in caplog.text
    assert f"distilled student: resuming from {out / 'distilled' / 'checkpoint-2'}" in caplog.text
    for d in ("teacher", "student"):
        assert (out / d / "model.safetensors").read_bytes() == finished[d]
        assert (out / d / "model.safetensors").stat().st_mtime_ns == stamps[d]
    assert set(results) == {"teacher", "student", "distilled student", "distilled student + hidden states"}
    _assert_one_tensorboard_run_per_stage(tmp_path / "tb", out)

    captured = capsys.readouterr()
    _assert_no_progress_bars(captured.err)  # --disable_tqdm: ours, datasets' and transformers' own
    table = captured.out
    assert "| teacher (all-MiniLM-L6-v2, 1 epoch) |" in table
    assert "| distilled student (layers 0,2,4 of all-MiniLM-L6-v2, distilled 1 epoch) |" in table
    assert ("| distilled student + hidden states (layers 0,2,4 of all-MiniLM-L6-v2, distilled 1 epoch, + 10 x cosine "
            "on hidden states, student:teacher layers 1:1,2:3,3:5) |") in table
    hidden_args = json.loads((out / "distilled_hidden" / "training_args.json").read_text())
    assert (hidden_args["alpha_hidden"], hidden_args["hidden_loss"], hidden_args["teacher_logits_cache"]) == (
        10.0, "cosine", None)
    logits_args = json.loads((out / "distilled" / "training_args.json").read_text())
    assert logits_args["alpha_hidden"] == 0 and logits_args["teacher_logits_cache"]
    card = json.loads((out / "report.json").read_text())["models"]["distilled student + hidden states"]
    assert "gap_closed" in card and card["agreement_with_teacher"]["same_answer"] is not None
    assert [t["weight"] for t in card["objective"]["terms"] if t["name"] == "hidden"] == [10.0]
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
    assert report["int8"]["f1_drop"] == round(results[source]["f1"] - served["f1"], 2)  # PyTorch minus int8
    drop = (f"int8 drop {results[source]['f1'] - served['f1']:.2f} F1 ({served['f1']:.2f} against "
            f"{results[source]['f1']:.2f} in PyTorch)")
    assert drop in (out / "served" / "README.md").read_text() and drop in (out / "report.md").read_text()
    # The preset applied where no flag was given, and kept the flags that were.
    student_args = json.loads((out / "student" / "training_args.json").read_text())
    assert student_args["learning_rate"] == recipe.CPU_PRESET["learning_rate"]
    assert student_args["max_seq_length"] == 64 and student_args["student_layers"] == "0,2,4"

    preset_lr = re.escape(repr(recipe.CPU_PRESET["learning_rate"]))
    with pytest.raises(ValueError, match=rf"other settings \(--learning_rate {preset_lr} -> 0\.001\)"):
        recipe.run_recipe(parse_args(argv + ["--resume_from_checkpoint", "latest", "--learning_rate", "1e-3"]))


def _assert_one_tensorboard_run_per_stage(log_dir, out):
    """The two stages trained after the resume: one TensorBoard run each, holding that stage's steps alone."""
    from tensorboard.backend.event_processing import event_accumulator

    assert sorted(os.listdir(log_dir)) == ["distilled", "distilled_hidden"]
    for stage in ("distilled", "distilled_hidden"):
        acc = event_accumulator.EventAccumulator(str(log_dir / stage), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
        logged = {r["step"]: r["loss"] for r in _loss_records(out / stage)}
        steps = [step for step, _ in losses]
        assert steps and steps == sorted(set(steps)), (stage, steps)  # one value a step: no other stage's
        assert [v for _, v in losses] == pytest.approx([logged[step] for step in steps], rel=1e-6), stage
        assert "train/learning_rate" in acc.Tags()["scalars"] and "train/lr" not in acc.Tags()["scalars"]


# --------------------------------------------------------------------------- moved from test_trainer.py (issue 23)

def _loss_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_recipe_without_hub_stops_within_seconds_naming_the_offline_flags(tmp_path):
    import time  # here, not at the top: this section is appended and the file's head left as it is

    env = dict(os.environ, HF_HUB_OFFLINE="0")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--output_dir", str(tmp_path / "r"),
                           "--teacher_model_name_or_path", "bert-large-uncased"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 1, proc.stderr
    assert "hub cannot be reached" in proc.stderr or "hub" in proc.stderr
    for flag in ("--train_file", "--validation_file", "--model_name_or_path", "--teacher_model_name_or_path"):
        assert flag in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 30, elapsed


def test_recipe_runs_teacher_student_and_distilled_student_and_prints_the_table(name_task, tmp_path, capsys):
    from kdqa.recipe import run_recipe

    base = make_model_folder(str(tmp_path / "base"), tiny_bert_config(layers=4), seed=8)
    args = parse_args(["--teacher_model_name_or_path", base, "--student_layers", "0,2",
                       "--train_file", name_task["train"], "--validation_file", name_task["dev"],
                       "--output_dir", str(tmp_path / "recipe"),
                       "--max_seq_length", "64", "--doc_stride", "32", "--max_train_samples", "48",
                       "--teacher_num_train_epochs", "1", "--num_train_epochs", "1", "--loss_impl", "torch",
                       "--per_device_train_batch_size", "8", "--disable_tqdm"])
    assert args.command == "recipe"
    results = run_recipe(args)
    assert set(results) == {"teacher", "student", "distilled student", recipe.HIDDEN_STAGE}
    table = capsys.readouterr().out
    assert "| teacher (" in table and "| student (layers 0,2 of base" in table and "| distilled student (" in table
    assert "EM/F1 on all 60 dev questions (1 of 1 articles)" in table  # which questions: said under the table
    out = tmp_path / "recipe"
    for run_dir in ("teacher", "student", "distilled"):
        assert (out / run_dir / "eval_results.json").is_file()
    distilled_args = json.loads((out / "distilled" / "training_args.json").read_text())
    assert distilled_args["teacher_model_name_or_path"] == str(out / "teacher")
    assert distilled_args["student_layers"] == "0,2"
    assert json.loads((out / "recipe_results.json").read_text())["models"]["teacher"]["f1"] == results["teacher"]["f1"]
    assert (out / "teacher_logits_cache").is_dir()
    # Student and distilled student start from the same weights: layers 0 and 2 of the base model.
    kd_log = _loss_records(out / "distilled")
    assert kd_log[-1]["kd"] > 0
    # The recipe's report card: the table's scores, each student's agreement with the teacher, the objectives.
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["distilled student"]["f1"] == results["distilled student"]["f1"]
    assert report["models"]["student"]["agreement_with_teacher"]["questions"] == 60
    kd_terms = {t["name"]: t for t in report["models"]["distilled student"]["objective"]["terms"]}
    assert kd_terms["kd"]["temperature"] == args.temperature and kd_terms["kd"]["weight"] == args.alpha_kd
    assert "gap to the teacher closed" in (out / "report.md").read_text()
    assert json.loads((out / "recipe_results.json").read_text())["dev_sample"]["how"] == "all"
    assert "EM/F1 on all 60 dev questions" in (out / "report.md").read_text()
    for run_dir in ("teacher", "student", "distilled"):
        assert (out / run_dir / "README.md").read_text().startswith("---\n")


# --------------------------------------------------------------------------- the hidden-state row (issue 21)

def _stages(argv):
    args = parse_args(["--output_dir", "/nonexistent/recipe"] + argv)
    recipe.choose_hidden_term(args, set(args.__dict__.pop("given_flags")))
    return recipe.stage_arguments(args)


def test_the_hidden_row_has_the_term_and_the_logits_row_never_does():
    stages = _stages(["--student_layers", "0,2,4"])
    hidden, logits = stages[recipe.HIDDEN_STAGE], stages["distilled student"]
    assert (hidden.alpha_hidden, hidden.hidden_loss, hidden.teacher_logits_cache) == (10.0, "cosine", None)
    assert hidden.mode == "distill" and hidden.teacher_model_name_or_path == stages["teacher"].output_dir
    assert (logits.alpha_hidden, logits.alpha_attention) == (0.0, 0.0) and logits.teacher_logits_cache
    assert all(stages[name].alpha_hidden == 0 for name in ("teacher", "student"))

    stages = _stages(["--student_layers", "0,2,4", "--alpha_hidden", "3", "--hidden_loss", "mse",
                      "--hidden_layer_map", "1:2,2:4,3:6", "--alpha_attention", "1"])
    hidden, logits = stages[recipe.HIDDEN_STAGE], stages["distilled student"]
    assert (hidden.alpha_hidden, hidden.hidden_loss, hidden.hidden_layer_map, hidden.alpha_attention) == (
        3.0, "mse", "1:2,2:4,3:6", 1.0)
    assert (logits.alpha_hidden, logits.hidden_layer_map, logits.alpha_attention) == (0.0, None, 0.0)
    assert logits.teacher_logits_cache  # the logits-only row keeps its cache whatever the hidden flags say


def test_the_recipe_refuses_a_hidden_row_without_weight():
    with pytest.raises(ValueError, match=r"--alpha_hidden 0: the recipe's --alpha_hidden is the weight of its "
                                         r"hidden-state row and must be > 0 \(default 10\)"):
        _stages(["--alpha_hidden", "0"])


def test_the_estimate_counts_four_trainings_export_and_speed_test():
    args = parse_args(["--output_dir", "/nonexistent/recipe"])
    for key, value in recipe.CPU_PRESET.items():
        setattr(args, key, value)
    seconds = recipe.stage_seconds(args)
    assert set(seconds) == {name for name, _ in recipe.STAGES} | {"export", "speed test"}
    assert seconds[recipe.HIDDEN_STAGE] > seconds["student"]  # the online teacher runs every step
    assert 11 * 60 <= recipe.estimate_seconds(args) <= 14 * 60  # measured idle: 12.4 (AVX2) and 11.3 minutes (VNNI)


def test_online_hidden_row_uses_the_uniform_map_with_projections(tmp_path):
    """bert-base -> distilbert-base in small: a 4-layer BERT teacher (width 32), a 2-layer DistilBERT
    student (width 16) given by --model_name_or_path: uniform map 1:2,2:4, a projection per layer,
    and the hidden stage trains (online teacher, no cache)."""
    from transformers import DistilBertConfig

    from kdqa.modeling import load_qa_model
    from kdqa.trainer import train

    teacher = make_model_folder(str(tmp_path / "teacher"), tiny_bert_config(layers=4), seed=1)
    student = make_model_folder(str(tmp_path / "student"), DistilBertConfig(
        vocab_size=tiny_bert_config().vocab_size, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
        max_position_embeddings=128), seed=2, kind="distilbert")
    data = _squad_folder(tmp_path / "data", n_train=16, n_dev=4)
    stages = _stages(["--model_name_or_path", student, "--teacher_model_name_or_path", teacher,
                      "--train_file", os.path.join(data, "train-v1.1.json"),
                      "--validation_file", os.path.join(data, "dev-v1.1.json.gz")] + TINY)
    hidden = stages[recipe.HIDDEN_STAGE]
    assert hidden.model_name_or_path == student and hidden.student_layers is None
    term = recipe.objective.hidden_term(hidden, load_qa_model(student), load_qa_model(teacher))
    assert term.layer_map == [(1, 2), (2, 4)] and term.projections is not None

    hidden.teacher_model_name_or_path = teacher  # the teacher as given (the recipe's own would be fine-tuned first)
    hidden.output_dir, hidden.overwrite_output_dir, hidden.max_steps = str(tmp_path / "hidden"), True, 2
    results = train(hidden)
    assert "f1" in results
    report = json.loads((tmp_path / "hidden" / "report.json").read_text())
    term_run = [t for t in report["objective"]["terms"] if t["name"] == "hidden"][0]
    assert term_run["weight"] == 10.0 and term_run["layer_map (student:teacher)"] == "1:2,2:4"
    assert hidden.teacher_logits_cache is None


# --------------------------------------------------------------------------- resume: what keeps a finished stage (issue 34)

def _finished_teacher(tmp_path, *flags):
    """The recipe's stages for these flags, its teacher stage finished: a model folder and its marker."""
    stages = _stages(["--output_dir", str(tmp_path / "recipe"), "--student_layers", "0,2"] + list(flags))
    teacher = stages["teacher"]
    make_model_folder(teacher.output_dir, tiny_bert_config(layers=2), seed=4)
    with open(os.path.join(teacher.output_dir, recipe.STAGE_MARKER), "w", encoding="utf-8") as f:
        json.dump({"settings": recipe.stage_settings(teacher), "results": {"f1": 12.5}}, f)
    return teacher


def test_a_finished_stage_is_kept_when_only_flags_a_single_run_may_change_differ(tmp_path):
    _finished_teacher(tmp_path, "--report_to", "none")
    resumed = _stages(["--output_dir", str(tmp_path / "recipe"), "--student_layers", "0,2", "--report_to",
                       "tensorboard", "--logging_strategy", "epoch", "--eval_steps", "7"])["teacher"]
    assert recipe.finished_stage(resumed) == {"f1": 12.5}
    changed = _stages(["--output_dir", str(tmp_path / "recipe"), "--student_layers", "0,2", "--seed", "7"])
    with pytest.raises(ValueError, match=r"other settings \(--seed 42 -> 7\)"):
        recipe.finished_stage(changed["teacher"])


def test_a_damaged_stage_marker_is_named_in_one_line(tmp_path):
    teacher = _finished_teacher(tmp_path)
    marker = os.path.join(teacher.output_dir, recipe.STAGE_MARKER)
    for damage in ('{"settings": {', "[1, 2]", '{"results": {}}'):
        with open(marker, "w", encoding="utf-8") as f:
            f.write(damage)
        with pytest.raises(ValueError) as caught:
            recipe.finished_stage(teacher)
        message = str(caught.value)
        assert f"the stage marker {marker} is damaged" in message and "\n" not in message, message
        assert "delete it to train that stage again" in message


def test_a_finished_stage_whose_model_no_longer_loads_is_trained_again(tmp_path, caplog, monkeypatch):
    teacher = _finished_teacher(tmp_path)
    weights = os.path.join(teacher.output_dir, "model.safetensors")
    assert recipe.finished_stage(teacher) == {"f1": 12.5}
    with open(weights, "r+b") as f:  # cut short (a full disk, a copy that stopped)
        f.truncate(os.path.getsize(weights) // 2)
    with caplog.at_level(logging.WARNING, logger="kdqa"):
        assert recipe.finished_stage(teacher) is None
    assert f"the finished stage {teacher.output_dir} is trained again" in caplog.text
    os.remove(weights)
    assert recipe.finished_stage(teacher) is None

    stages = _stages(["--output_dir", str(tmp_path / "recipe"), "--student_layers", "0,2"])
    trained = []
    monkeypatch.setattr(recipe, "run_stage", lambda name, run_args, resume: trained.append(name) or {"f1": 1.0})
    recipe.train_stages(stages, resume=True, minutes={})
    assert trained == [name for name, _ in recipe.STAGES]  # the teacher and every stage after it


def test_each_stage_is_its_own_tensorboard_run_in_a_shared_folder(tmp_path, monkeypatch):
    from kdqa.tensorboard_log import log_dir_for

    stages = _stages(["--output_dir", str(tmp_path / "recipe"), "--student_layers", "0,2"])
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    folders = [log_dir_for(stages[name]) for name, _ in recipe.STAGES]
    assert folders == [str(tmp_path / "tb" / d) for d in ("teacher", "student", "distilled", "distilled_hidden")]
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    assert log_dir_for(stages["teacher"]) == os.path.join(stages["teacher"].output_dir, "runs")


# --------------------------------------------------------------------------- the CPU preset (issue 34, item 4)

class _StagesBuilt(Exception):
    pass


@pytest.fixture(scope="module")
def preset_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset")
    return ["--train_file", write_squad(str(root / "train.json"), make_name_task(8, seed=1, prefix="t")),
            "--validation_file", write_squad(str(root / "dev.json"), make_name_task(4, seed=2, prefix="d")),
            "--teacher_model_name_or_path", make_model_folder(str(root / "teacher"), tiny_bert_config(), seed=1),
            "--output_dir", str(root / "recipe"), "--device", "cpu"]


@pytest.fixture
def preset_stages(preset_inputs, monkeypatch):
    """The stages' settings run_recipe builds on a CPU-only machine; it stops there, nothing trains."""
    real = recipe.stage_arguments

    def built(args):
        raise _StagesBuilt(real(args))

    monkeypatch.setattr(recipe, "stage_arguments", built)

    def stages(argv):
        with pytest.raises(_StagesBuilt) as stop:
            recipe.run_recipe(parse_args(preset_inputs + ["--student_layers", "0,1", *argv]))
        return stop.value.args[0]
    return stages


def test_the_cpu_preset_fills_only_flags_not_given_even_at_their_default_value(preset_stages):
    stages = preset_stages([])
    assert stages["student"].learning_rate == recipe.CPU_PRESET["learning_rate"] != 2e-5
    assert stages["student"].num_train_epochs == recipe.CPU_PRESET["num_train_epochs"] != 3.0
    assert stages["student"].warmup_ratio == recipe.CPU_PRESET["warmup_ratio"] > 0

    stages = preset_stages(["--learning_rate", "2e-5", "--num_train_epochs", "3"])  # both the parser's defaults
    for name, stage in stages.items():
        assert stage.learning_rate == 2e-5, name
        assert stage.max_train_samples == recipe.CPU_PRESET["max_train_samples"]  # the rest of the preset holds
    assert all(stages[name].num_train_epochs == 3.0 for name in ("student", "distilled student", recipe.HIDDEN_STAGE))


@pytest.mark.parametrize("flags", [["--lr_scheduler_type", "constant"], ["--lr_scheduler_type", "linear"],
                                   ["--warmup_steps", "5"], ["--warmup_ratio", "0"]])
def test_a_chosen_schedule_gets_no_warm_up_from_the_preset(preset_stages, flags):
    stages = preset_stages(flags)
    given = dict(zip(flags[::2], flags[1::2]))
    for stage in stages.values():
        assert stage.warmup_ratio == 0.0 and stage.warmup_steps == float(given.get("--warmup_steps", 0))
        assert stage.lr_scheduler_type == given.get("--lr_scheduler_type", "linear")
        assert stage.learning_rate == recipe.CPU_PRESET["learning_rate"]


def test_the_preset_keeps_per_epoch_scores_for_the_best_checkpoint(preset_stages):
    stages = preset_stages(["--load_best_model_at_end", "--save_strategy", "epoch"])
    assert all(stage.eval_strategy == "epoch" and stage.load_best_model_at_end for stage in stages.values())
    assert preset_stages([])["student"].eval_strategy == recipe.CPU_PRESET["eval_strategy"]


def test_the_plots_model_names_are_short_and_do_not_overlap(tmp_path):
    """Issue 30 §4: the five names on both panels' x axes sat on top of each other."""
    names = ["teacher", "student", "distilled student", recipe.HIDDEN_STAGE, recipe.SERVED]
    rows = {n: {"exact_match": 40.0 + i, "f1": 50.0 + i, "ms_per_question": 30.0 - i, "speedup": 30.0 / (30.0 - i)}
            for i, n in enumerate(names)}
    reporting.plot_results(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    fig = reporting.results_figure(rows)
    fig.canvas.draw()
    for axis in fig.axes:
        labels = axis.get_xticklabels()
        assert [t.get_text() for t in labels] == ["teacher", "fine-tuned\nstudent", "logits KD",
                                                  "logits KD\n+ hidden states", "served int8"]
        boxes = [t.get_window_extent() for t in labels]
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), [(b.x0, b.x1) for b in boxes]
