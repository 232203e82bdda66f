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
from log_capture import root_log


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


# --------------------------------------------------------------------------- int8 checked against fp32 (issue 34 §3)

def _collapse(path):
    """Every start/end logit times 0: the model answers each question with the same first span,
    whatever it was asked (a quantiser that lost the model)."""
    graph = onnx.load(path)
    graph.graph.initializer.append(onnx.helper.make_tensor("collapse_zero", onnx.TensorProto.FLOAT, [], [0.0]))
    for output in graph.graph.output:
        for node in graph.graph.node:
            node.output[:] = [f"{name}_raw" if name == output.name else name for name in node.output]
        graph.graph.node.append(onnx.helper.make_node("Mul", [f"{output.name}_raw", "collapse_zero"], [output.name]))
    onnx.save(graph, path)


@pytest.fixture()
def collapsing_quantizer(monkeypatch):
    import kdqa.export as export

    real = export.quantize_static

    def broken(source, int8_path, *args, **kwargs):
        real(source, int8_path, *args, **kwargs)
        _collapse(int8_path)

    monkeypatch.setattr(export, "quantize_static", broken)


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory):
    return write_squad(str(tmp_path_factory.mktemp("dev") / "dev.json"), make_name_task(40, seed=6, prefix="d"))


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def test_a_collapsed_int8_model_is_refused_and_the_previous_export_stays(exported, model_dir, train_file, dev_file,
                                                                         collapsing_quantizer, tmp_path, capsys):
    import shutil

    out = tmp_path / "earlier"
    shutil.copytree(exported, out)
    before = _snapshot(out)
    assert train_py.main(["export", "--model_name_or_path", model_dir, "--output_dir", str(out), "--quantize", "int8",
                          "--train_file", train_file, "--validation_file", dev_file, "--calibration_questions", "30",
                          "--max_seq_length", "64", "--doc_stride", "32"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert len(err) == 1 and "int8 refused" in err[0] and "nothing was written" in err[0], err
    assert "agreement" in err[0] and "% with fp32's answers" in err[0] and "F1" in err[0]
    assert "on 40 held-out questions" in err[0] and "best of 4 int8 schemes" in err[0]
    assert _snapshot(out) == before, "the refused export leaves the earlier one as it was"


def test_the_recipe_does_not_serve_a_collapsed_int8_model(model_dir, name_task, collapsing_quantizer, tmp_path,
                                                           caplog):
    import types

    import kdqa.recipe as recipe
    from kdqa.config import parse_args

    args = parse_args(["--train_file", name_task["train"], "--validation_file", name_task["dev"], "--output_dir",
                       str(tmp_path / "recipe"), "--max_train_samples", "100", "--max_seq_length", "64",
                       "--doc_stride", "32", "--max_eval_samples", "12"])
    stages = {name: types.SimpleNamespace(output_dir=model_dir) for name in ("student", "distilled student")}
    with caplog.at_level("INFO", logger="kdqa"):
        served = recipe.export_served_student(args, {"student": {"f1": 1.0}, "distilled student": {"f1": 2.0}}, stages)
    assert served is None
    skipped = [r.getMessage() for r in caplog.records if "served student skipped" in r.getMessage()]
    assert len(skipped) == 1 and "int8 refused" in skipped[0] and "agreement" in skipped[0]
    assert "on 200 held-out questions" in skipped[0], "questions no stage trained on: rows 100-299"
    assert not (tmp_path / "recipe" / "served" / ONNX_INT8_FILE).exists()


def test_each_scheme_is_logged_with_both_scores_and_the_closest_to_fp32_is_kept(model_dir, train_file, dev_file,
                                                                                tmp_path, monkeypatch, caplog):
    """Percentile 99.99 calibration on windows of different lengths works (ONNX Runtime's histogram
    calibrators used to stack them); the kept scheme is the best-ranked one, its scores logged."""
    import kdqa.export as export
    import kdqa.int8 as int8

    lengths = {len(b["input_ids"][0]) for b in export.calibration_batches(
        _calibration().examples, load_tokenizer(model_dir), ["input_ids", "attention_mask"], Window(64, 32))}
    assert len(lengths) > 1
    real_score = int8.HeldOut.score

    def favour_percentile_per_tensor(self, path, name):
        score = real_score(self, path, name)
        bonus = 1.0 if name == "Percentile 99.99, per-tensor" else 0.0
        return int8.Int8Score(name, score.questions, score.agreement, score.answer_f1 + bonus, score.f1,
                              score.fp32_f1, score.drop_se)

    monkeypatch.setattr(int8.HeldOut, "score", favour_percentile_per_tensor)
    calibration = calibration_from_rows(make_name_task(40, seed=5), 30, Window(64, 32),
                                        held_out_rows=make_name_task(40, seed=6, prefix="d"))
    with caplog.at_level("INFO", logger="kdqa"):
        result = export_model(model_dir, str(tmp_path / "schemes"), quantize="int8", calibration=calibration)
    lines = [r.getMessage() for r in caplog.records if r.name == "kdqa"]
    candidates = [line for line in lines if line.startswith("int8 candidate")]
    assert [line.split(":")[0] for line in candidates] == [
        "int8 candidate MinMax, per-channel", "int8 candidate MinMax, per-tensor",
        "int8 candidate Percentile 99.99, per-channel", "int8 candidate Percentile 99.99, per-tensor"]
    assert all("% with fp32's answers" in line and "against fp32's" in line and "40 held-out" in line
               for line in candidates)
    assert "kept Percentile 99.99, per-tensor: agreement" in lines[-1] and result["int8"].name.startswith("Percentile")
    assert "DynamicQuantizeLinear" not in _op_types(os.path.join(tmp_path / "schemes", ONNX_INT8_FILE))


def test_reduce_range_is_tried_only_on_cpus_without_vnni(monkeypatch):
    import kdqa.int8 as int8

    monkeypatch.setattr(int8.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(int8, "cpu_has_vnni", lambda: True)
    assert [s.name for s in int8.static_schemes()] == [
        "MinMax, per-channel", "MinMax, per-tensor", "Percentile 99.99, per-channel", "Percentile 99.99, per-tensor"]
    monkeypatch.setattr(int8, "cpu_has_vnni", lambda: False)
    schemes = int8.static_schemes()
    assert len(schemes) == 8 and sum(s.reduce_range for s in schemes) == 4
    assert schemes[0] == int8.Scheme("MinMax", per_channel=True, reduce_range=False), "kdqa's earlier scheme first"
    monkeypatch.setattr(int8.platform, "machine", lambda: "aarch64")
    assert not any(s.reduce_range for s in int8.static_schemes())


@pytest.mark.parametrize("agreement, f1, se, refused", [
    (0.0, 0.0, 2.0, "fewer than 20%"),            # collapsed: answers no longer fp32's
    (96.0, 29.0, 1.5, None),                       # sound: a small drop
    (48.0, 28.5, 2.0, None),                       # sound int8 of a weak model: many answers moved, F1 kept
    (80.0, 18.0, 2.0, "F1 drop 12.00"),            # surely more than 5 F1 lost
    (80.0, 22.0, 3.0, None),                       # 8 lost, but within the noise of 200 questions
])
def test_the_bound_refuses_only_what_is_surely_past_it(agreement, f1, se, refused):
    from kdqa.int8 import Int8Score

    reason = Int8Score("s", 200, agreement, agreement, f1, 30.0, se).past(5.0)
    assert (reason is None) if refused is None else (refused in reason)
    assert Int8Score("s", 3, 0.0, 0.0).past(5.0) is None, "3 questions cannot show a collapse"
    assert "fewer than 20%" in Int8Score("s", 30, 0.0, 0.0).past(5.0), "0 of 30 (the issue's case) can"


# --------------------------------------------------------------------------- the output folder and the log (issue 34 §10-12)

def test_an_export_removes_what_the_earlier_export_wrote_never_the_users_files(model_dir, tmp_path, monkeypatch):
    """The recipe's served folder: an export, then its scores, report and card (recorded as the export's).
    A later export of another model into it removes them; the user's own files stay. Called as the recipe
    calls it (logging at INFO): kdqa's lines only, none of the exporter's optimiser passes."""

    from kdqa.export import EXPORT_RECORD, record_export_outputs

    out = tmp_path / "served"
    export_model(model_dir, str(out), quantize="int8-dynamic")
    served = ("README.md", "eval_results.json", "eval_predictions.json", "report.json")
    record_export_outputs(str(out), *served)
    for name in served + ("notes.md",):
        (out / name).write_text("of the earlier model")
    other_dir = make_model_folder(str(tmp_path / "other"), tiny_bert_config(dropout=0.0), seed=1)
    with root_log() as stream:
        export_model(other_dir, str(out))
    left = set(os.listdir(out))
    assert not left & set(served) and ONNX_INT8_FILE not in left, "no card, scores or int8 model of the earlier model"
    assert "notes.md" in left and (out / "notes.md").read_text() == "of the earlier model", "the user's file stays"
    assert {ONNX_FILE, "config.json", EXPORT_RECORD} <= left
    import json

    assert ONNX_FILE in json.loads((out / EXPORT_RECORD).read_text())["names"]
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("kdqa ") for line in lines), [l for l in lines if not l.startswith("kdqa")][:5]


def test_an_unrecorded_file_of_the_same_name_is_never_removed(model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    export_model(model_dir, str(out))
    export_model(model_dir, str(out))
    assert (out / "README.md").read_text() == "my notes"


def test_int8_flags_without_int8_are_named_in_one_warning(model_dir, train_file, tmp_path, monkeypatch, caplog):
    import logging

    import kdqa.export as export

    monkeypatch.setattr(export, "export_model", lambda *args, **kwargs: {"files": []})
    argv = ["export", "--model_name_or_path", model_dir, "--output_dir", str(tmp_path / "x")]
    with caplog.at_level(logging.INFO, logger="kdqa"):
        assert train_py.main(argv + ["--calibration_questions", "20", "--train_file", train_file]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["export: --train_file and --calibration_questions are ignored without --quantize int8"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdqa"):
        assert train_py.main(argv + ["--quantize", "int8", "--train_file", train_file]) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- Ctrl-C and SIGTERM (issue 34 §14)

# In the first forward pass of the model (torch.export's trace), the signal arrives while Python runs a
# __del__ (torch.export's tracing runs weakref callbacks too): Python drops whatever a handler raises
# there, so the export went on and kept its model (exit 0). `error`: the trace then fails, as when the
# exporter turns the interrupt into its own error (exit 1).
SIGNAL_CHILD = """
import functools, os, signal, sys, time
sys.path.insert(0, {repo!r})
import kdqa.export, train
forward, sent = kdqa.export._LogitsOnly.forward, []
class Swallowed:
    def __del__(self):
        os.kill(os.getpid(), signal.{signame})
        time.sleep(0.05)  # the handler runs here, and what it raises is dropped
@functools.wraps(forward)  # the exporter reads the forward's signature
def traced(self, *args, **kwargs):
    if not sent:
        sent.append(Swallowed())
        sent.clear()
        if {error!r}:
            raise RuntimeError("the exporter's own error")
    return forward(self, *args, **kwargs)
kdqa.export._LogitsOnly.forward = traced
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signame, error, code, name", [("SIGINT", False, 130, "Ctrl-C"),
                                                        ("SIGTERM", True, 143, "SIGTERM")])
def test_a_signal_the_exporter_swallows_still_stops_export_and_keeps_the_earlier_export(
        exported, model_dir, tmp_path, signame, error, code, name):
    import shutil
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "earlier"
    shutil.copytree(exported, out)
    before = _snapshot(out)
    env = {k: v for k, v in os.environ.items() if k != "KDQA_TRACEBACK"}
    child = subprocess.run([sys.executable, "-c", SIGNAL_CHILD.format(repo=repo, signame=signame, error=error),
                            "export", "--model_name_or_path", model_dir, "--output_dir", str(out)],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in child.stderr.splitlines() if line.startswith("train.py")]
    assert child.returncode == code and lines == [f"train.py export: interrupted ({name})"], child.stderr[-3000:]
    assert _snapshot(out) == before, "the earlier export is as it was, no staging folder left"
