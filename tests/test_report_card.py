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
    assert "temperature: 3; T² scaling: yes" in md and "loss: cosine; layer map (student:teacher): 1:1" in md


def test_the_distill_report_and_card_read_as_words_not_python(runs):
    """Issue 30 §4: "T² scaling: yes", not `t squared True`; no True/False/None or dict braces."""
    import re

    md = read(os.path.join(runs["student"], "report.md"))
    card_body = read(os.path.join(runs["student"], "README.md")).split("---\n", 2)[2]
    for text in (md, card_body):
        assert not re.search(r"\b(True|False|None)\b", text) and "t squared" not in text
        assert "{" not in text and "}" not in text
        assert "T² scaling: yes" in text and "learned projection: no" in text
        assert re.search(r"wall time: [0-9.]+ s\b", text) and "max sequence length: 64 tokens" in text
        assert "(loss implementation: torch; teacher logits: online)" in text


def test_the_recipe_report_states_each_term_in_words():
    from kdqa.report_card import render_recipe_report

    objective = {"formula": "1·CE + 10·hidden", "loss_impl": None, "terms": [
        {"name": "ce", "weight": 1.0, "what": "cross-entropy"},
        {"name": "kd", "weight": 0.5, "temperature": 2.0, "t_squared": True},
        {"name": "hidden", "weight": 10.0, "loss": "cosine", "layer_map (student:teacher)": "1:1,2:3",
         "learned_projection": False}]}
    report = {"speed_test": {"threads": 4, "questions": 10}, "elapsed_s": 60.0, "models": {"d": {
        "label": "distilled", "exact_match": 1.0, "f1": 2.0, "ms_per_question": 3.0, "speedup": 1.5,
        "objective": objective, "data": {"max_seq_length": 384}, "training": {"wall_time_s": 12.3, "seed": None}}}}
    md = render_recipe_report(report)
    assert "  - kd × 0.5: temperature: 2; T² scaling: yes" in md
    assert "  - hidden × 10: loss: cosine; layer map (student:teacher): 1:1,2:3; learned projection: no" in md
    assert "- objective: `loss = 1·CE + 10·hidden`\n" in md  # no "(loss implementation: None)"
    assert "- training: wall time: 12.3 s\n" in md and "max sequence length: 384 tokens" in md


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


# ----------------------------------------------------------------------------- cards that parse (issue 34 §18-19)

def hub_parse(path):
    """The card as the hub reads it: huggingface_hub's ModelCard, metadata_load and model-index reader."""
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard.load(path)
    meta = metadata_load(path)
    results = model_index_to_eval_results(meta["model-index"]) if "model-index" in meta else None
    return card, meta, results


def test_every_card_of_a_run_parses_with_the_hubs_reader(runs):
    for name in ("teacher", "student"):
        card, meta, (model_name, results) = hub_parse(os.path.join(runs[name], "README.md"))
        scores = read(os.path.join(runs[name], "eval_results.json"))
        assert model_name == name and card.data.pipeline_tag == "question-answering"
        assert {r.metric_type: r.metric_value for r in results} == {
            "exact_match": round(scores["exact_match"], 2), "f1": round(scores["f1"], 2)}


def test_card_front_matter_stays_valid_for_any_name(tmp_path):
    from kdqa.report_card import model_card

    report = {"command": "distill", "output_dir": str(tmp_path), "model": "org/base: v2 🚀",
              "scores": {"exact_match": 12.5, "f1": 20.25}, "teacher": {"model": "teachers/ünï: big", "f1": 1.0,
                                                                       "exact_match": 1.0},
              "objective": {"terms": [], "formula": "CE"}, "data": {}, "training": {}}
    path = tmp_path / "README.md"
    path.write_text(model_card(report, model_name="my model: 🚀 ünï", base_model="org/base: v2 🚀"),
                    encoding="utf-8")
    card, meta, (model_name, results) = hub_parse(str(path))
    assert meta["base_model"] == "org/base: v2 🚀" and model_name == "my model: 🚀 ünï"
    assert "🚀" in path.read_text(encoding="utf-8")  # kept as written, not escaped
    assert {r.metric_type: r.metric_value for r in results} == {"exact_match": 12.5, "f1": 20.25}


def test_a_run_without_scores_claims_no_result(tmp_path):
    from kdqa.report_card import model_card

    report = {"command": "finetune", "output_dir": str(tmp_path), "model": "m", "scores": None, "teacher": None,
              "objective": {"terms": [], "formula": "CE"}, "data": {"dev_questions": None}, "training": {}}
    path = tmp_path / "README.md"
    path.write_text(model_card(report, model_name="m", base_model=None), encoding="utf-8")
    card, meta, results = hub_parse(str(path))
    assert "model-index" not in meta and results is None
    assert "None" not in path.read_text(encoding="utf-8").split("---")[1]
    assert "Not scored" in card.text


def test_the_served_card_states_its_own_agreement_and_names_the_subset(tmp_path):
    from kdqa.report_card import write_served_report_and_card

    def folder(name, files):
        path = tmp_path / name
        path.mkdir()
        for file, payload in files.items():
            (path / file).write_text(json.dumps(payload), encoding="utf-8")
        return str(path)

    sample = {"questions": 4, "of": 40, "how": "spread", "articles": 4, "of_articles": 4, "split": "validation",
              "text": "4 of 40 dev questions, spread evenly over the file (4 of 4 articles)"}
    teacher = folder("teacher", {"eval_predictions.json": {"a": "x", "b": "y", "c": "z", "d": "w"}})
    source = folder("student", {
        "eval_predictions.json": {"a": "x", "b": "y", "c": "z", "d": "q"},
        "eval_results.json": {"exact_match": 50.0, "f1": 60.0},
        "report.json": {"command": "distill", "output_dir": "s", "model": "m", "scores": {}, "data": {
            "dev_sample": sample}, "training": {}, "objective": {"terms": [], "formula": "CE"},
            "teacher": {"model": teacher, "exact_match": 1.0, "f1": 2.0},
            "agreement_with_teacher": {"questions": 4, "same_answer": 75.0, "answer_f1": 75.0}}})
    served = folder("served", {"eval_predictions.json": {"a": "x", "b": "q", "c": "q", "d": "q"},
                               "eval_results.json": {"exact_match": 40.0, "f1": 45.0}})
    report = write_served_report_and_card(served, source, runtime="ONNX Runtime static int8")
    assert report["agreement_with_teacher"]["same_answer"] == 25.0  # its own, not the fp32 model's 75
    assert report["source_agreement_with_teacher"]["same_answer"] == 75.0
    assert read(os.path.join(served, "report.json"))["agreement_with_teacher"]["same_answer"] == 25.0
    card, meta, (_, results) = hub_parse(os.path.join(served, "README.md"))
    assert results[0].dataset_name == "SQuAD v1.1 (4 of 40 dev questions, spread evenly over the file (4 of 4 articles))"
    assert results[0].dataset_args == {"questions": 4, "of": 40, "sample": "spread"}
    assert "this model's agreement with the teacher on 4 dev questions: same answer 25.00 %" in card.text


# ----------------------------------------------------------------------------- values, not the Namespace (issue 30 §3)

def test_the_run_report_reads_the_runs_facts_as_values(tmp_path):
    import dataclasses

    from kdqa.report_card import RunFacts, run_report

    (tmp_path / "teacher").mkdir()  # a folder is named by its own name
    parts = {"metrics": {"exact_match": 1.0, "f1": 2.0}, "predictions": None,
             "objective": {"terms": [], "formula": "CE"}, "data": {}, "training": {}}
    copied = RunFacts(command="finetune", output_dir=str(tmp_path / "out"), model_name_or_path=None,
                      teacher_model_name_or_path=str(tmp_path / "teacher"), student_layers="0,2", distilled=False)
    report = run_report(copied, **parts)
    assert report["model"] == "layers 0,2 of teacher" and report["teacher"] is None  # named, but not distilled
    assert report["output_dir"] == str(tmp_path / "out") and report["scores"] == {"exact_match": 1.0, "f1": 2.0}
    distilled = run_report(dataclasses.replace(copied, command="distill", model_name_or_path="m", distilled=True),
                           **parts)
    assert distilled["model"] == "m"
    assert distilled["teacher"]["model"] == str(tmp_path / "teacher")
    with pytest.raises(dataclasses.FrozenInstanceError):
        copied.command = "distill"


def test_no_report_card_function_takes_the_namespace():
    """The objective describes itself (kdqa.objective.Objective.describe): no function here reads the Namespace."""
    import ast
    import pathlib

    import kdqa.report_card

    tree = ast.parse(pathlib.Path(kdqa.report_card.__file__).read_text(encoding="utf-8"))
    takes_args = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                  and "args" in [a.arg for a in node.args.args + node.args.kwonlyargs]}
    assert not takes_args, takes_args
