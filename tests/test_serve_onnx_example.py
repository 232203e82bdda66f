"""benchmarks/serve_onnx_example.py, the README's plain-ONNX-Runtime serving code, decodes as kdqa does.

Here the example's windows and span decoding run on a tiny BERT's PyTorch logits (a stand-in for the
InferenceSession, so no export is needed) against kdqa's predictor on the same model; the example on
a real `train.py export` is checked in test_export.py, which exports once for all its tests. Windows
are short so that a context spans several, as SQuAD's long contexts do at 384/128.
"""

import importlib.util
import pathlib
import types

import numpy as np
import pytest
import torch

from kdqa.features import Window
from kdqa.inference import QAPredictor
from kdqa.modeling import load_qa_model
from tiny_models import FILLER, make_model_folder, make_name_task, tiny_bert_config

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "serve_onnx_example.py"
WINDOW = dict(max_seq_length=24, doc_stride=8)


def load_example():
    spec = importlib.util.spec_from_file_location("serve_onnx_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def questions():
    """The synthetic name task, plus a long context (many windows) and a question with leading whitespace."""
    examples = make_name_task(10, seed=11)
    long = dict(examples[0], id="long", context=" ".join(FILLER[:40]) + " n3 " + " ".join(FILLER[40:]) + " .",
                question="  who is named here")
    return examples + [long]


def as_columns(examples):
    return {k: [e[k] for e in examples] for k in ("id", "question", "context")}


class TorchSession:
    """What OnnxQA needs of an InferenceSession (get_inputs, run), answered by the PyTorch model."""

    def __init__(self, model, input_names):
        self.model, self.input_names = model, input_names

    def get_inputs(self):
        return [types.SimpleNamespace(name=n) for n in self.input_names]

    def run(self, names, feed):
        with torch.no_grad():
            out = self.model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        return [out.start_logits.numpy(), out.end_logits.numpy()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(str(tmp_path_factory.mktemp("bert")), tiny_bert_config(dropout=0.0), seed=5)


def example_on_torch(model_dir):
    """The example's OnnxQA with the PyTorch model in place of its InferenceSession."""
    from transformers import AutoTokenizer

    qa = load_example().OnnxQA.__new__(load_example().OnnxQA)
    qa.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    qa.session = TorchSession(load_qa_model(model_dir).eval(), qa.tokenizer.model_input_names)  # as the export
    qa.inputs = [i.name for i in qa.session.get_inputs()]
    qa.max_seq_length, qa.doc_stride = WINDOW["max_seq_length"], WINDOW["doc_stride"]
    return qa


def test_example_decodes_like_kdqa_predictor(model_dir):
    example, qa = load_example(), example_on_torch(model_dir)
    examples = questions()
    assert len(example.windows(qa.tokenizer, examples[-1]["question"], examples[-1]["context"], **WINDOW)["input_ids"]) > 3
    expected, _ = QAPredictor.load(model_dir, runtime="torch", window=Window(**WINDOW)).predict(as_columns(examples))
    for e in examples:
        text, score = qa.answer(e["question"], e["context"])
        assert text == expected[e["id"]].text, e["id"]
        np.testing.assert_allclose(score, expected[e["id"]].score, rtol=0, atol=1e-5)


def test_example_command_line_names_a_folder_without_model_onnx(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_example().main([str(tmp_path), "--question", "q", "--context", "c"])
    err = capsys.readouterr().err
    assert "has no model.onnx" in err and "train.py export" in err
