"""report.md/report.json and the model card of every finetune/distill run: numbers equal to
eval_results.json, the objective equal to the flags, the card in the hub's format."""

import json
import os

import pytest
import yaml

from kdqa.config import parse_args
from kdqa.report_card import answer_agreement, gap_closed
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    return {"train": write_squad(str(root / "train.json"), make_name_task(120, seed=1, prefix="t")),
            "dev": write_squad(str(root / "dev.json"), make_name_task(30, seed=2, prefix="d"))}


def train(command, task, out, *extra):
    import kdqa.trainer as trainer

    argv = [command, "--train_file", task["train"], "--validation_file", task["dev"], "--output_dir", str(out),
            "--max_seq_length", "64", "--doc_stride", "32", "--loss_impl", "torch", "--disable_tqdm",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "16", *map(str, extra)]
    return trainer.train(parse_args(argv))


def read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f) if path.endswith(".json") else f.read()


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    model = make_model_folder(str(base / "bert"), tiny_bert_config(dropout=0.0))
    teacher = base / "teacher"
    train("finetune", task, teacher, "--model_name_or_path", model)
    student = base / "student"
    train("distill", task, student, "--model_name_or_path", model, "--teacher_model_name_or_path", teacher,
          "--temperature", "3", "--alpha_ce", "0.25", "--alpha_kd", "0.75", "--alpha_hidden", "2",
          "--hidden_loss", "cosine")
    return {"model": model, "teacher": str(teacher), "student": str(student)}


def test_finetune_report_scores_equal_eval_results_and_objective_is_ce_alone(runs):
    report = read(os.path.join(runs["teacher"], "report.json"))
    results = read(os.path.join(runs["teacher"], "eval_results.json"))
    assert report["scores"] == {"exact_match": results["exact_match"], "f1": results["f1"]}
    weights = {t["name"]: t["weight"] for t in report["objective"]["terms"] if t["weight"]}
    assert weights == {"ce": 1.0}
    assert report["teacher"] is None and report["agreement_with_teacher"] is None
    assert report["data"]["train_questions"] == 120 and report["data"]["dev_questions"] == 30
    assert report["training"]["optimizer_steps"] > 0 and report["training"]["wall_time_s"] > 0
    md = read(os.path.join(runs["teacher"], "report.md"))
    assert f"{results['f1']:.2f}" in md and "loss = 1·CE" in md


def test_distill_report_states_the_objective_as_the_flags_gave_it(runs):
    report = read(os.path.join(runs["student"], "report.json"))
    terms = {t["name"]: t for t in report["objective"]["terms"]}
    assert terms["ce"]["weight"] == 0.25
    assert terms["kd"]["weight"] == 0.75 and terms["kd"]["temperature"] == 3.0 and terms["kd"]["t_squared"] is True
    assert terms["hidden"]["weight"] == 2.0 and terms["hidden"]["loss"] == "cosine"
    assert terms["hidden"]["layer_map (student:teacher)"]
    assert report["objective"]["loss_impl"] == "torch"
    md = read(os.path.join(runs["student"], "report.md"))
    assert "0.25·CE + 0.75·T²·KL + 2·hidden" in md


def test_distill_report_scores_the_teacher_and_its_agreement(runs):
    report = read(os.path.join(runs["student"], "report.json"))
    teacher_results = read(os.path.join(runs["teacher"], "eval_results.json"))
    assert report["teacher"]["f1"] == teacher_results["f1"]
    assert report["teacher"]["exact_match"] == teacher_results["exact_match"]
    ours = read(os.path.join(runs["student"], "eval_predictions.json"))
    theirs = read(os.path.join(runs["teacher"], "eval_predictions.json"))
    assert report["agreement_with_teacher"] == answer_agreement(ours, theirs)
    assert report["agreement_with_teacher"]["questions"] == 30


def test_model_card_is_in_the_hub_format_with_the_scores(runs):
    card = read(os.path.join(runs["student"], "README.md"))
    meta = front_matter(card)
    results = read(os.path.join(runs["student"], "eval_results.json"))
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"exact_match": round(results["exact_match"], 2), "f1": round(results["f1"], 2)}
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "SQuAD v1.1"
    assert meta["pipeline_tag"] == "question-answering" and "rajpurkar/squad" in meta["datasets"]
    assert "base_model" not in meta  # a local folder is no hub name
    assert "knowledge-distillation" in meta["tags"]
    assert "## Objective as run" in card


def test_agreement_and_gap_closed_by_hand():
    agreement = answer_agreement({"a": "The Paris", "b": "Lyon", "c": "x"}, {"a": "paris", "b": "Nice city", "z": "q"})
    assert agreement == {"questions": 2, "same_answer": 50.0, "answer_f1": 50.0}
    assert answer_agreement({"a": "x"}, {"b": "x"}) is None
    assert gap_closed(30.0, 20.0, 40.0) == 50.0
    assert gap_closed(30.0, 40.0, 40.0) is None
