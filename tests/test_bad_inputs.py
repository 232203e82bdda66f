"""Inputs that were met with a traceback, a wrong word or silence (issue 20), through train.main.

Encodings (a UTF-8 BOM is accepted everywhere, as kdqa.evaluate accepts it; text that is not UTF-8
is one line naming the file), folders and files in each other's place, an empty question,
answerless questions in predict (the rule evaluate follows), hidden-state flags that do nothing.
"""

import json
import logging
import os

import pytest

import train as train_py
from kdqa import evaluate as kdqa_evaluate
from kdqa.config import ConfigError, parse_args
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

from test_model_folders import WINDOW, one_error_line

BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    examples = make_name_task(6, seed=2, prefix="d")
    return {"root": root, "examples": examples,
            "model": make_model_folder(str(root / "model"), tiny_bert_config(dropout=0.0)),
            "dev": write_squad(str(root / "dev.json"), examples)}


def predict_file(files, test_file, out) -> list[str]:
    return ["predict", "--model_name_or_path", files["model"], "--test_file", str(test_file), "--output_dir",
            str(out), "--disable_tqdm", *WINDOW]


def with_bom(path, target) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    target.write_bytes(BOM + raw)
    return str(target)


# ----------------------------------------------------------------------------- encodings


def test_a_bom_is_accepted_in_data_test_and_config_files(files, tmp_path):
    dev = with_bom(files["dev"], tmp_path / "dev-bom.json")
    assert train_py.main(["evaluate", "--model_name_or_path", files["model"], "--validation_file", dev,
                          "--output_dir", str(tmp_path / "eval"), "--disable_tqdm", *WINDOW]) == 0
    assert train_py.main(predict_file(files, dev, tmp_path / "p1")) == 0
    assert (tmp_path / "p1" / "predict_results.json").exists()
    lines = tmp_path / "questions-bom.jsonl"
    lines.write_bytes(BOM + "\n".join(json.dumps({k: e[k] for k in ("id", "question", "context")})
                                      for e in files["examples"]).encode())
    assert train_py.main(predict_file(files, lines, tmp_path / "p2")) == 0
    assert len(json.load(open(tmp_path / "p2" / "predict_predictions.json"))) == len(files["examples"])
    config = tmp_path / "args.json"
    config.write_bytes(BOM + json.dumps({"n_best_size": 7}).encode())
    assert parse_args(["predict", "--config", str(config), "--model_name_or_path", "m", "--question", "q",
                       "--context", "c"]).n_best_size == 7


def test_kdqa_evaluate_accepts_a_bom_in_the_dataset(files, tmp_path, capsys):
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({e["id"]: e["answers"]["text"][0] for e in files["examples"]}))
    assert kdqa_evaluate.main([with_bom(files["dev"], tmp_path / "dev-bom.json"), str(predictions)]) == 0
    assert json.loads(capsys.readouterr().out) == {"exact_match": 100.0, "f1": 100.0}


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "args.yaml"
    config.write_bytes("max_seq_length: 40  # café\n".encode("latin-1"))
    message = one_error_line(["predict", "--config", str(config), "--model_name_or_path", "m", "--question", "q",
                              "--context", "c"], capsys, code=2)
    assert str(config) in message and "not UTF-8" in message


def test_a_question_lines_file_that_is_not_utf8_names_the_file(files, tmp_path, capsys):
    lines = tmp_path / "questions.jsonl"
    lines.write_bytes(json.dumps({"id": "a", "question": "qui?", "context": "caf\u00e9"}, ensure_ascii=False)
                      .encode("latin-1"))
    message = one_error_line(predict_file(files, lines, tmp_path / "p"), capsys)
    assert str(lines) in message and "not UTF-8" in message


# ----------------------------------------------------------------------------- folders and files


def test_a_test_file_that_is_a_folder_is_named_a_folder(files, tmp_path, capsys):
    message = one_error_line(predict_file(files, tmp_path, tmp_path / "p"), capsys, code=2)
    assert f"--test_file {tmp_path} is a folder" in message
    message = one_error_line(["finetune", "--model_name_or_path", files["model"], "--train_file", files["dev"],
                              "--output_dir", str(tmp_path / "ft"), "--do_predict", "--test_file", str(tmp_path)],
                             capsys, code=2)
    assert f"--test_file {tmp_path} is a folder" in message


def test_export_into_a_file_says_it_is_a_file(files, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"mine")
    message = one_error_line(["export", "--model_name_or_path", files["model"], "--output_dir", str(target)],
                             capsys, code=2)
    assert f"--output_dir {target} is a file" in message and "Errno" not in message
    assert target.read_bytes() == b"mine"


@pytest.mark.parametrize("question, context, flag", [("", "n1 w2 .", "--question"), ("  ", "n1 w2 .", "--question"),
                                                     ("who is here", "", "--context")])
def test_an_empty_question_or_context_is_refused(files, capsys, question, context, flag):
    message = one_error_line(["predict", "--model_name_or_path", files["model"], "--question", question,
                              "--context", context], capsys, code=2)
    assert f"{flag} is empty" in message


# ----------------------------------------------------------------------------- answerless questions


def test_predict_follows_evaluates_rule_for_questions_without_answers(files, tmp_path, capsys):
    """Some answerless: refused as evaluate refuses them (they would score 0). All: answered, not scored."""
    examples = [dict(e) for e in files["examples"]]
    examples[0] = dict(examples[0], answers={"text": [], "answer_start": []})
    mixed = write_squad(str(tmp_path / "mixed.json"), examples)
    message = one_error_line(predict_file(files, mixed, tmp_path / "p1"), capsys)
    assert f"1 of {len(examples)} questions have no gold answer" in message
    evaluate_message = one_error_line(["evaluate", "--model_name_or_path", files["model"], "--validation_file", mixed,
                                       "--output_dir", str(tmp_path / "eval"), *WINDOW], capsys)
    assert f"1 of {len(examples)} questions have no gold answer" in evaluate_message
    assert not (tmp_path / "p1" / "predict_results.json").exists()
    none = write_squad(str(tmp_path / "none.json"),
                       [dict(e, answers={"text": [], "answer_start": []}) for e in examples])
    assert train_py.main(predict_file(files, none, tmp_path / "p2")) == 0
    assert len(json.load(open(tmp_path / "p2" / "predict_predictions.json"))) == len(examples)
    assert not (tmp_path / "p2" / "predict_results.json").exists(), "nothing to score: no score of 0 is written"


# ----------------------------------------------------------------------------- hidden-state flags


def distill(*extra):
    return ["distill", "--teacher_model_name_or_path", "t", "--model_name_or_path", "s", "--output_dir", "out",
            *extra]


def test_a_hidden_layer_map_given_alone_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="--hidden_layer_map '1:x': each entry must be STUDENT:TEACHER"):
        parse_args(distill("--hidden_layer_map", "1:x"))
    with pytest.raises(ConfigError, match="maps a student layer twice"):
        parse_args(distill("--hidden_layer_map", "1:2,1:3"))


@pytest.mark.parametrize("extra, named", [(["--hidden_loss", "cosine"], "--hidden_loss has"),
                                          (["--hidden_layer_map", "1:2"], "--hidden_layer_map has"),
                                          (["--hidden_loss", "cosine", "--hidden_layer_map", "1:2"],
                                           "--hidden_layer_map and --hidden_loss have")])
def test_hidden_flags_without_alpha_hidden_warn_in_one_line(caplog, extra, named):
    with caplog.at_level(logging.WARNING, logger="kdqa"):
        parse_args(distill(*extra))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and named in warnings[0] and "--alpha_hidden 0" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdqa"):
        parse_args(distill(*extra, "--alpha_hidden", "1"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
