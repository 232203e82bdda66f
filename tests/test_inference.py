"""The inference path (kdqa/inference.py) and `train.py predict` / `evaluate` on a folder written by train.py.

A tiny BERT is fine-tuned for a few dozen steps on the synthetic name task (tests/tiny_models.py),
once per module, so answers are real answers and EM/F1 are far from zero.
"""

import json
import os

import numpy as np
import pytest
import torch

import train as train_py
from kdqa.config import ConfigError, parse_args
from kdqa.features import Window
from kdqa.inference import QAPredictor, TorchRunner, predict_command, write_prediction_outputs
from kdqa.metric import squad_v1_score
from kdqa.postprocess import Answer
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

WINDOW = ["--max_seq_length", "64", "--doc_stride", "32"]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    root = tmp_path_factory.mktemp("dev")
    examples = make_name_task(40, seed=2, prefix="d")
    return {"examples": examples, "file": write_squad(str(root / "dev.json.gz"), examples)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dev):
    """A model folder written by `train.py finetune` (with eval_* outputs of the loop's evaluation)."""
    root = tmp_path_factory.mktemp("trained")
    base = make_model_folder(str(root / "base"), tiny_bert_config(dropout=0.0))
    train_file = write_squad(str(root / "train.json"), make_name_task(200, seed=1, prefix="t"))
    out = str(root / "ft")
    assert train_py.main(["finetune", "--model_name_or_path", base, "--train_file", train_file,
                          "--validation_file", dev["file"], "--output_dir", out, *WINDOW, "--loss_impl", "torch",
                          "--learning_rate", "3e-3", "--num_train_epochs", "4", "--disable_tqdm",
                          "--per_device_train_batch_size", "16", "--save_steps", "0", "--logging_steps", "10"]) == 0
    return out


def test_training_writes_run_qa_output_names(trained):
    for name in ("eval_predictions.json", "eval_nbest_predictions.json", "eval_results.json", "all_results.json"):
        assert os.path.isfile(os.path.join(trained, name)), name
    all_results = json.load(open(os.path.join(trained, "all_results.json")))
    eval_results = json.load(open(os.path.join(trained, "eval_results.json")))
    assert all_results["eval_f1"] == eval_results["f1"] and "global_step" in all_results


def test_predict_one_question_prints_answer_and_score(trained, dev, capsys):
    example = dev["examples"][0]
    assert train_py.main(["predict", "--model_name_or_path", trained, "--question", example["question"],
                          "--context", example["context"], *WINDOW]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"answer: {example['answers']['text'][0]}"
    assert out[1].startswith("score: ") and float(out[1].split()[1]) > 0


def test_predict_test_file_gives_evaluates_scores(trained, dev, tmp_path, capsys):
    """Prediction on the dev file = evaluation on it: same answers, same EM/F1."""
    assert train_py.main(["evaluate", "--model_name_or_path", trained, "--validation_file", dev["file"],
                          "--output_dir", str(tmp_path / "ev"), *WINDOW, "--disable_tqdm"]) == 0
    assert train_py.main(["predict", "--model_name_or_path", trained, "--test_file", dev["file"],
                          "--output_dir", str(tmp_path / "pr"), *WINDOW, "--disable_tqdm"]) == 0
    evaluated = json.load(open(tmp_path / "ev" / "eval_results.json"))
    predicted = json.load(open(tmp_path / "pr" / "predict_results.json"))
    assert evaluated["f1"] > 50, "the trained model should answer most questions"
    assert (predicted["exact_match"], predicted["f1"]) == (evaluated["exact_match"], evaluated["f1"])
    predictions = json.load(open(tmp_path / "pr" / "predict_predictions.json"))
    assert predictions == json.load(open(tmp_path / "ev" / "eval_predictions.json"))
    nbest = json.load(open(tmp_path / "pr" / "predict_nbest_predictions.json"))
    by_id = {e["id"]: e for e in dev["examples"]}
    for qid, entries in nbest.items():
        assert entries[0]["text"] == predictions[qid]
        start, end = entries[0]["offsets"]
        assert by_id[qid]["context"][start:end] == predictions[qid]
        assert sum(e["probability"] for e in entries) == pytest.approx(1.0)


def test_predict_json_lines_without_answers(trained, dev, tmp_path):
    lines = [{"id": e["id"], "question": e["question"], "context": e["context"]} for e in dev["examples"][:5]]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    args = parse_args(["predict", "--model_name_or_path", trained, "--test_file", str(path), "--output_dir",
                       str(tmp_path / "out"), *WINDOW, "--disable_tqdm"])
    assert predict_command(args) == {"questions": 5}
    predictions = json.load(open(tmp_path / "out" / "predict_predictions.json"))
    assert list(predictions) == [r["id"] for r in lines]
    assert not (tmp_path / "out" / "predict_results.json").exists(), "no gold answers, no scores"


def test_long_context_is_answered_from_a_later_window(trained):
    """Contexts longer than a window use the training windows: the answer may sit in any of them."""
    predictor = QAPredictor.load(trained, window=Window(32, 8))
    example = make_name_task(1, seed=5, prefix="x")[0]
    name = example["answers"]["text"][0]
    context = " ".join(["w1 w2 w3 w4 w5"] * 12) + f" {name} w6 ."
    features = predictor.features({"id": ["x"], "question": [example["question"]], "context": [context]})
    assert len(features["input_ids"]) > 3
    answer = predictor.answer(example["question"], context, id="x")
    assert isinstance(answer, Answer) and answer.text == name
    assert context[answer.start:answer.end] == name and answer.score is not None


def test_pytorch_int8_answers_close_to_fp32(trained, dev):
    fp32 = QAPredictor.load(trained, window=Window(64, 32))
    int8 = QAPredictor.load(trained, quantize="int8", window=Window(64, 32))
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    modules = list(int8.runner.module.modules())
    assert not any(type(m) is torch.nn.Linear for m in modules), "every Linear layer is quantised"
    assert sum(isinstance(m, DynamicInt8Linear) for m in modules) == sum(
        type(m) is torch.nn.Linear for m in fp32.runner.module.modules())
    rows = dev["examples"]
    fp32_answers, _ = fp32.predict(rows)
    int8_answers, _ = int8.predict(rows)
    texts = {qid: a.text for qid, a in int8_answers.items()}
    assert squad_v1_score(rows, texts)["f1"] >= squad_v1_score(rows, {q: a.text for q, a in fp32_answers.items()})["f1"] - 10


def test_evaluate_restores_training_mode(trained, dev):
    loaded = QAPredictor.load(trained, window=Window(64, 32))
    network = loaded.runner.module.train()
    predictor = QAPredictor(TorchRunner(network), loaded.tokenizer, loaded.window, batch_size=7)
    features = predictor.features(dev["examples"])
    metrics, predictions, nbest = predictor.evaluate(dev["examples"], features=features)
    assert network.training
    assert metrics["total"] == 40 and set(predictions) == set(nbest)
    # Length-sorted batches of 7 hand every feature back its own logits.
    starts, _ = predictor.logits(features)
    with torch.no_grad():
        network.eval()
        expected = network(**{k: torch.tensor([features[k][3]]) for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(starts[3], expected.start_logits[0].numpy(), atol=1e-5)


def test_trainer_evaluate_and_predict_all_answer_through_the_predictor(trained, dev, tmp_path, monkeypatch):
    """The loop's evaluation, `evaluate` and `predict` each go through QAPredictor.evaluate/predict and,
    for one model, give the same answers."""
    calls = []

    def recording(name, real):
        def call(self, *a, **k):
            calls.append(name)
            return real(self, *a, **k)
        return call

    monkeypatch.setattr(QAPredictor, "evaluate", recording("evaluate", QAPredictor.evaluate))
    monkeypatch.setattr(QAPredictor, "predict", recording("predict", QAPredictor.predict))
    train_file = write_squad(str(tmp_path / "train.json"), make_name_task(8, seed=7, prefix="u"))
    out = str(tmp_path / "ft")  # a step at a learning rate of ~0: the trained model, evaluated by the loop
    assert train_py.main(["finetune", "--model_name_or_path", trained, "--train_file", train_file,
                          "--validation_file", dev["file"], "--output_dir", out, *WINDOW, "--loss_impl", "torch",
                          "--learning_rate", "1e-12", "--num_train_epochs", "1", "--disable_tqdm",
                          "--per_device_train_batch_size", "8", "--save_steps", "0"]) == 0
    assert calls == ["evaluate"], "the loop's evaluation is QAPredictor.evaluate"
    assert train_py.main(["evaluate", "--model_name_or_path", out, "--validation_file", dev["file"],
                          "--output_dir", str(tmp_path / "ev"), *WINDOW, "--disable_tqdm"]) == 0
    assert train_py.main(["predict", "--model_name_or_path", out, "--test_file", dev["file"],
                          "--output_dir", str(tmp_path / "pr"), *WINDOW, "--disable_tqdm"]) == 0
    assert calls == ["evaluate", "evaluate", "predict"]
    from_loop = json.load(open(os.path.join(out, "eval_predictions.json")))
    assert json.load(open(tmp_path / "ev" / "eval_predictions.json")) == from_loop
    assert json.load(open(tmp_path / "pr" / "predict_predictions.json")) == from_loop
    assert squad_v1_score(dev["examples"], from_loop)["f1"] > 50, "real answers, not a degenerate agreement"


def test_write_prediction_outputs_names(tmp_path):
    written = write_prediction_outputs(str(tmp_path), "eval", {"a": Answer("a", "x", 1.0, 0, 1)}, {"a": []},
                                       {"f1": 1.0})
    assert [os.path.basename(p) for p in written] == ["eval_predictions.json", "eval_nbest_predictions.json",
                                                      "eval_results.json"]
    assert json.load(open(tmp_path / "eval_predictions.json")) == {"a": "x"}
    assert [os.path.basename(p) for p in write_prediction_outputs(str(tmp_path), "predict", {"a": "x"}, None)] == [
        "predict_predictions.json"]


@pytest.mark.parametrize("argv, message", [
    (["--question", "q"], "--question and --context go together"),
    ([], "either --question Q --context C or --test_file F"),
    (["--test_file", "f.json"], "--test_file needs --output_dir"),
])
def test_predict_flag_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["predict", "--model_name_or_path", "m", *argv])


def test_onnxruntime_requested_without_export_is_a_clear_error(trained, capsys):
    assert train_py.main(["predict", "--model_name_or_path", trained, "--runtime", "onnxruntime",
                          "--question", "q", "--context", "c"]) == 1
    err = capsys.readouterr().err
    assert "has no model.onnx" in err and "train.py export" in err and "Traceback" not in err


def test_a_folder_with_only_the_int8_export_names_the_flag_that_runs_it(trained, tmp_path, capsys):
    """Issue 34 §13: model_int8.onnx alone (no model.onnx, no PyTorch weights): --quantize int8 runs it."""
    import shutil

    folder = tmp_path / "only-int8"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (folder / "model_int8.onnx").write_bytes(b"not read: the flags are wrong before the model is loaded")
    for runtime in (["--runtime", "onnxruntime"], []):
        assert train_py.main(["predict", "--model_name_or_path", str(folder), *runtime, "--question", "q",
                              "--context", "c"]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
        assert len(err) == 1 and "only model_int8.onnx" in err[0] and "add --quantize int8" in err[0], err
