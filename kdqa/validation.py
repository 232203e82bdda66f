"""The parse-time checks of train.py's command line: every wrong value or flag combination that can
be caught before a model or data set is loaded, each as one ConfigError line naming the flag and the
fix. Ranges of single flags are a table (RANGES); the rules that live with the code that applies
them (the loss's temperature bound, the loss terms', --student_layers', export's) are imported from
there, and the torch ones only here, after parsing, so `train.py --help` stays light.
"""

from __future__ import annotations

import argparse
import math
import os
import re

from kdqa.config_error import ConfigError
from kdqa.export_rules import CALIBRATION_HELP, check_opset


def check_output_dir(path: str, flag: str = "--output_dir") -> None:
    """Fail before any model is loaded when `path` cannot become a writable folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: {parent} is a file, so no folder can be made under it; "
                          f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: no permission to write in {parent}; choose another {flag}")


def _check_models_outside_output_dir(args: argparse.Namespace) -> None:
    """A training run must not write over the model folder it starts from (its final save would, and
    --overwrite_output_dir would delete it before it is even loaded)."""
    out = os.path.realpath(args.output_dir)
    for flag in ("model_name_or_path", "teacher_model_name_or_path"):
        path = getattr(args, flag, None)
        if not path or not os.path.isdir(path):
            continue
        real = os.path.realpath(path)
        if real == out:
            raise ConfigError(f"--output_dir {args.output_dir} is the folder of --{flag}: training would overwrite "
                              f"the model it starts from; choose another --output_dir")
        if getattr(args, "overwrite_output_dir", False) and real.startswith(out + os.sep):
            raise ConfigError(f"--{flag} {path} lies inside --output_dir {args.output_dir}, which "
                              "--overwrite_output_dir empties first; copy the model elsewhere or choose another "
                              "--output_dir")


DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_cuda_device(device: str) -> None:
    """--device cuda[:N] on a machine that has that GPU (torch is imported only here, to keep parsing fast)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _at_least(low: int):
    return (lambda v: v >= low), f"at least {low}"


_POSITIVE = (lambda v: math.isfinite(v) and v > 0), "> 0 and finite"
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0), ">= 0 and finite"
_UNIT = (lambda v: 0 <= v < 1), "in [0, 1)"


# Range of every numeric flag, checked on every command that has it; None (not set) always passes.
RANGES = {
    "max_seq_length": _at_least(1), "doc_stride": _at_least(1), "max_query_length": _at_least(1),
    "max_train_samples": _at_least(1), "max_eval_samples": _at_least(1),
    "preprocessing_num_workers": _at_least(1), "dataloader_num_workers": _at_least(0),
    "n_best_size": _at_least(1), "max_answer_length": _at_least(1),
    "per_device_train_batch_size": _at_least(1), "per_device_eval_batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1),
    "learning_rate": _POSITIVE, "teacher_learning_rate": _POSITIVE, "weight_decay": _NON_NEGATIVE,
    "adam_beta1": _UNIT, "adam_beta2": _UNIT, "adam_epsilon": _POSITIVE, "warmup_ratio": _UNIT,
    "teacher_num_train_epochs": _POSITIVE, "max_grad_norm": _NON_NEGATIVE,
    "seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
    "logging_steps": ((lambda v: isinstance(v, int) and v >= 1 or 0 < v < 1),
                      "a whole number at least 1, or a fraction of all steps in (0, 1)"),
    "eval_steps": _at_least(1), "max_predict_samples": _at_least(1),
    "save_steps": ((lambda v: v >= 0), "at least 0 (0: checkpoints at epoch ends only)"),
    "save_total_limit": _at_least(1),
    "temperature": _POSITIVE, "alpha_ce": _NON_NEGATIVE, "alpha_kd": _NON_NEGATIVE, "alpha_hidden": _NON_NEGATIVE,
    "alpha_attention": _NON_NEGATIVE, "speed_test_questions": _at_least(1),
}


def validate_args(args: argparse.Namespace) -> None:
    """Catch wrong values and flag combinations before anything is loaded."""
    _check_ranges(args)
    if args.command in TRAINING_COMMANDS:
        _validate_training_flags(args)
    if hasattr(args, "doc_stride") and args.doc_stride >= args.max_seq_length:  # every command with windows
        raise ConfigError("--doc_stride must be smaller than --max_seq_length")
    if getattr(args, "student_layers", None) is not None:
        args.student_layers = ",".join(str(i) for i in _parse_student_layers(args.student_layers))
    device = getattr(args, "device", "auto")
    if DEVICES.fullmatch(device) is None:
        raise ConfigError(f"--device {device} is not supported; choose auto, cpu, cuda or cuda:N (N: the GPU's index)")
    if device.startswith("cuda"):
        _check_cuda_device(device)
    if getattr(args, "precision", None) == "fp16" and device == "cpu":
        raise ConfigError("--precision fp16 needs a CUDA GPU; on the CPU choose --precision auto, fp32 or bf16")
    _check_model_paths(args)
    if args.command in INFERENCE_COMMANDS:
        return validate_inference_args(args)
    _check_models_and_files(args)
    if args.output_dir is not None:
        from kdqa import run_dir  # it reads checkpoints (torch): after parsing only, so that --help stays light

        check_output_dir(args.output_dir)
        if args.command in ("finetune", "distill"):
            _check_models_outside_output_dir(args)
        precious = run_dir.precious_dir_reason(args.output_dir) if args.command in TRAINING_COMMANDS else None
        if precious is not None:
            raise ConfigError(f"--output_dir {args.output_dir} is {precious}: a run writes its model and files "
                              "there; give it a folder of its own, e.g. --output_dir runs/NAME")
    if getattr(args, "teacher_logits_cache", None):
        check_output_dir(args.teacher_logits_cache, "--teacher_logits_cache")


TRAINING_COMMANDS = ("finetune", "distill", "recipe")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # NAME or ORG/NAME, as the hub spells repository ids


def is_missing_path(name: str) -> bool:
    """A model name that can only be a local path (./, ../, ~, /, a backslash, two or more '/', a form no
    hub name has, or ORG/NAME whose ORG is a local folder) and that does not exist: a missing folder,
    which the hub must not be asked for (it would suggest `hf download /path/...`)."""
    if os.path.exists(name):
        return False
    head = name.split("/", 1)[0]
    return (name.startswith((".", "~", "/")) or "\\" in name or name.count("/") > 1 or ".." in name or "--" in name
            or HUB_NAME.fullmatch(name) is None or ("/" in name and os.path.isdir(head)))


def _check_model_paths(args: argparse.Namespace) -> None:
    """Every model flag the command reads that names a local path names one that exists (only training
    with distill or the recipe reads the teacher: one config file may serve both modes before it is trained)."""
    reads_teacher = args.command == "recipe" or (args.command == "distill" and args.do_train)
    for flag in ("model_name_or_path", "teacher_model_name_or_path"):
        name = getattr(args, flag, None) if flag == "model_name_or_path" or reads_teacher else None
        if name and is_missing_path(name):
            raise ConfigError(f"--{flag} {name}: no such folder (a path, not a hub name, which reads NAME or "
                              "ORG/NAME); check the path, or train or copy the model there first")


def _check_ranges(args: argparse.Namespace) -> None:
    """Every numeric flag the command has within RANGES (and --temperature within the loss's bound)."""
    checks = dict(RANGES)
    if hasattr(args, "temperature"):
        from kdqa.loss import MAX_TEMPERATURE  # torch: after parsing only, so that --help stays light

        checks["temperature"] = ((lambda v: 0 < v <= MAX_TEMPERATURE),
                                 f"> 0 and finite, at most {MAX_TEMPERATURE:g} (the KD term is exact up to there)")
    for name, (in_range, expected) in checks.items():
        value = getattr(args, name, None)
        if not (value is None or in_range(value)):
            raise ConfigError(f"--{name} must be {expected}, got {value}")


def _parse_student_layers(spec: str) -> list[int]:
    """--student_layers read by its one reader (kdqa.hidden_distill), its error as a ConfigError."""
    from kdqa.hidden_distill import parse_student_layers  # torch: after parsing only

    try:
        return parse_student_layers(spec)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_models_and_files(args: argparse.Namespace) -> None:
    """The models and files finetune, distill and evaluate need, by the phases they run."""
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)

    if args.command in ("finetune", "evaluate"):
        need(args.model_name_or_path is not None, f"{args.command} needs --model_name_or_path")
    if args.command == "distill":
        if args.do_train:
            need(args.teacher_model_name_or_path is not None, "distill needs --teacher_model_name_or_path")
            need(args.model_name_or_path is not None or args.student_layers is not None,
                 "distill needs a student: --model_name_or_path S, or --student_layers 0,2,4 to build it from "
                 "the teacher")
        else:
            need(args.model_name_or_path is not None,
                 "--do_eval/--do_predict without --do_train use --model_name_or_path as it is: give it")
    if args.command in ("finetune", "distill"):
        need(args.do_predict or args.test_file is None, "--test_file is read by --do_predict only: add --do_predict")
        if args.do_predict:
            need(args.test_file is not None, "--do_predict needs --test_file F (the questions to answer)")
            need(not os.path.isdir(args.test_file), f"--test_file {args.test_file} is a folder; give the file")
            need(os.path.isfile(args.test_file), f"--test_file {args.test_file}: file not found")
    if args.command in ("finetune", "distill", "evaluate"):
        need(args.output_dir is not None, f"{args.command} needs --output_dir")


def _validate_training_flags(args: argparse.Namespace) -> None:
    """Flag combinations of the training loop (ranges of single flags are in RANGES)."""
    from kdqa import objective  # the loss terms' rules; it imports torch, so only after parsing (--help)

    if not (args.max_steps == -1 or args.max_steps >= 1):
        raise ConfigError(f"--max_steps must be at least 1 (or -1: train --num_train_epochs), got {args.max_steps}")
    if args.max_steps == -1 and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        raise ConfigError(f"--num_train_epochs must be > 0 and finite, got {args.num_train_epochs}")
    if args.eval_strategy == "steps" and args.eval_steps is None:
        raise ConfigError("--eval_strategy steps needs --eval_steps N (N >= 1)")
    distills = args.command in ("distill", "recipe")
    if distills and args.alpha_ce == 0 and args.alpha_kd == 0 and not objective.terms_on(args):
        raise ConfigError("--alpha_ce and --alpha_kd are both 0: nothing would be learnt; "
                          "give one of them a weight > 0")
    if distills:
        try:
            objective.check_terms(args)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if distills and (problem := objective.cache_conflict(args)):
        raise ConfigError(problem)


INFERENCE_COMMANDS = ("predict", "export")


def validate_inference_args(args: argparse.Namespace) -> None:
    """Flag combinations of predict and export, caught before any model is loaded."""
    if not args.model_name_or_path:
        raise ConfigError(f"{args.command} needs --model_name_or_path (a model folder)")
    if args.command == "export":
        if not args.output_dir:
            raise ConfigError("export needs --output_dir (where model.onnx goes)")
        if not args.tolerance > 0:
            raise ConfigError(f"--tolerance must be > 0, got {args.tolerance}")
        _check_calibration_flags(args)
        check_output_dir(args.output_dir)
        return check_opset(args.opset)
    for flag in ("question", "context"):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise ConfigError(f"predict: --{flag} is empty; give its text")
    one = args.question is not None or args.context is not None
    if one and (args.question is None or args.context is None):
        raise ConfigError("predict: --question and --context go together; give both")
    if one == (args.test_file is not None):
        raise ConfigError("predict needs either --question Q --context C or --test_file F (not both)")
    if args.test_file is not None and not args.output_dir:
        raise ConfigError("predict --test_file needs --output_dir (where predict_predictions.json goes)")
    if args.test_file is not None and os.path.isdir(args.test_file):
        raise ConfigError(f"--test_file {args.test_file} is a folder; give the file")
    if args.output_dir:
        check_output_dir(args.output_dir)


def _check_calibration_flags(args: argparse.Namespace) -> None:
    """export --quantize int8 calibrates on training questions: they must be given and counted sanely."""
    if args.calibration_questions < 1:
        raise ConfigError(f"--calibration_questions must be at least 1, got {args.calibration_questions}")
    if args.quantize == "int8" and not args.train_file:
        raise ConfigError(CALIBRATION_HELP)
    for flag in ("train_file", "validation_file"):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            raise ConfigError(f"--{flag} {getattr(args, flag)}: no such file")
    if not args.max_int8_drop >= 0:
        raise ConfigError(f"--max_int8_drop must be >= 0 (F1 points), got {args.max_int8_drop}")
