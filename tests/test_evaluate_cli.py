"""`python -m kdqa.evaluate` (the official metric's command line) and QAPredictor.evaluate end to end."""

import json
import os
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from kdqa.evaluate import main
from kdqa.inference import QAPredictor, TorchRunner
from kdqa.features import QACollator, Window, prepare_eval_features
from kdqa.metric import normalize_answer
from synthetic import make_examples, make_tokenizer, write_squad_json

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def examples():
    return make_examples(n=30, seed=31, n_answers=2)


@pytest.fixture
def dataset_file(tmp_path, examples):
    return write_squad_json(tmp_path / "dev.json.gz", examples, gz=True)


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_prints_official_json_and_reports_missing(tmp_path, capsys, examples, dataset_file):
    predictions = {e["id"]: e["answers"]["text"][1] for e in examples[:27]}  # 3 unanswered
    predictions[examples[0]["id"]] = "completely wrong words"
    assert main([dataset_file, _write(tmp_path / "pred.json", predictions)]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert list(result) == ["exact_match", "f1"]
    assert result["exact_match"] == pytest.approx(100 * 26 / 30)
    assert 100 * 26 / 30 <= result["f1"] < 100 * 27 / 30
    for e in examples[27:]:
        assert f"Unanswered question {e['id']} will receive score 0." in err


def test_many_missing_are_summarised(tmp_path, capsys, examples, dataset_file):
    assert main([dataset_file, _write(tmp_path / "pred.json", {})]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"exact_match": 0.0, "f1": 0.0}
    assert err.count("Unanswered question") == 10
    assert "... and 20 more unanswered questions (30 of 30 in all) will receive score 0." in err


def _text_file(path, text):
    path.write_text(text)
    return str(path)


# Each case gives (dataset file or None for the good one, predictions file or None for a good one).
BAD_INPUTS = {
    "dataset missing": (lambda tmp: (str(tmp / "absent.json"), None), r"absent\.json: file not found"),
    "dataset not JSON": (lambda tmp: (_text_file(tmp / "x.json", "not json"), None), r"x\.json: is not JSON"),
    "predictions missing": (lambda tmp: (None, str(tmp / "nopred.json")), r"nopred\.json: predictions file not found"),
    "predictions a list": (lambda tmp: (None, _write(tmp / "p.json", ["a", "b"])),
                           r"p\.json: predictions must be a JSON object.*got a JSON list"),
    "prediction not text": (lambda tmp: (None, _write(tmp / "p.json", {"syn-00000": 3})),
                            r"p\.json: the prediction for question 'syn-00000' is a int"),
    "predictions not JSON": (lambda tmp: (None, _text_file(tmp / "p.json", "{oops")), r"p\.json: is not JSON"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_without_traceback(tmp_path, capsys, dataset_file, case):
    setup, message = BAD_INPUTS[case]
    data, pred = setup(tmp_path)
    data = data or dataset_file
    pred = pred or _write(tmp_path / "ok.json", {})
    with pytest.raises(SystemExit) as exit_info:
        main([data, pred])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kdqa-evaluate: error: ")
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_python_dash_m(tmp_path, examples, dataset_file):
    predictions = {e["id"]: e["answers"]["text"][0] for e in examples}
    pred = _write(tmp_path / "pred.json", predictions)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "kdqa.evaluate", dataset_file, pred], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["exact_match"] == 100.0
    # Official v1.1 quirk: a gold answer that normalises to "" (e.g. "the") has EM 1 but F1 0.
    expected_f1 = 100.0 * sum(bool(normalize_answer(e["answers"]["text"][0])) for e in examples) / len(examples)
    assert result["f1"] == pytest.approx(expected_f1)
    bad = subprocess.run([sys.executable, "-m", "kdqa.evaluate", dataset_file + ".missing", pred], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "file not found" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------
# QAPredictor.evaluate with a tiny random BERT
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup():
    from transformers import BertConfig, BertForQuestionAnswering

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    model = BertForQuestionAnswering(config)
    examples = make_examples(n=25, seed=41, min_context_words=20, max_context_words=120)
    features = prepare_eval_features(examples, tokenizer, Window(64, 16, 16))
    return tokenizer, model, examples, features


WINDOW = Window(max_seq_length=64, doc_stride=16, max_query_length=16)


def predictor_of(model, tokenizer, batch_size: int, autocast_dtype=None) -> QAPredictor:
    return QAPredictor(TorchRunner(model, "cpu", autocast_dtype), tokenizer, WINDOW, batch_size=batch_size,
                       collate=QACollator(tokenizer.pad_token_id))


def test_evaluate_end_to_end(tiny_setup):
    tokenizer, model, examples, features = tiny_setup
    model.train()
    metrics, predictions, nbest = predictor_of(model, tokenizer, batch_size=4).evaluate(
        datasets.Dataset.from_list(examples), features=features, progress=False)
    assert model.training, "the model's train/eval mode must be restored"
    assert set(metrics) >= {"exact_match", "f1", "total", "missing", "runtime_s", "samples_per_second"}
    assert metrics["total"] == 25 and metrics["missing"] == 0
    assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 100.0
    assert metrics["runtime_s"] > 0 and metrics["samples_per_second"] > 0
    by_id = {e["id"]: e for e in examples}
    assert set(predictions) == set(by_id)
    assert all(text in by_id[qid]["context"] for qid, text in predictions.items())
    assert set(nbest) == set(by_id) and all(nbest[qid][0]["text"] == text for qid, text in predictions.items())


def test_logits_unpadded_in_feature_order(tiny_setup):
    """Length-sorted batching must hand each feature back its own logits."""
    tokenizer, model, _, features = tiny_setup
    model.eval()
    starts, ends = predictor_of(model, tokenizer, batch_size=3).logits(features)
    assert len(starts) == len(ends) == len(features)
    lengths = [len(ids) for ids in features["input_ids"]]
    assert len(set(lengths)) > 1
    assert [len(s) for s in starts] == lengths and all(s.dtype == np.float32 for s in starts)
    for k in (0, len(features) // 2, len(features) - 1):
        row = features[k]
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([row["input_ids"]]),
                attention_mask=torch.tensor([row["attention_mask"]]),
                token_type_ids=torch.tensor([row["token_type_ids"]]),
            )
        np.testing.assert_allclose(starts[k], out.start_logits[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(ends[k], out.end_logits[0].numpy(), atol=1e-4)
    # bfloat16 autocast runs on the CPU too and gives float32 arrays back.
    bf_starts, _ = predictor_of(model, tokenizer, batch_size=8, autocast_dtype=torch.bfloat16).logits(
        features.select(range(6)))
    assert bf_starts[0].dtype == np.float32 and len(bf_starts[0]) == lengths[0]
