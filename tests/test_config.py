"""The command line (kdqa/config.py, train.py): --config files parsed as flags are, every numeric flag
range-checked at parse time, devices and output folders checked before anything loads, and the
flags run_qa.py users type (--do_*, --fp16/--bf16, --pad_to_max_length, args.json).

Bad input must end in exit code 2 and one line on stderr naming the flag, never a traceback; most
tests stop at parsing and need no model.
"""

import copy
import json
import os
import re
import subprocess
import sys

import pytest

import train
from kdqa.config import ConfigError, parse_args
from kdqa.features import QACollator, Window
from kdqa.postprocess import Decoding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FINETUNE = ["finetune", "--model_name_or_path", "m"]


def main_error(argv, capsys, code=2) -> str:
    """Run train.py in-process; assert it failed with `code` and one line of stderr, and return that line."""
    assert train.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "out")


def write(path, text):
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------- issue 11.3: --config is parsed as flags are

@pytest.mark.parametrize("value, expected", [('"false"', False), ("false", False), ("true", True), ('"True"', True)])
def test_config_booleans_are_strict_true_or_false(tmp_path, out, value, expected):
    cfg = write(tmp_path / "c.yaml", f"group_by_length: {value}\n")
    assert parse_args(FINETUNE + ["--output_dir", out, "--config", cfg]).group_by_length is expected


@pytest.mark.parametrize("text, message", [
    ("precision: fp64\n", "invalid choice: 'fp64' (choose from 'auto', 'bf16', 'fp16', 'fp32')"),
    ("max_steps: 3.0\n", "argument --max_steps: invalid int value: '3.0'"),
    ("per_device_train_batch_size: 1.5\n", "invalid int value: '1.5'"),
    ("learning_rate: fast\n", "invalid float value: 'fast'"),
    ("group_by_length: maybe\n", "group_by_length: expected true or false, got 'maybe'"),
    ("train_file: true\n", "train_file: expected one"),
    ("num_train_epochs: -1\n", "--num_train_epochs must be > 0"),
    ("learning_rat: 0.1\nwarmup: 3\n", "unknown key(s) ['learning_rat', 'warmup'] for 'finetune'"),
])
def test_config_values_go_through_the_flags_types_choices_and_ranges(tmp_path, out, capsys, text, message):
    cfg = write(tmp_path / "c.yaml", text)
    err = main_error(FINETUNE + ["--output_dir", out, "--config", cfg], capsys)
    assert message in err


def test_config_before_the_sub_command_is_applied_and_flags_override_it(tmp_path, out):
    cfg = write(tmp_path / "c.yaml", f"learning_rate: 0.001\ntemperature: 4.0\nmodel_name_or_path: m\n"
                                     f"output_dir: {out}\nstudent_layers: [0, 2]\n")
    args = parse_args(["--config", cfg, "distill", "--teacher_model_name_or_path", "t", "--temperature", "3"])
    assert args.command == "distill" and args.learning_rate == 0.001 and args.temperature == 3.0
    assert args.model_name_or_path == "m" and args.student_layers == "0,2"
    with pytest.raises(ConfigError, match="--config is given more than once"):
        parse_args(["--config", cfg, "distill", "--config", cfg])


def test_a_lone_json_file_after_the_command_is_a_config_file_as_hfargumentparser_allows(tmp_path, out):
    cfg = write(tmp_path / "args.json", json.dumps({"model_name_or_path": "m", "output_dir": out, "do_train": True,
                                                    "do_eval": True, "fp16": False, "max_seq_length": 128,
                                                    "doc_stride": 32, "learning_rate": 3e-5}))
    args = parse_args(["finetune", cfg])
    assert (args.max_seq_length, args.doc_stride, args.learning_rate) == (128, 32, 3e-5)
    assert args.do_train and args.do_eval and args.precision == "auto"
    cfg = write(tmp_path / "args.yaml", f"model_name_or_path: m\noutput_dir: {out}\nbf16: true\n")
    assert parse_args(["finetune", cfg]).precision == "bf16"


# --------------------------------------------------------------- issue 11.5: ranges checked at parse time

@pytest.mark.parametrize("flags, flag", [
    (["--num_train_epochs", "0"], "--num_train_epochs"),
    (["--num_train_epochs", "-1"], "--num_train_epochs"),
    (["--num_train_epochs", "inf"], "--num_train_epochs"),
    (["--max_steps", "0"], "--max_steps"),
    (["--logging_steps", "0"], "--logging_steps"),
    (["--eval_strategy", "steps", "--eval_steps", "0"], "--eval_steps"),
    (["--save_steps", "-1"], "--save_steps"),
    (["--weight_decay", "-0.01"], "--weight_decay"),
    (["--adam_beta1", "-0.1"], "--adam_beta1"),
    (["--adam_beta2", "1.0"], "--adam_beta2"),
    (["--adam_epsilon", "0"], "--adam_epsilon"),
    (["--max_grad_norm", "nan"], "--max_grad_norm"),
    (["--max_grad_norm", "-1"], "--max_grad_norm"),
    (["--learning_rate", "inf"], "--learning_rate"),
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--n_best_size", "0"], "--n_best_size"),
    (["--max_answer_length", "0"], "--max_answer_length"),
    (["--max_eval_samples", "0"], "--max_eval_samples"),
    (["--max_train_samples", "0"], "--max_train_samples"),
    (["--max_query_length", "0"], "--max_query_length"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers"),
    (["--seed", "-1"], "--seed"),
    (["--student_layers", ""], "--student_layers"),
    (["--student_layers", "0,,2"], "--student_layers"),
    (["--student_layers", "0,-1"], "--student_layers"),
    (["--student_layers", "0,2,0"], "--student_layers"),
])
def test_out_of_range_numbers_are_refused_at_parse_time_naming_the_flag(out, capsys, flags, flag):
    err = main_error(FINETUNE + ["--output_dir", out, *flags], capsys)
    assert err.startswith("train.py: error: " + flag), err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "inf"], "--temperature must be > 0 and finite"),
    (["--alpha_ce", "0", "--alpha_kd", "0"], "nothing would be learnt"),
    (["--alpha_kd", "-0.5"], "--alpha_kd must be >= 0"),
])
def test_distillation_weights_and_temperature_are_range_checked(out, capsys, flags, message):
    err = main_error(["distill", "--teacher_model_name_or_path", "t", "--model_name_or_path", "m",
                      "--output_dir", out, *flags], capsys)
    assert message in err


def test_empty_student_layers_no_longer_distils_the_teacher_into_a_full_copy_of_itself(out, capsys):
    err = main_error(["distill", "--teacher_model_name_or_path", "t", "--student_layers", "", "--output_dir", out],
                     capsys)
    assert "--student_layers ''" in err and "0,2,4" in err


def test_boundaries_that_mean_something_are_accepted(out):
    args = parse_args(FINETUNE + ["--output_dir", out, "--save_steps", "0", "--max_grad_norm", "0",
                                  "--weight_decay", "0", "--max_steps", "5", "--num_train_epochs", "0"])
    assert args.save_steps == 0 and args.max_steps == 5  # 0: checkpoints at epoch ends; epochs unused
    args = parse_args(["distill", "--teacher_model_name_or_path", "t", "--student_layers", " 4, 0 ,2",
                       "--output_dir", out, "--alpha_ce", "0"])
    assert args.student_layers == "4,0,2"


# --------------------------------------------------------------- issue 11.11: one line, before anything loads

@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "mps"])
def test_unsupported_device_is_one_line_naming_the_choices(out, capsys, device):
    err = main_error(FINETUNE + ["--output_dir", out, "--device", device], capsys)
    assert f"--device {device} is not supported; choose auto, cpu, cuda or cuda:N" in err


def test_a_gpu_that_is_not_there_is_one_line_before_anything_loads(out, capsys):
    import torch

    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    err = main_error(FINETUNE + ["--output_dir", out, "--device", missing], capsys)
    assert err.startswith(f"train.py: error: --device {missing}: ")


def test_output_dir_that_is_or_sits_under_a_file_is_one_line(tmp_path, capsys):
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    err = main_error(FINETUNE + ["--output_dir", str(regular / "run")], capsys)
    assert "--output_dir" in err and "is a file" in err
    err = main_error(FINETUNE + ["--output_dir", str(regular)], capsys)
    assert "is a file, not a folder" in err
    err = main_error(["distill", "--teacher_model_name_or_path", "t", "--model_name_or_path", "m", "--output_dir",
                      str(tmp_path / "o"), "--teacher_logits_cache", str(regular / "cache")], capsys)
    assert "--teacher_logits_cache" in err


def test_output_dir_that_holds_the_starting_model_is_refused_before_anything_is_deleted(tmp_path, capsys):
    """Training into the folder it loads from would overwrite (or, with --overwrite_output_dir, delete) it."""
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text("{}")
    err = main_error(["finetune", "--model_name_or_path", str(model), "--output_dir", str(model),
                      "--overwrite_output_dir"], capsys)
    assert "is the folder of --model_name_or_path" in err and "choose another --output_dir" in err
    err = main_error(["distill", "--teacher_model_name_or_path", str(model / "."), "--model_name_or_path", "m",
                      "--output_dir", str(model)], capsys)
    assert "is the folder of --teacher_model_name_or_path" in err
    inner = model / "checkpoint-10"
    inner.mkdir()
    err = main_error(["finetune", "--model_name_or_path", str(inner), "--output_dir", str(model),
                      "--overwrite_output_dir"], capsys)
    assert "lies inside --output_dir" in err
    assert (model / "config.json").exists() and inner.exists(), "nothing was deleted"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_output_dir_without_write_permission_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = main_error(FINETUNE + ["--output_dir", str(locked / "run")], capsys)
    assert "no permission to write" in err


def test_precision_errors_name_the_choices(out, capsys):
    err = main_error(FINETUNE + ["--output_dir", out, "--precision", "fp64"], capsys)
    assert "invalid choice: 'fp64'" in err and "'bf16'" in err and "'fp32'" in err
    err = main_error(FINETUNE + ["--output_dir", out, "--fp16", "--device", "cpu"], capsys)
    assert "--precision fp16 needs a CUDA GPU" in err and "fp32 or bf16" in err


# --------------------------------------------------------------- issue 12: what run_qa.py users type

def test_fp16_and_bf16_are_aliases_of_precision(out, capsys):
    assert parse_args(FINETUNE + ["--output_dir", out, "--bf16"]).precision == "bf16"
    args = parse_args(FINETUNE + ["--output_dir", out, "--fp16", "--precision", "fp16"])
    assert args.precision == "fp16" and not hasattr(args, "fp16")
    assert "--fp16 contradicts --precision bf16" in main_error(
        FINETUNE + ["--output_dir", out, "--fp16", "--precision", "bf16"], capsys)
    assert "contradict" in main_error(FINETUNE + ["--output_dir", out, "--fp16", "--bf16"], capsys)


def test_version_2_with_negative_is_refused_as_squad_v1_only(out, capsys):
    err = main_error(FINETUNE + ["--output_dir", out, "--version_2_with_negative"], capsys)
    assert "SQuAD v1.1 only" in err


def test_help_says_where_our_defaults_differ_from_run_qa(capsys):
    with pytest.raises(SystemExit):
        parse_args(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, theirs in (("--per_device_train_batch_size", "8"), ("--learning_rate", "5e-05"),
                         ("--weight_decay", "0.0"), ("--pad_to_max_length", "True")):
        section = help_text[help_text.index(flag + " ", help_text.index("options:")):]
        assert f"run_qa.py's: {theirs})" in section[:400], flag


@pytest.fixture
def phases(monkeypatch):
    """train.py with the trainer and kdqa.inference replaced by recorders: which phases ran, and how."""
    import kdqa.inference
    import kdqa.trainer

    calls = []
    monkeypatch.setattr(kdqa.trainer, "train", lambda args: calls.append(("train", args)) or {})
    monkeypatch.setattr(kdqa.inference, "evaluate_command", lambda args: calls.append(("evaluate", args)) or {})
    monkeypatch.setattr(kdqa.inference, "predict_command", lambda args: calls.append(("predict", args)) or {})
    return calls


def run_phases(calls, argv):
    assert train.main(argv) == 0
    return [(name, args.model_name_or_path, getattr(args, "eval_strategy", None)) for name, args in calls]


@pytest.mark.parametrize("flags, expected", [
    ([], [("train", "m", "epoch")]),  # no --do_*: train and evaluate, as always
    (["--do_train", "--do_eval"], [("train", "m", "epoch")]),
    (["--do_train"], [("train", "m", "no")]),
    (["--do_eval"], [("evaluate", "m", "epoch")]),
    (["--do_train", "--do_predict", "--test_file", "TEST"], [("train", "m", "no"), ("predict", "OUT", "no")]),
    (["--do_predict", "--test_file", "TEST"], [("predict", "m", "epoch")]),
])
def test_do_flags_choose_the_phases_as_in_run_qa(phases, tmp_path, out, flags, expected):
    test_file = write(tmp_path / "test.json", "{}")
    flags = [test_file if f == "TEST" else f for f in flags]
    ran = run_phases(phases, FINETUNE + ["--output_dir", out, *flags])
    assert ran == [(name, out if model == "OUT" else model, strategy) for name, model, strategy in expected]


@pytest.mark.parametrize("flags, message", [
    (["--do_predict"], "--do_predict needs --test_file"),
    (["--do_predict", "--test_file", "missing.json"], "--test_file missing.json: file not found"),
    (["--test_file", "t.json"], "--test_file is read by --do_predict only"),
    (["--do_train", "--eval_strategy", "steps", "--eval_steps", "5"], "add --do_eval"),
])
def test_inconsistent_do_flags_are_one_line(out, capsys, flags, message):
    assert message in main_error(FINETUNE + ["--output_dir", out, *flags], capsys)


def test_distill_eval_only_needs_no_teacher_but_a_model(phases, out, capsys):
    assert run_phases(phases, ["distill", "--model_name_or_path", "m", "--output_dir", out, "--do_eval"]) == [
        ("evaluate", "m", "epoch")]
    err = main_error(["distill", "--teacher_model_name_or_path", "t", "--student_layers", "0", "--output_dir", out,
                      "--do_eval"], capsys)
    assert "--model_name_or_path" in err


def test_collator_pads_to_a_fixed_length_when_asked():
    features = [{"input_ids": [5, 6, 7], "start_positions": 1, "end_positions": 2},
                {"input_ids": [5, 6], "start_positions": 0, "end_positions": 0}]
    assert QACollator(0)(features)["input_ids"].shape == (2, 8)
    batch = QACollator(0, pad_to_length=24)(features)
    assert batch["input_ids"].shape == (2, 24) and batch["attention_mask"].sum().item() == 5


def test_pad_to_max_length_reaches_the_collator(tmp_path, monkeypatch):
    """evaluate --pad_to_max_length on a tiny model: every batch is --max_seq_length wide."""
    import kdqa.inference
    from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

    widths = []

    class RecordingCollator(QACollator):
        def __call__(self, features):
            batch = super().__call__(features)
            widths.append(batch["input_ids"].shape[1])
            return batch

    monkeypatch.setattr(kdqa.inference, "QACollator", RecordingCollator)
    model = make_model_folder(str(tmp_path / "m"), tiny_bert_config(dropout=0.0))
    dev = write_squad(str(tmp_path / "dev.json"), make_name_task(8, seed=2, prefix="d"))
    argv = ["evaluate", "--model_name_or_path", model, "--validation_file", dev, "--output_dir",
            str(tmp_path / "ev"), "--max_seq_length", "96", "--doc_stride", "32", "--disable_tqdm",
            "--pad_to_max_length"]
    assert train.main(argv) == 0 and set(widths) == {96}  # the features are shorter (the collator test above)


# --------------------------------------------------------------- issue 23.3: flag groups, windows and decoding


def test_help_documents_every_flag_with_its_default():
    out = subprocess.run([sys.executable, "train.py", "distill", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--train_file", "--validation_file", "--max_seq_length", "--doc_stride", "--max_query_length",
                 "--per_device_train_batch_size", "--per_device_eval_batch_size", "--gradient_accumulation_steps",
                 "--learning_rate", "--weight_decay", "--warmup_ratio", "--num_train_epochs", "--max_steps",
                 "--max_grad_norm", "--max_train_samples", "--max_eval_samples", "--precision", "--loss_impl",
                 "--seed", "--logging_steps", "--eval_strategy", "--eval_steps", "--save_steps",
                 "--resume_from_checkpoint", "--n_best_size", "--max_answer_length", "--student_layers", "--config",
                 "--temperature", "--alpha_ce", "--alpha_kd", "--teacher_logits_cache", "--group_by_length",
                 "--torch_compile"):
        assert flag in out, flag
    assert "(default: 384)" in out and "(default: 2.0)" in out


def test_config_file_sets_flags_and_flags_override_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.001\ntemperature: 4.0\nmodel_name_or_path: m\noutput_dir: o\n")
    args = parse_args(["distill", "--config", str(cfg), "--teacher_model_name_or_path", "t", "--temperature", "3"])
    assert args.learning_rate == 0.001 and args.temperature == 3.0 and args.model_name_or_path == "m"
    cfg.write_text('{"learning_rat": 0.1}')
    os.rename(cfg, tmp_path / "c.json")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rat'\]"):
        parse_args(["finetune", "--config", str(tmp_path / "c.json"), "--model_name_or_path", "m"])
    with pytest.raises(ConfigError, match="--temperature must be > 0"):
        parse_args(["distill", "--teacher_model_name_or_path", "t", "--model_name_or_path", "m", "--output_dir",
                    "o", "--temperature", "0"])


def test_finetune_and_distill_share_every_key_and_the_mode_is_stated(tmp_path):
    """One config file serves both training modes; evaluate has only the keys it reads."""
    finetune = parse_args(["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path),
                           "--teacher_model_name_or_path", "t"])
    distill = parse_args(["distill", "--model_name_or_path", "m", "--output_dir", str(tmp_path),
                          "--teacher_model_name_or_path", "t"])
    evaluate = parse_args(["evaluate", "--model_name_or_path", "m", "--output_dir", str(tmp_path)])
    assert (finetune.mode, distill.mode, evaluate.mode) == ("finetune", "distill", None)
    assert set(vars(distill)) == set(vars(finetune))
    assert set(vars(evaluate)) < set(vars(distill))
    assert not {"learning_rate", "temperature", "train_file", "report_to"} & set(vars(evaluate))
    assert finetune.temperature == 2.0 and finetune.teacher_logits_cache is None


def _imports_torch(*argv) -> bool:
    """Whether `train.py ARGV` (which must exit 0, e.g. --help) imports torch, in a fresh interpreter."""
    code = ("import sys, train\n"
            "try:\n    train.main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_help_does_not_import_torch():
    assert not _imports_torch("--help")
    assert not _imports_torch("distill", "--help")


# Per command: flags its --help must list, and flags of groups it does not have.
HELP_LISTS = {
    "finetune": (["--learning_rate", "--temperature", "--max_seq_length", "--n_best_size", "--do_train",
                  "--report_to"], ["--question", "--opset", "--data_dir"]),
    "distill": (["--teacher_model_name_or_path", "--alpha_hidden", "--doc_stride", "--max_answer_length"],
                ["--question", "--tolerance", "--full"]),
    "evaluate": (["--validation_file", "--max_seq_length", "--n_best_size", "--precision", "--fp16",
                  "--pad_to_max_length"],
                 ["--learning_rate", "--temperature", "--train_file", "--max_steps", "--report_to", "--seed",
                  "--do_train", "--student_layers"]),
    "predict": (["--n_best_size", "--max_seq_length", "--question", "--runtime", "--quantize"],
                ["--learning_rate", "--temperature", "--precision", "--validation_file", "--opset"]),
    "export": (["--quantize", "--tolerance", "--opset", "--train_file", "--calibration_questions",
                "--max_seq_length",  # the calibration windows of --quantize int8
                "--validation_file", "--max_int8_drop"],  # the int8 check's held-out questions and bound
               ["--n_best_size", "--learning_rate", "--device"]),
    "recipe": (["--data_dir", "--teacher_num_train_epochs", "--speed_test_questions", "--learning_rate",
                "--n_best_size"], ["--question", "--opset", "--do_train"]),
}


@pytest.mark.parametrize("command", sorted(HELP_LISTS))
def test_each_commands_help_lists_only_its_groups(command, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args([command, "--help"])
    assert stop.value.code == 0
    listed = set(re.findall(r"--[a-z_0-9]+", capsys.readouterr().out))
    has, lacks = HELP_LISTS[command]
    assert set(has) <= listed, set(has) - listed
    assert not set(lacks) & listed, set(lacks) & listed


def test_evaluate_refuses_the_training_flags_it_used_to_ignore(out, capsys):
    err = main_error(["evaluate", "--model_name_or_path", "m", "--output_dir", out, "--learning_rate", "1e-3"],
                     capsys)
    assert "--learning_rate" in err and "evaluate --help" in err


def test_window_and_decoding_are_values_that_follow_their_flags(out):
    args = parse_args(FINETUNE + ["--output_dir", out, "--max_seq_length", "96", "--doc_stride", "32",
                                  "--n_best_size", "5"])
    assert args.window == Window(max_seq_length=96, doc_stride=32, max_query_length=64)
    assert args.decoding == Decoding(n_best_size=5, max_answer_length=30)
    json.dumps(vars(args))  # resume settings, training_args.json and report cards dump the flags
    assert "window" not in vars(args) and "decoding" not in vars(args)
    args.max_seq_length = 256  # as the recipe's CPU preset sets it after parsing
    assert args.window.max_seq_length == 256 and copy.deepcopy(args).window == args.window
    predict = parse_args(["predict", "--model_name_or_path", "m", "--question", "q", "--context", "c",
                          "--max_answer_length", "7"])
    assert predict.decoding == Decoding(20, 7) and predict.window == Window()


@pytest.mark.parametrize("command", [["evaluate", "--output_dir", "OUT"], ["predict", "--question", "q",
                                                                          "--context", "c"]])
def test_every_command_with_windows_checks_the_stride(command, out, capsys):
    argv = [command[0], "--model_name_or_path", "m"] + [out if a == "OUT" else a for a in command[1:]]
    err = main_error(argv + ["--max_seq_length", "64", "--doc_stride", "64"], capsys)
    assert "--doc_stride must be smaller than --max_seq_length" in err


def test_evaluate_keeps_refusing_fp16_on_the_cpu(out, capsys):
    err = main_error(["evaluate", "--model_name_or_path", "m", "--output_dir", out, "--fp16", "--device", "cpu"],
                     capsys)
    assert "--precision fp16 needs a CUDA GPU" in err


# --------------------------------------------------------------------------- a model folder that is gone (issue 34, 16)

@pytest.mark.parametrize("command, flag", [("finetune", "--model_name_or_path"), ("recipe", "--teacher_model_name_or_path"),
                                           ("predict", "--model_name_or_path"), ("export", "--model_name_or_path"),
                                           ("evaluate", "--model_name_or_path")])
def test_a_missing_model_folder_is_named_as_such_never_as_a_hub_name(tmp_path, capsys, monkeypatch, command, flag):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    extra = {"predict": ["--question", "q", "--context", "c"]}.get(command, [])
    for gone in (str(tmp_path / "gone" / "model"), "./no_such_run/teacher", "~/no_such_model_here",
                 "runs/teacher"):  # ORG/NAME whose ORG is a local folder: a path
        argv = [command, flag, gone, "--output_dir", str(tmp_path / "o"), *extra]
        line = main_error(argv, capsys)
        assert f"{flag} {gone}: no such folder" in line and "hf download" not in line, line
    args = parse_args([command, flag, "google/bert_uncased_L-2_H-128_A-2", "--output_dir", str(tmp_path / "o"),
                       *extra])  # a hub name is still one
    assert getattr(args, flag[2:]) == "google/bert_uncased_L-2_H-128_A-2"


def test_export_takes_disable_tqdm_and_silences_the_bars(tmp_path, monkeypatch):
    """kdqa's own flag on every command with progress bars: export loads a model and tokenises."""
    import datasets
    import transformers

    import kdqa.export

    args = parse_args(["export", "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "onnx"),
                       "--disable_tqdm"])
    monkeypatch.setattr(kdqa.export, "export_model", lambda *a, **k: {"files": []})
    try:
        kdqa.export.export_command(args)
        assert not datasets.is_progress_bar_enabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
