"""The command line split by job (issue 30 §3): each choice list written once and offered by the
parser as the library checks it, export's parse-time rules torch-free, argparse's private parts
touched by one module only, the doc_stride rule one check for every command with windows, and
train.py's commands visible as plain imports."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import train
from kdqa import choices
from kdqa.argv_config import actions, subparsers
from kdqa.config import build_parser

REPO = pathlib.Path(__file__).resolve().parents[1]


def _choices(command: str, flag: str):
    parser = subparsers(build_parser())[command]
    return next(tuple(a.choices) for a in actions(parser) if flag in a.option_strings)


@pytest.mark.parametrize("command, flag, expected", [
    ("predict", "--runtime", choices.RUNTIMES), ("predict", "--quantize", choices.PREDICT_QUANTIZE),
    ("export", "--quantize", choices.EXPORT_QUANTIZE), ("finetune", "--loss_impl", choices.LOSS_IMPLS),
    ("recipe", "--loss_impl", choices.LOSS_IMPLS),
])
def test_the_parser_offers_the_choice_lists_the_library_checks(command, flag, expected):
    assert _choices(command, flag) == expected


def test_the_library_refuses_what_the_choice_lists_leave_out(tmp_path):
    from kdqa import export, inference, loss

    assert export.EXPORT_QUANTIZE is choices.EXPORT_QUANTIZE
    assert inference.RUNTIMES is choices.RUNTIMES and inference.PREDICT_QUANTIZE is choices.PREDICT_QUANTIZE
    assert loss.IMPLS is choices.LOSS_IMPLS  # written once
    with pytest.raises(ValueError, match="runtime must be one of"):
        inference.QAPredictor.load(str(tmp_path), runtime="tensorrt")
    with pytest.raises(ValueError, match="quantize must be one of"):
        inference.QAPredictor.load(str(tmp_path), quantize="int4")
    with pytest.raises(export.ExportError, match="quantize must be one of"):
        export.export_model(str(tmp_path), str(tmp_path / "onnx"), quantize="int4")


def test_parsing_modules_and_export_rules_import_no_torch():
    code = ("import sys\nimport kdqa.config, kdqa.flags, kdqa.validation, kdqa.export_rules, kdqa.choices\n"
            "print(sorted(m for m in ('torch', 'onnx', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# argparse's private parts: its action lists, value check, defaults, sub-parser action class, register hook.
PRIVATE_ARGPARSE = re.compile(r"\._actions\b|\._option_string_actions\b|\._check_value\b|\._get_value\b"
                              r"|\._defaults\b|argparse\._|\.register\(")


def test_argparse_private_parts_are_used_in_argv_config_only():
    users = {path.name for path in (REPO / "kdqa").glob("*.py") if PRIVATE_ARGPARSE.search(path.read_text())}
    assert users == {"argv_config.py"}


def test_export_checks_the_stride_with_the_rule_every_command_shares(tmp_path, capsys):
    argv = ["export", "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "onnx"),
            "--max_seq_length", "64", "--doc_stride", "64"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--doc_stride must be smaller than --max_seq_length"), err


def test_train_py_imports_its_commands_by_name():
    tree = ast.parse((REPO / "train.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("kdqa") for alias in node.names}
    assert {"run_recipe", "evaluate_command", "predict_command", "export_command", "train"} <= imported
    assert "importlib" not in {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                               for alias in node.names}
