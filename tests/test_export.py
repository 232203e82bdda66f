"""`train.py export`: ONNX export round-trips within tolerance, int8 loads and answers, a bad export is refused.

One tiny BERT is exported once per module (the exporter takes seconds even for a tiny model).
"""

import os

import numpy as np
import onnx
import pytest
import torch

import train as train_py
from kdqa.export import ExportError, _LogitsOnly, calibration_from_rows, export_model, max_logit_difference, sample_inputs
from kdqa.features import Window
from kdqa.inference import ONNX_FILE, ONNX_INT8_FILE, OnnxRunner, QAPredictor, TorchRunner
from kdqa.modeling import load_qa_model, load_tokenizer
from tiny_models import FILLER, make_model_folder, make_name_task, tiny_bert_config, write_squad


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(str(tmp_path_factory.mktemp("bert")), tiny_bert_config(dropout=0.0))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_squad(str(tmp_path_factory.mktemp("calibration") / "train.json"), make_name_task(40, seed=5))


@pytest.fixture(scope="module")
def exported(model_dir, train_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("onnx") / "exported")
    assert train_py.main(["export", "--model_name_or_path", model_dir, "--output_dir", out, "--quantize", "int8",
                          "--train_file", train_file, "--calibration_questions", "30", "--max_seq_length", "64", "--doc_stride", "32"]) == 0
    return out


def _calibration(n=30):
    return calibration_from_rows(make_name_task(40, seed=5), n, Window(max_seq_length=64, doc_stride=32))


def test_export_writes_models_and_tokenizer(exported):
    names = set(os.listdir(exported))
    assert {ONNX_FILE, ONNX_INT8_FILE, "config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.startswith(".export-")], "no staging folder left behind"
    graph = onnx.load(os.path.join(exported, ONNX_FILE)).graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param and not d.dim_value for d in dims), f"{value.name} has fixed axes"
    assert [o.name for o in graph.output] == ["start_logits", "end_logits"]


def test_onnx_runtime_gives_pytorch_logits_on_new_shapes(exported, model_dir):
    """Batch and sequence sizes other than the traced ones, with padding: logits within 1e-4."""
    tokenizer = load_tokenizer(model_dir)
    model = load_qa_model(model_dir).eval()
    questions = ["who is named here", "what name", "who is here"]
    contexts = ["w1 w2 n3 w4 .", " ".join(["w5 w6 w7"] * 20) + " n8 .", "n1 w2"]
    batch = tokenizer(questions, contexts, padding=True, return_tensors="pt")
    batch = {k: batch[k] for k in OnnxRunner(os.path.join(exported, ONNX_FILE)).input_names}
    start, end = OnnxRunner(os.path.join(exported, ONNX_FILE))(batch)
    with torch.no_grad():
        expected = model(**batch)
    real = batch["attention_mask"].bool().numpy()
    np.testing.assert_allclose(start[real], expected.start_logits.numpy()[real], atol=1e-4)
    np.testing.assert_allclose(end[real], expected.end_logits.numpy()[real], atol=1e-4)


def test_exported_folders_answer_like_pytorch(exported, model_dir):
    examples = make_name_task(12, seed=3)
    settings = dict(window=Window(64, 32))
    torch_answers, _ = QAPredictor.load(model_dir, **settings).predict(examples)
    onnx_predictor = QAPredictor.load(exported, **settings)
    assert isinstance(onnx_predictor.runner, OnnxRunner)
    onnx_answers, _ = onnx_predictor.predict(examples)
    assert {q: a.text for q, a in onnx_answers.items()} == {q: a.text for q, a in torch_answers.items()}
    int8 = QAPredictor.load(exported, quantize="int8", **settings)
    assert int8.runner.path.endswith(ONNX_INT8_FILE)
    int8_answers, _ = int8.predict(examples)
    contexts = {e["id"]: e["context"] for e in examples}
    for qid, answer in int8_answers.items():
        assert answer.text and contexts[qid][answer.start:answer.end] == answer.text


def test_torch_and_onnx_runners_are_one_interface_and_answer_alike(exported, model_dir):
    """One predictor, its runner swapped: a PyTorch runner and an ONNX Runtime runner of the same model
    take the same batch, return start/end logits of the same shape, and give the same answers and EM/F1."""
    tokenizer = load_tokenizer(model_dir)
    torch_runner = TorchRunner(load_qa_model(model_dir).eval())
    onnx_runner = OnnxRunner(os.path.join(exported, ONNX_FILE))
    for runner in (torch_runner, onnx_runner):
        assert runner.device == torch.device("cpu") and runner.autocast_dtype is None
    batch = tokenizer(["who is named here"], ["w1 w2 n3 w4 ."], return_tensors="pt")
    with torch.inference_mode():
        got = [tuple(np.asarray(x) for x in runner(dict(batch))) for runner in (torch_runner, onnx_runner)]
    assert [a.shape for a in got[0]] == [a.shape for a in got[1]] == [tuple(batch["input_ids"].shape)] * 2
    examples = make_name_task(12, seed=4)
    predictor = QAPredictor(torch_runner, tokenizer, Window(64, 32))
    torch_metrics, torch_predictions, _ = predictor.evaluate(examples)
    torch_answers, _ = predictor.predict(examples)
    predictor.runner = onnx_runner
    onnx_metrics, onnx_predictions, _ = predictor.evaluate(examples)
    onnx_answers, _ = predictor.predict(examples)
    assert onnx_predictions == torch_predictions
    assert (onnx_metrics["exact_match"], onnx_metrics["f1"]) == (torch_metrics["exact_match"], torch_metrics["f1"])
    for qid, answer in torch_answers.items():
        other = onnx_answers[qid]
        assert (other.id, other.text, other.start, other.end) == (answer.id, answer.text, answer.start, answer.end)
        assert other.score == pytest.approx(answer.score, abs=1e-3)


def test_export_that_disagrees_with_pytorch_is_refused(exported, model_dir, tmp_path, monkeypatch):
    """An ONNX file of another model stands in for a broken export: the check refuses it, writes nothing."""
    other_dir = make_model_folder(str(tmp_path / "other"), tiny_bert_config(dropout=0.0), seed=1)
    other = OnnxRunner(os.path.join(exported, ONNX_FILE))
    model = _LogitsOnly(load_qa_model(other_dir).eval(), with_token_types=False)
    check = sample_inputs(load_tokenizer(other_dir), with_token_types=False, long=True)
    assert max_logit_difference(other.path, model, check) > 1e-2

    import kdqa.export as export

    def wrong_export(model, inputs, path, opset):
        with open(os.path.join(exported, ONNX_FILE), "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())

    monkeypatch.setattr(export, "_export_onnx", wrong_export)
    out = tmp_path / "refused"
    with pytest.raises(ExportError, match="disagrees with PyTorch.*nothing was written"):
        export_model(other_dir, str(out))
    assert not out.exists(), "a refused export leaves no folder behind"
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ExportError):
        export_model(other_dir, str(existing))
    assert os.listdir(existing) == [], "a refused export writes nothing into an existing folder"


def _op_types(path):
    return {node.op_type for node in onnx.load(path).graph.node}


def test_int8_is_quantised_from_onnx_runtimes_fused_graph(exported):
    """model.onnx stays plain ONNX; model_int8.onnx carries ONNX Runtime's fusions; no intermediate is kept."""
    plain, int8 = _op_types(os.path.join(exported, ONNX_FILE)), _op_types(os.path.join(exported, ONNX_INT8_FILE))
    assert "SkipLayerNormalization" not in plain and "LayerNormalization" in plain
    assert "SkipLayerNormalization" in int8 and "QuantizeLinear" in int8 and "DequantizeLinear" in int8
    assert "DynamicQuantizeLinear" not in int8, "static int8: activation scales are constants, not computed per batch"
    assert set(os.listdir(exported)) >= {ONNX_FILE, ONNX_INT8_FILE}
    assert not [n for n in os.listdir(exported) if n.endswith(".onnx") and n not in (ONNX_FILE, ONNX_INT8_FILE)]


def test_int8_falls_back_to_the_plain_graph_when_the_optimizer_fails(model_dir, tmp_path, monkeypatch, caplog):
    import onnxruntime.transformers.optimizer as ort_optimizer

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported pattern")

    monkeypatch.setattr(ort_optimizer, "optimize_model", broken)
    out = tmp_path / "fallback"
    with caplog.at_level("WARNING", logger="kdqa"):
        result = export_model(model_dir, str(out), quantize="int8", calibration=_calibration())
    assert "optimizer failed (unsupported pattern)" in caplog.text
    int8 = _op_types(os.path.join(out, ONNX_INT8_FILE))
    assert "QuantizeLinear" in int8 and "SkipLayerNormalization" not in int8
    assert np.isfinite(result["int8_max_abs_diff"])


def test_reexport_without_int8_removes_the_previous_int8_model(model_dir, tmp_path):
    out = tmp_path / "reexport"
    export_model(model_dir, str(out), quantize="int8-dynamic")
    assert (out / ONNX_INT8_FILE).exists()
    export_model(model_dir, str(out), quantize="none")
    assert (out / ONNX_FILE).exists() and not (out / ONNX_INT8_FILE).exists(), "no stale int8 model beside the new one"


def test_serve_onnx_example_answers_the_export_like_train_py_predict(exported, tmp_path):
    """The README's plain-ONNX-Runtime serving code (benchmarks/serve_onnx_example.py) on this export:
    the answers of `train.py predict --test_file` on the same export, several windows a context."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "serve_onnx_example.py"
    spec = importlib.util.spec_from_file_location("serve_onnx_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    examples = make_name_task(8, seed=21)
    examples[0] = dict(examples[0], context=" ".join(FILLER[:40]) + " n3 " + " ".join(FILLER[40:]) + " .")
    squad = write_squad(str(tmp_path / "dev.json"), examples)
    window = ["--max_seq_length", "24", "--doc_stride", "8"]
    assert example.main([exported, "--squad", squad, "--out", str(tmp_path / "answers.json"), *window]) == 0
    assert train_py.main(["predict", "--model_name_or_path", exported, "--test_file", squad,
                          "--output_dir", str(tmp_path / "predict"), *window]) == 0
    expected = json.loads((tmp_path / "predict" / "predict_predictions.json").read_text())
    assert json.loads((tmp_path / "answers.json").read_text()) == expected


def _padded_questions(n=64, seed=11):
    """Questions whose contexts differ much in length: in one batch of 64 most rows are padding-heavy."""
    examples = make_name_task(n, seed=seed)
    for i in range(0, n, 4):
        examples[i] = dict(examples[i], context=" ".join(FILLER[: 10 + i % 40]) + " " + examples[i]["context"])
    return examples


def _batch_64_and_batch_1_answers(folder):
    examples = _padded_questions()
    batched = QAPredictor.load(folder, quantize="int8", window=Window(64, 32), batch_size=64)
    single = QAPredictor.load(folder, quantize="int8", window=Window(64, 32), batch_size=1)
    together = {q: (a.text, a.start) for q, a in batched.predict(examples)[0].items()}
    alone = {q: (a.text, a.start) for q, a in single.predict(examples)[0].items()}
    return together, alone


def test_int8_answers_do_not_depend_on_the_batch(exported):
    """Static int8 (calibrated scales): a question's answer in a padded batch of 64 is its answer alone.
    Dynamic int8 fails this: its activation scale is taken over the whole padded batch."""
    together, alone = _batch_64_and_batch_1_answers(exported)
    assert together == alone


def test_dynamic_int8_is_kept_and_named_batch_dependent(model_dir, tmp_path):
    out = tmp_path / "dynamic"
    export_model(model_dir, str(out), quantize="int8-dynamic")
    assert "DynamicQuantizeLinear" in _op_types(os.path.join(out, ONNX_INT8_FILE))


def test_int8_without_calibration_data_names_the_flag(model_dir, tmp_path, capsys):
    out = tmp_path / "nocal"
    assert train_py.main(["export", "--model_name_or_path", model_dir, "--output_dir", str(out), "--quantize", "int8"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train_file" in err[0] and "int8-dynamic" in err[0]
    assert not out.exists()
    with pytest.raises(ExportError, match="--train_file"):
        export_model(model_dir, str(out), quantize="int8")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_calibration_questions_are_refused_in_one_line(model_dir, train_file, tmp_path, capsys, value):
    out = tmp_path / "bad"
    assert train_py.main(["export", "--model_name_or_path", model_dir, "--output_dir", str(out), "--quantize", "int8",
                          "--train_file", train_file, "--calibration_questions", value]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--calibration_questions must be at least 1, got {value}" in err[0]
    assert not out.exists()


def test_calibration_questions_not_a_number_and_a_missing_train_file(model_dir, tmp_path, capsys):
    assert train_py.main(["export", "--model_name_or_path", model_dir, "--output_dir", str(tmp_path / "x"),
                          "--quantize", "int8", "--train_file", "t.json", "--calibration_questions", "many"]) == 2
    assert "--calibration_questions: invalid int value: 'many'" in capsys.readouterr().err
    assert train_py.main(["export", "--model_name_or_path", model_dir, "--output_dir", str(tmp_path / "x"),
                          "--quantize", "int8", "--train_file", str(tmp_path / "absent.json")]) != 0
    assert "absent.json: no such file" in capsys.readouterr().err
