"""The command line of train.py: sub-commands, every flag with its default, and --config files.

Flags come in groups (model, data, windows, decoding, runtime, training, distillation, run_qa.py
compatibility, and predict's, export's and the recipe's own), each declared once; COMMANDS gives
each sub-command the groups it reads, so its --help lists only those. Parsing imports no torch:
`train.py --help` stays instant, and the rules that need torch (kdqa.objective, kdqa.loss) are
imported only to validate a parsed command line.

Flag names follow Hugging Face's run_qa.py so SQuAD users feel at home (its --do_*, --fp16/--bf16,
--pad_to_max_length and `COMMAND args.json` work too; without a sub-command, a run_qa.py command
line means finetune, and TrainingArguments' forms such as `--fp16 True` are accepted). A --config
file (YAML or JSON) holds the same keys as the flags and is parsed by the same parser, so its values
meet the same types, choices and range checks; flags given on the command line override it.
Every error is a ConfigError: one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys

import yaml

from kdqa.choices import EXPORT_QUANTIZE, LOSS_IMPLS, PREDICT_QUANTIZE, RUNTIMES
from kdqa.config_error import ConfigError
from kdqa.dev_sample import DEFAULT_EVAL_SAMPLE, EVAL_SAMPLE_HELP, EVAL_SAMPLES
from kdqa.export_rules import (CALIBRATION_HELP, DEFAULT_CALIBRATION_QUESTIONS, DEFAULT_MAX_INT8_DROP,
                               DEFAULT_OPSET, DEFAULT_TOLERANCE, MAX_INT8_DROP_HELP, check_opset)
from kdqa.postprocess import Decoding


RECIPE_DEFAULTS = {
    "teacher_model_name_or_path": "bert-base-uncased",
    "model_name_or_path": "distilbert-base-uncased",
    "teacher_num_train_epochs": 2.0,
    "num_train_epochs": 3.0,
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag raises ConfigError (one line from train.py, exit 2) instead of exiting here.

    Every store_true flag also takes HfArgumentParser's value form (`--fp16 True`, `--pad_to_max_length
    False`), and a TrainingArguments flag kdqa lacks is named as such, not as "unrecognized".
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", "store_true", _BoolFlag)

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            flags = [token[2:].split("=")[0] for token in message.split(": ", 1)[1].split() if token.startswith("--")]
            unsupported = unsupported_hf_flags(flags)
            if unsupported:
                raise ConfigError(unsupported_message(unsupported))
        raise ConfigError(message)


def str_to_bool(text) -> bool:
    """HfArgumentParser's booleans: yes/true/t/y/1 and no/false/f/n/0, any case."""
    value = str(text).lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _BoolFlag(argparse.Action):
    """A store_true flag that also takes a value, as run_qa.py users type it: `--fp16`, `--fp16 True`."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs="?", const=True, default=default, type=str_to_bool,
                         required=required, help=help, metavar="BOOL")

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def steps_or_ratio(text) -> int | float:
    """TrainingArguments' *_steps: a whole number of steps, or a float below 1, a fraction of all steps."""
    value = float(text)
    return int(value) if math.isfinite(value) and value >= 1 and value == int(value) else value


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML or JSON file of flag values, parsed and checked as the flags are (flags given on the "
                        "command line override it); `train.py COMMAND args.json` means the same")


# ----------------------------------------------------------------------------- the flag groups
# Each group is declared once, here; COMMAND_GROUPS gives each command the groups it reads.

MODEL_HELP = {
    "finetune": "the model to fine-tune (folder or hub name)",
    "distill": "the student's starting weights (folder or hub name); see --student_layers",
    "evaluate": "the model to evaluate (folder or hub name)",
    "predict": "a model folder (train.py output), or an exported one / a .onnx file (ONNX Runtime)",
    "export": "the model folder to export",
    "recipe": "the student's base model (ignored where --student_layers builds it from the teacher)",
}
OUTPUT_DIR_HELP = {
    "evaluate": "where eval_predictions.json, eval_nbest_predictions.json and eval_results.json go",
    "predict": "where predict_predictions.json goes (with --test_file)",
    "export": "where model.onnx and the tokenizer go (may be the model folder)",
}


def _add_model_args(p: argparse.ArgumentParser, command: str) -> None:
    """The model a command starts from and the folder its outputs go to."""
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=RECIPE_DEFAULTS["model_name_or_path"] if command == "recipe"
                   else None, help=MODEL_HELP[command])
    g.add_argument("--output_dir", default="runs/recipe" if command == "recipe" else None,
                   help=OUTPUT_DIR_HELP.get(command, "where the model, metrics and checkpoints go"))


def _add_data_args(p: argparse.ArgumentParser, training: bool = True) -> None:
    """The dev set (every command that scores one) and, where a command trains, the training set."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default="squad", help="hub dataset used when no local files are given")
    if training:
        g.add_argument("--train_file", default=None, help="local SQuAD v1.1 train JSON (.json or .json.gz)")
    g.add_argument("--validation_file", default=None, help="local SQuAD v1.1 dev JSON (.json or .json.gz)")
    if training:
        g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training questions")
    g.add_argument("--max_eval_samples", type=int, default=None,
                   help="score only N evaluation questions, chosen by --eval_sample")
    g.add_argument("--eval_sample", choices=EVAL_SAMPLES, default=DEFAULT_EVAL_SAMPLE,
                   help="which N questions --max_eval_samples (and the recipe's preset and speed test) takes: "
                        + "; ".join(f"{k}: {v}" for k, v in EVAL_SAMPLE_HELP.items()))
    if training:
        g.add_argument("--preprocessing_num_workers", type=int, default=None, help="processes for tokenisation")
        g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes")


def _add_window_args(p: argparse.ArgumentParser) -> None:
    """How a question + context is cut into features (kdqa.features.Window: `args.window`)."""
    g = p.add_argument_group("windows")
    g.add_argument("--max_seq_length", type=int, default=384, help="tokens per feature (question + context window)")
    g.add_argument("--doc_stride", type=int, default=128, help="overlap in tokens between context windows")
    g.add_argument("--max_query_length", type=int, default=64, help="questions are cut to this many tokens")


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    """How start/end logits become an answer (kdqa.postprocess.Decoding: `args.decoding`)."""
    g = p.add_argument_group("decoding")
    g.add_argument("--n_best_size", type=int, default=20, help="start/end candidates per window when decoding")
    g.add_argument("--max_answer_length", type=int, default=30, help="longest answer in tokens when decoding")


def _add_runtime_args(p: argparse.ArgumentParser, with_precision: bool = True) -> None:
    """Where and how the models run. predict has no --precision: it runs fp32 (or --quantize int8)."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    if with_precision:
        g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                       help="auto: bf16 on GPUs that support it, else fp16 with a gradient scaler; fp32 on the CPU")
        g.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"],
                       help="attention kernel of the models (sdpa: torch scaled_dot_product_attention)")
    g.add_argument("--per_device_eval_batch_size", type=int, default=64, help="features per evaluation batch")
    g.add_argument("--disable_tqdm", action="store_true", help="no progress bars")
    g.add_argument("--use_cpu", "--no_cuda", action="store_true", default=argparse.SUPPRESS,
                   help="same as --device cpu (TrainingArguments' names)")


# What --loss_impl picks (kdqa.loss.resolve_loss_impl); said here so --help needs no torch.
LOSS_IMPL_HELP = ("fused Triton loss or its PyTorch reference (auto: Triton on CUDA tensors, and on the CPU when "
                  "TRITON_INTERPRET=1 was set before start-up, which runs the kernel in Triton's interpreter: "
                  "exact but slow, for tests; otherwise the reference)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--per_device_train_batch_size", type=int, default=16, help="features per step per GPU")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=2e-5, help="peak learning rate of AdamW")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases/LayerNorm)")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of steps of linear warm-up")
    g.add_argument("--num_train_epochs", type=float, default=3.0, help="epochs (a fraction stops mid-epoch)")
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; > 0 overrides --num_train_epochs")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    g.add_argument("--loss_impl", choices=LOSS_IMPLS, default="auto", help=LOSS_IMPL_HELP)
    g.add_argument("--seed", type=int, default=42, help="seed of weights init, dropout and data order")
    g.add_argument("--group_by_length", action="store_true", help="batch features of similar length together")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the student (and online teacher)")
    g.add_argument("--student_layers", default=None,
                   help="build the student from these encoder layers (e.g. 0,2,4) of --model_name_or_path, "
                        "or of the teacher when no --model_name_or_path is given, plus its embeddings")
    _add_run_args(p)
    _add_training_arguments_args(p)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """A training run's logging, evaluation and checkpoints."""
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow a non-empty output dir without resuming")
    g.add_argument("--logging_steps", type=steps_or_ratio, default=50,
                   help="log to metrics.jsonl every N optimizer steps (a value below 1: that fraction of all steps, "
                        "rounded up, as transformers)")
    g.add_argument("--eval_strategy", "--evaluation_strategy", choices=["epoch", "steps", "end", "no"], default="epoch",
                   help="when to score the dev set: every epoch, every --eval_steps, once after the last step (end), "
                        "or never; epoch and steps also score after the last step")
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (eval_strategy steps)")
    g.add_argument("--save_steps", type=int, default=500, help="checkpoint every N optimizer steps (0: only at epoch ends)")
    g.add_argument("--save_total_limit", type=int, default=2, help="keep only the last N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output_dir")


def _add_distill_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation", "used in distill mode (the distill command, the recipe's last stage); "
                                             "finetune has these keys too (one config file serves both modes) "
                                             "and ignores them")
    g.add_argument("--teacher_model_name_or_path", default=None, help="the fine-tuned teacher (folder or hub name)")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of the KD term")
    g.add_argument("--alpha_ce", type=float, default=0.5, help="weight of the cross-entropy on gold spans")
    g.add_argument("--alpha_kd", type=float, default=0.5, help="weight of T^2 * KL(teacher || student)")
    g.add_argument("--teacher_logits_cache", default=None,
                   help="folder caching the teacher's logits of every training feature, computed once")
    g.add_argument("--alpha_hidden", type=float, default=0.0,
                   help="weight of the hidden-state term: student layers learn the teacher's hidden states "
                        "(0: off, logits only); needs the online teacher, not --teacher_logits_cache")
    g.add_argument("--hidden_loss", choices=["mse", "cosine"], default="mse",
                   help="the hidden-state distance over real tokens: mse (TinyBERT) or cosine (DistilBERT's L_cos)")
    g.add_argument("--hidden_layer_map", default=None,
                   help="STUDENT:TEACHER layer pairs, 0 = embeddings, e.g. 1:2,2:4,3:6 (default: the layers "
                        "--student_layers copied, else a uniform map)")
    g.add_argument("--alpha_attention", type=float, default=0.0,
                   help="weight of the attention term: KL between the mapped layers' attention distributions, per "
                        "head (0: off); runs eager attention, needs the online teacher")
    g.add_argument("--attention_layer_map", default=None,
                   help="STUDENT:TEACHER layer pairs of the attention term, layers from 1, e.g. 1:2,2:4,3:6 "
                        "(default: as --hidden_layer_map's)")


# Where our defaults (the seed recipe's) differ from run_qa.py + TrainingArguments (transformers 5.x);
# --help shows both.
RUN_QA_DEFAULTS = {
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 5e-5,
    "weight_decay": 0.0,
    "logging_steps": 500,
    "save_total_limit": "none (keeps all)",
    "eval_strategy": "no (evaluates once at the end with --do_eval)",
    "precision": "fp32 unless --fp16/--bf16",
    "pad_to_max_length": True,
}


# Flags run_qa.py has too, with another meaning there (issue 24): kept as kdqa's, said in --help and README.
RUN_QA_MEANINGS = {
    "max_train_samples": "kdqa cuts questions (all windows of the first N); run_qa.py cuts features (windows)",
    "max_eval_samples": "kdqa cuts questions (all windows of N questions spread over the file, or of the first N "
                        "with --eval_sample first); run_qa.py cuts features (the first N windows), which can leave "
                        "questions without a window",
    "do_eval": "with --do_train kdqa scores every epoch (--eval_strategy epoch); run_qa.py once at the end, "
               "which --eval_strategy end does",
}

REPORT_TO = ("all", "none", "tensorboard")


def _add_training_arguments_args(p: argparse.ArgumentParser) -> None:
    """TrainingArguments flags run_qa.py users type (issue 24): logging, saving, schedule, memory."""
    g = p.add_argument_group("TrainingArguments compatibility")
    g.add_argument("--report_to", nargs="+", default=["all"], metavar="{all,none,tensorboard}",
                   help="tensorboard: TensorBoard event files in OUTPUT_DIR/runs/ (or $TENSORBOARD_LOGGING_DIR); "
                        "all: each integration that is installed (kdqa has one: tensorboard) (default: %(default)s; "
                        "transformers 5's: none, 4.x's: all)")
    g.add_argument("--logging_strategy", choices=["steps", "epoch", "no"], default="steps",
                   help="steps: a metrics.jsonl record every --logging_steps; epoch: at each epoch's end; no: only "
                        "one at the last step (the mean over the whole run); every strategy logs the last step")
    g.add_argument("--save_strategy", choices=["steps", "epoch", "best", "no"], default="steps",
                   help="steps: a checkpoint every --save_steps and at each epoch's end and the last step; epoch: "
                        "at epoch ends and the last step; best: where the dev score beats the best so far (and at "
                        "the last step, to resume from); no: no checkpoints (the run cannot be resumed)")
    g.add_argument("--warmup_steps", type=float, default=0,
                   help="optimizer steps of warm-up (a value below 1: that fraction of all steps, as transformers 5); "
                        "give it or --warmup_ratio, not both")
    g.add_argument("--lr_scheduler_type", choices=["linear", "cosine", "constant", "constant_with_warmup"],
                   default="linear", help="learning-rate schedule after the warm-up (as transformers' get_scheduler)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute the student's activations in the backward pass: less memory, slower steps")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="accepted for torch.distributed.launch and ignored: kdqa reads LOCAL_RANK from torchrun")
    g.add_argument("--logging_dir", default=None,
                   help="the TensorBoard folder; None: OUTPUT_DIR/runs, or $TENSORBOARD_LOGGING_DIR")
    g.add_argument("--optim", type=_optimizer, default=None, metavar="{adamw_torch,adamw_torch_fused}",
                   help="torch.optim.AdamW, or its fused kernel (faster, its updates differ in the last bits); "
                        "None: the fused kernel on CUDA, adamw_torch on the CPU")
    g.add_argument("--load_best_model_at_end", action="store_true",
                   help="the final model (OUTPUT_DIR) is the checkpoint with the best --metric_for_best_model; needs "
                        "--save_strategy epoch, steps (with --eval_strategy the same and --save_steps a multiple of "
                        "--eval_steps) or best")
    g.add_argument("--metric_for_best_model", choices=["f1", "exact_match", "eval_f1", "eval_exact_match"],
                   default=None, help="the dev score that picks the best checkpoint; None: f1 (with "
                                      "--load_best_model_at_end or --save_strategy best)")
    for name, (kind, why) in IGNORED_FLAGS.items():
        g.add_argument(f"--{name}", action=_IgnoredFlag, kind=kind, help=f"accepted, no effect: {why}")


OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


def _optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(f"{name!r}: kdqa trains with AdamW; choose adamw_torch or adamw_torch_fused")
    return name


# run_qa.py / TrainingArguments flags accepted where they have nothing to do in kdqa: (value kind, why).
# A value that would ask for something kdqa does not do is refused (`save_safetensors False`).
IGNORED_FLAGS = {
    "run_name": ("text", "the TensorBoard folder is --logging_dir"),
    "log_level": ("text", "kdqa logs its own lines at INFO on the main process"),
    "overwrite_cache": ("bool", "kdqa tokenises each run afresh (only the teacher's logits are cached, and "
                                "checked against their settings)"),
    "cache_dir": ("text", "models come from the hub cache of $HF_HOME (or $HF_HUB_CACHE)"),
    "dataloader_pin_memory": ("bool", "kdqa pins loader memory on CUDA"),
    "skip_memory_metrics": ("bool", "kdqa writes no memory metrics"),
    "save_safetensors": ("bool", "kdqa writes model.safetensors only (False is refused)"),
}


class _IgnoredFlag(argparse.Action):
    """A flag of IGNORED_FLAGS: its value is checked (true/false for a bool) and nothing is stored."""

    def __init__(self, option_strings, dest, kind: str, **kwargs):
        boolean = kind == "bool"
        super().__init__(option_strings, dest, nargs="?" if boolean else None, const=True if boolean else None,
                         type=str_to_bool if boolean else str, default=argparse.SUPPRESS,
                         metavar="BOOL" if boolean else "VALUE", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--save_safetensors" and values is False:
            raise argparse.ArgumentError(self, "kdqa writes model.safetensors only (no pytorch_model.bin); "
                                               "leave it out")


# run_qa.py's own (non-TrainingArguments) flags that kdqa does not have.
RUN_QA_ONLY_FLAGS = ("config_name", "tokenizer_name", "model_revision", "token", "trust_remote_code",
                     "dataset_config_name", "null_score_diff_threshold")
# TrainingArguments fields of transformers 4.x that 5.x dropped (run_qa.py command lines still carry them).
TRAINING_ARGUMENTS_4X = ("per_gpu_train_batch_size", "per_gpu_eval_batch_size", "evaluation_strategy",
                         "logging_dir", "save_safetensors", "no_cuda", "use_mps_device", "jit_mode_eval", "use_ipex",
                         "fp16_opt_level", "fp16_backend", "half_precision_backend", "tpu_num_cores",
                         "tpu_metrics_debug", "past_index", "fsdp_min_num_params", "fsdp_transformer_layer_cls_to_wrap",
                         "mp_parameters", "adafactor", "group_by_length", "length_column_name",
                         "use_legacy_prediction_loop", "push_to_hub_model_id", "push_to_hub_organization",
                         "push_to_hub_token", "include_inputs_for_metrics", "include_tokens_per_second", "ray_scope",
                         "torchdynamo", "dispatch_batches", "split_batches", "warmup_ratio", "overwrite_output_dir",
                         "hub_private_repo", "save_on_each_node")
# TrainingArguments fields, where transformers cannot be imported (it is a dependency, so rarely used).
_TRAINING_ARGUMENTS_FALLBACK = ("push_to_hub", "hub_model_id", "deepspeed", "fsdp", "optim", "tf32", "eval_on_start",
                                "load_best_model_at_end", "metric_for_best_model", "label_smoothing_factor",
                                "auto_find_batch_size", "logging_dir", "run_name", "hub_token", "ddp_backend")


def _training_arguments_fields() -> set[str]:
    """The field names of transformers' TrainingArguments (imported only on this error path: it is slow)."""
    import dataclasses

    try:
        from transformers import TrainingArguments
    except ImportError:
        return set(_TRAINING_ARGUMENTS_FALLBACK)
    return {f.name for f in dataclasses.fields(TrainingArguments)}


def unsupported_hf_flags(names) -> list[str]:
    """Of `names` (flag names without --), those that are run_qa.py / TrainingArguments flags."""
    names = [n.replace("-", "_") for n in names]
    if not names:
        return []
    known = _training_arguments_fields() | set(RUN_QA_ONLY_FLAGS) | set(TRAINING_ARGUMENTS_4X)
    return [n for n in names if n in known]


def unsupported_message(names: list[str]) -> str:
    flags = ", ".join(f"--{n}" for n in names)
    one = len(names) == 1
    return (f"{flags}: {'a ' if one else ''}run_qa.py / TrainingArguments flag{'' if one else 's'} that kdqa does "
            f"not support; leave {'it' if one else 'them'} out")


class _RefuseFlag(argparse.Action):
    """A run_qa.py flag that kdqa deliberately does not support: refused by name, never ignored
    (`--flag False`, HfArgumentParser's way of leaving it off, is accepted)."""

    def __init__(self, option_strings, dest, reason: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", const=True, type=str_to_bool, default=argparse.SUPPRESS,
                         metavar="BOOL", **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        if values:
            raise argparse.ArgumentError(self, self.reason)


def _add_run_qa_args(p: argparse.ArgumentParser, fixed_phases: dict | None = None) -> None:
    """run_qa.py's flags: --fp16/--bf16, --pad_to_max_length, and --do_train/--do_eval/--do_predict with
    --test_file unless the command's phases are fixed (`fixed_phases`: evaluate, recipe).

    The aliases are folded into --precision and the phases resolved by `_resolve_run_qa_flags`;
    TrainingArguments' flags are the training group's (`_add_training_arguments_args`).
    """
    g = p.add_argument_group("run_qa.py compatibility")
    g.add_argument("--fp16", action="store_true", help="same as --precision fp16")
    g.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    g.add_argument("--pad_to_max_length", action="store_true",
                   help="pad every batch to --max_seq_length, not to its longest feature (slower, as run_qa.py)")
    g.add_argument("--version_2_with_negative", action=_RefuseFlag,
                   reason="kdqa is SQuAD v1.1 only: SQuAD v2 (questions without an answer) is not supported",
                   help="refused: kdqa is SQuAD v1.1 only")
    if fixed_phases is None:
        g.add_argument("--do_train", action="store_true",
                       help="train; with any --do_* flag only the phases given run (none given: train + evaluate)")
        g.add_argument("--do_eval", action="store_true",
                       help="evaluate (without --do_train: evaluate --model_name_or_path as it is)")
        g.add_argument("--do_predict", action="store_true",
                       help="after the other phases, answer --test_file with the final model "
                            "(predict_predictions.json in --output_dir)")
        g.add_argument("--test_file", default=None, help="SQuAD JSON answered by --do_predict")
        g.add_argument("--max_predict_samples", type=int, default=None,
                       help="--do_predict answers only the first N questions of --test_file")
    else:
        p.set_defaults(**fixed_phases, do_predict=False, test_file=None)


def _note_run_qa_differences(p: argparse.ArgumentParser) -> None:
    """--help of each flag says where our default or meaning differs from run_qa.py's."""
    for action in p._actions:
        if action.dest in RUN_QA_DEFAULTS:
            action.help = f"{action.help} (default: %(default)s; run_qa.py's: {RUN_QA_DEFAULTS[action.dest]})"
        if action.dest in RUN_QA_MEANINGS:
            action.help = f"{action.help}; NOTE: {RUN_QA_MEANINGS[action.dest]}"


DESCRIPTION = (
    "Task-specific knowledge distillation for extractive QA (SQuAD v1.1).\n\n"
    "  python train.py finetune --model_name_or_path M --output_dir D\n"
    "  python train.py distill --teacher_model_name_or_path T --model_name_or_path S --output_dir D\n"
    "  python train.py evaluate --model_name_or_path M --validation_file F --output_dir D\n"
    "  python train.py predict --model_name_or_path M --question Q --context C\n"
    "  python train.py export --model_name_or_path M --output_dir E [--quantize int8]\n"
    "  python train.py [recipe flags]   # the seed recipe: teacher, student, distilled student\n\n"
    "run_qa.py users: --do_train/--do_eval/--do_predict, --fp16/--bf16, --pad_to_max_length and\n"
    "`python train.py finetune args.json` work; each command's --help marks the defaults that differ\n"
    "from run_qa.py's (batch size, learning rate, weight decay: the seed recipe's).\n"
    "Without a sub-command, a run_qa.py command line (any --do_* flag, or an args.json with do_* keys)\n"
    "runs finetune; anything else runs the recipe.\n"
)

# Each command: (its one-line help, its description or None, its flag groups in --help order).
_TRAINING_GROUPS = ("model", "data", "windows", "decoding", "runtime", "training", "distillation", "run_qa")
COMMANDS = {
    "finetune": ("plain fine-tuning (CE loss, no teacher)", None, _TRAINING_GROUPS),
    "distill": ("distil a student from a fine-tuned teacher", None, _TRAINING_GROUPS),
    "evaluate": ("EM/F1 of a model on a dev set", None,
                 ("model", "dev data", "windows", "decoding", "runtime", "run_qa")),
    "predict": ("answer questions with a model folder",
                "Answer one question (--question/--context: prints the answer and its score) or every question "
                "of --test_file (writes predict_predictions.json and predict_nbest_predictions.json into "
                "--output_dir). Gold answers are optional.",
                ("model", "windows", "decoding", "runtime without precision", "predict")),
    "export": ("export a model folder to ONNX (+ int8)",
               "Write model.onnx (dynamic batch and sequence axes) and the tokenizer into --output_dir, after "
               "checking that ONNX Runtime gives PyTorch's logits; --quantize int8 adds model_int8.onnx (ONNX "
               "Runtime static int8, calibrated on --train_file's first questions cut into these windows; the "
               "schemes worth trying are scored against the fp32 model on held-out questions, the best kept "
               "within --max_int8_drop).",
               ("model", "windows", "export")),
    "recipe": ("the seed recipe end to end (also what `python train.py` with no sub-command runs)",
               "Fine-tune the teacher, fine-tune the student (baseline), distil the student from the teacher, "
               "and print the table teacher / student / distilled student in EM/F1.",
               _TRAINING_GROUPS + ("recipe",)),
}
# The phases of the commands that have no --do_* flags.
FIXED_PHASES = {"evaluate": dict(do_train=False, do_eval=True), "recipe": dict(do_train=True, do_eval=True)}


def _add_group(p: argparse.ArgumentParser, command: str, group: str) -> None:
    """Add one flag group (a name of COMMANDS' lists) to command's parser."""
    adders = {
        "model": lambda: _add_model_args(p, command),
        "data": lambda: _add_data_args(p),
        "dev data": lambda: _add_data_args(p, training=False),
        "windows": lambda: _add_window_args(p),
        "decoding": lambda: _add_decoding_args(p),
        "runtime": lambda: _add_runtime_args(p),
        "runtime without precision": lambda: _add_runtime_args(p, with_precision=False),
        "training": lambda: _add_train_args(p),
        "distillation": lambda: _add_distill_args(p),
        "run_qa": lambda: _add_run_qa_args(p, FIXED_PHASES.get(command)),
        "predict": lambda: _add_predict_args(p),
        "export": lambda: _add_export_args(p),
        "recipe": lambda: _add_recipe_args(p),
    }
    adders[group]()


def build_parser() -> argparse.ArgumentParser:
    """train.py's parser: each sub-command with the flag groups COMMANDS gives it."""
    parser = _Parser(prog="train.py", formatter_class=_HelpFormatter, description=DESCRIPTION)
    _add_config_arg(parser)
    sub = parser.add_subparsers(dest="command", metavar="{finetune,distill,evaluate,predict,export,recipe}")
    for command, (summary, description, groups) in COMMANDS.items():
        p = sub.add_parser(command, formatter_class=_HelpFormatter, help=summary, description=description)
        _add_config_arg(p)
        for group in groups:
            _add_group(p, command, group)
        if "run_qa" in groups:
            _note_run_qa_differences(p)
    return parser


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The recipe's own flags, and its defaults where they differ from a single run's."""
    p.set_defaults(teacher_model_name_or_path=RECIPE_DEFAULTS["teacher_model_name_or_path"],
                   num_train_epochs=RECIPE_DEFAULTS["num_train_epochs"])
    g = p.add_argument_group("recipe")
    g.add_argument("--teacher_num_train_epochs", type=float, default=RECIPE_DEFAULTS["teacher_num_train_epochs"],
                   help="epochs of the teacher's fine-tuning (students use --num_train_epochs)")
    g.add_argument("--teacher_learning_rate", type=float, default=None,
                   help="learning rate of the teacher's fine-tuning (default: --learning_rate)")
    g.add_argument("--data_dir", default=None,
                   help="folder holding SQuAD v1.1 under its official names (train-v1.1*.json[.gz], "
                        "dev-v1.1.json[.gz]); without it: $KDQA_DATA_DIR, data/squad/ in the repository, "
                        "../shared/data/squad/ beside it, or the hub")
    g.add_argument("--full", action="store_true",
                   help="all of the data on the CPU too (without it, a CPU-only machine runs a ~15-minute preset)")
    g.add_argument("--speed_test_questions", type=int, default=None,
                   help="dev questions of the speed test, chosen by --eval_sample (default: 1000, or the CPU preset's 100)")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{command name: its parser}."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no sub-commands")


def load_config_file(path: str) -> dict:
    """Read a YAML or JSON config file into a dict of flag values."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: {'is a folder, not a file' if os.path.isdir(path) else 'file not found'}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows editors) is dropped, as in data files
            text = f.read()
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "save it as UTF-8") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    return values


CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def _with_command(argv: list[str], commands: list[str]) -> list[str]:
    """argv with the sub-command first (`recipe` when none is given) and a --config given before it
    moved after it; `COMMAND args.json` (HfArgumentParser's form; .yaml too) becomes `COMMAND --config args.json`."""
    head = []
    while argv and (argv[0] == "--config" or argv[0].startswith("--config=")):
        take = 2 if argv[0] == "--config" else 1
        head, argv = head + argv[:take], argv[take:]
    if argv and argv[0] in ("-h", "--help"):
        return head + argv  # train.py's own help
    if argv and argv[0] in commands:
        command, rest = argv[0], argv[1:]
    elif argv and not argv[0].startswith("-") and not argv[0].endswith(CONFIG_SUFFIXES):
        raise ConfigError(f"unknown sub-command {argv[0]!r}; choose one of {', '.join(commands)}")
    else:
        command, rest = ("finetune" if _looks_like_run_qa(argv) else "recipe"), argv
    if len(rest) == 1 and rest[0].endswith(CONFIG_SUFFIXES) and not rest[0].startswith("-"):
        rest = ["--config", rest[0]]
    if sum(a == "--config" or a.startswith("--config=") for a in head + rest) > 1:
        raise ConfigError("--config is given more than once; give one file")
    return [command] + head + rest


def _looks_like_run_qa(argv: list[str]) -> bool:
    """A command line without a sub-command that is run_qa.py's (issue 24): it has a --do_* flag, or
    it is one JSON file (HfArgumentParser's args.json) holding a do_* key. Then it means `finetune`."""
    do_flags = ("--do_train", "--do_eval", "--do_predict")
    if any(a in do_flags or a.startswith(tuple(f + "=" for f in do_flags)) for a in argv):
        return True
    if len(argv) == 1 and argv[0].endswith(".json") and os.path.isfile(argv[0]):
        try:
            with open(argv[0], encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, ValueError):
            return False  # the recipe's --config reading names the problem
        return isinstance(values, dict) and any(k in values for k in ("do_train", "do_eval", "do_predict"))
    return False


def config_tokens(values: dict, parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A config mapping as command-line tokens for `parser`, each value checked by the flag's own type
    and choices, so a file is parsed exactly as the command line is.

    Booleans (store_true flags) take true/false only: true adds the flag, false leaves it out.
    null keeps the flag's default. --student_layers also takes a list of layer numbers.
    """
    tokens, unknown = [], []
    for key, value in values.items():
        action = parser._option_string_actions.get(f"--{key}")
        if action is None or key in ("config", "help"):
            unknown.append(str(key))
            continue
        where = f"--config {path}: {key}"
        boolean = action.nargs == 0 or isinstance(action, (_BoolFlag, _RefuseFlag)) or action.type is str_to_bool
        if boolean:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            if isinstance(action, _IgnoredFlag):
                tokens.append(f"--{key}={value}")  # checked as on the command line (save_safetensors false)
            else:
                tokens += [f"--{key}"] if value else []
            continue
        if value is None:
            continue
        if key == "student_layers" and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if action.nargs == "+":  # --report_to: one value or a list, as TrainingArguments' JSON holds it
            tokens += [f"--{key}", *(str(v) for v in (value if isinstance(value, list) else [value]))]
            continue
        if isinstance(value, (bool, list, dict)):
            raise ConfigError(f"{where}: expected one {getattr(action.type, '__name__', 'str')} value, got {value!r}")
        text = str(value)
        try:
            parser._check_value(action, parser._get_value(action, text))
        except argparse.ArgumentError as err:
            raise ConfigError(f"--config {path}: {err}") from None
        tokens.append(f"--{key}={text}")  # one token: a value starting with '-' is not taken for a flag
    unsupported = unsupported_hf_flags(unknown)
    if unsupported:
        raise ConfigError(f"--config {path}: {unsupported_message(unsupported)}")
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {sorted(unknown)} for '{parser.prog.split()[-1]}'")
    return tokens


class Flags(argparse.Namespace):
    """The parsed command line: the flags as plain values, plus `window` and `decoding`, the two
    settings the data path and span decoding take as one value each (kdqa.features.Window,
    kdqa.postprocess.Decoding).

    They are read-only properties built from the flat flags, not attributes: so vars(args) holds the
    flags only, JSON as always (resume settings, training_args.json, run records and report cards dump
    it, and stay bit for bit what they were), and neither can disagree with its flags when a caller
    sets one (the recipe's CPU preset sets --max_seq_length after parsing). A copy made with
    copy.copy / copy.deepcopy keeps them; argparse.Namespace(**vars(args)) does not.
    """

    @property
    def window(self):
        from kdqa.features import Window  # features imports torch and datasets: not at --help

        return Window.from_args(self)

    @property
    def decoding(self) -> Decoding:
        return Decoding.from_args(self)


def parse_args(argv: list[str] | None = None) -> Flags:
    """Parse train.py's command line; no sub-command means `recipe`.

    A --config file (before or after the sub-command) is turned into flags placed before the command
    line's own, so both go through the same parser and checks and the command line wins.
    """
    parser = build_parser()
    argv = _with_command(list(sys.argv[1:] if argv is None else argv), list(_subparsers(parser)))
    try:
        args = parser.parse_args(argv, namespace=Flags())
        if args.config:
            values = load_config_file(args.config)
            argv = argv[:1] + config_tokens(values, _subparsers(parser)[argv[0]], args.config) + argv[1:]
            args = parser.parse_args(argv, namespace=Flags())
    except ConfigError as err:
        raise ConfigError(f"{err}; see `train.py {argv[0]} --help`") from None
    _resolve_run_qa_flags(args)
    _resolve_training_arguments_flags(args)
    if args.command == "recipe":
        args.given_flags = sorted(given_flags(argv))  # the recipe replaces only flags left at their defaults
    # The one place the mode is decided: the trainer uses a teacher exactly when mode is "distill".
    # The recipe has no single mode and sets one per stage.
    args.mode = args.command if args.command in ("finetune", "distill") else None
    validate_args(args)
    return args


def given_flags(argv: list[str]) -> set[str]:
    """The flags that argv (the command line and --config's tokens) sets, by dest: a value equal to its
    default still counts as given, which the values alone cannot tell."""
    parser = build_parser()
    for p in (parser, *_subparsers(parser).values()):
        p._defaults.clear()  # set_defaults values (the recipe's models, fixed phases) are defaults too
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def _resolve_run_qa_flags(args: argparse.Namespace) -> None:
    """Fold --fp16/--bf16 into --precision and --use_cpu/--no_cuda into --device; turn --do_* into the phases."""
    if args.__dict__.pop("use_cpu", False):
        if args.device not in ("auto", "cpu"):
            raise ConfigError(f"--use_cpu (--no_cuda) contradicts --device {args.device}; give one of them")
        args.device = "cpu"
    aliases = [name for name in ("fp16", "bf16") if getattr(args, name, False)]
    for name in ("fp16", "bf16"):
        args.__dict__.pop(name, None)
    if len(aliases) > 1:
        raise ConfigError("--fp16 and --bf16 contradict each other; give one (or --precision)")
    if aliases:
        if args.precision not in ("auto", aliases[0]):
            raise ConfigError(f"--{aliases[0]} contradicts --precision {args.precision}; give one of them")
        args.precision = aliases[0]
    if args.command not in ("finetune", "distill"):
        return
    if not (args.do_train or args.do_eval or args.do_predict):
        args.do_train = args.do_eval = True  # no --do_* flag: train, then evaluate, as always
    elif args.do_train and not args.do_eval:
        if args.eval_strategy in ("steps", "end"):
            raise ConfigError(f"--eval_strategy {args.eval_strategy} evaluates: add --do_eval, or leave it out")
        args.eval_strategy = "no"


def _resolve_training_arguments_flags(args: argparse.Namespace) -> None:
    """--report_to to the integrations that will run (all: those installed); --warmup_steps checked."""
    if not hasattr(args, "report_to"):
        return  # predict / export
    wanted = set(args.report_to)
    others = sorted(wanted - set(REPORT_TO))
    if others:
        raise ConfigError(f"--report_to {' '.join(others)} is not supported: kdqa writes metrics.jsonl and, with "
                          "--report_to tensorboard, TensorBoard event files; choose all, none or tensorboard")
    if "none" in wanted and len(wanted) > 1:
        raise ConfigError("--report_to none contradicts the other values given; give none alone")
    import importlib.util

    installed = importlib.util.find_spec("tensorboard") is not None
    if "tensorboard" in wanted and not installed:
        raise ConfigError("--report_to tensorboard needs the tensorboard package: pip install 'kdqa[tensorboard]' "
                          "(or --report_to none)")
    args.report_to = ["tensorboard"] if ("tensorboard" in wanted or "all" in wanted) and installed else []
    steps = args.warmup_steps
    if not (math.isfinite(steps) and steps >= 0) or (steps >= 1 and steps != int(steps)):
        raise ConfigError(f"--warmup_steps must be a whole number of steps, or a fraction below 1 of all steps, "
                          f"got {steps:g}")
    if steps > 0 and args.warmup_ratio > 0:
        raise ConfigError("--warmup_steps and --warmup_ratio both set the warm-up; give one of them")
    if args.lr_scheduler_type == "constant" and (steps > 0 or args.warmup_ratio > 0):
        raise ConfigError("--lr_scheduler_type constant has no warm-up; use constant_with_warmup, or drop the "
                          "warm-up flag")
    _resolve_best_model_flags(args)


def _resolve_best_model_flags(args: argparse.Namespace) -> None:
    """--load_best_model_at_end / --save_strategy best: the metric named without eval_ (f1 by default),
    and checkpoints that each have a dev score to compare (TrainingArguments' rules, in kdqa's strategies)."""
    if args.metric_for_best_model is not None:
        args.metric_for_best_model = args.metric_for_best_model.removeprefix("eval_")
    if not (args.load_best_model_at_end or args.save_strategy == "best"):
        return
    args.metric_for_best_model = args.metric_for_best_model or "f1"
    wanted = "--load_best_model_at_end" if args.load_best_model_at_end else "--save_strategy best"
    if args.eval_strategy not in ("epoch", "steps"):
        raise ConfigError(f"{wanted} compares dev scores during training: give --do_eval with --eval_strategy epoch "
                          f"or steps (now {args.eval_strategy})")
    if args.save_strategy == "no":
        raise ConfigError("--load_best_model_at_end needs checkpoints to choose from: --save_strategy epoch, steps "
                          "or best, not no")
    if args.save_strategy == "epoch" and args.eval_strategy != "epoch":
        raise ConfigError("--load_best_model_at_end with --save_strategy epoch needs --eval_strategy epoch (each "
                          "checkpoint scored)")
    if args.save_strategy == "steps" and (args.eval_strategy != "steps" or not args.save_steps
                                          or args.save_steps % args.eval_steps):
        raise ConfigError("--load_best_model_at_end with --save_strategy steps needs --eval_strategy steps and "
                          "--save_steps a multiple of --eval_steps (each checkpoint scored); or --save_strategy epoch or best")


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
        _check_hidden_flags(args)
    if distills and (problem := objective.cache_conflict(args)):
        raise ConfigError(problem)


def _check_hidden_flags(args: argparse.Namespace) -> None:
    """A --hidden_layer_map is checked as far as it can be before the models are loaded (their layer
    counts come later), even at --alpha_hidden 0; hidden flags that then do nothing get one warning."""
    from kdqa.hidden_distill import parse_layer_map

    if args.hidden_layer_map is not None:
        try:
            parse_layer_map(args.hidden_layer_map, 10**6, 10**6)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if args.alpha_hidden == 0 and args.command != "recipe":  # the recipe's default is its hidden row's 10
        given = [f"--{k}" for k, default in (("hidden_layer_map", None), ("hidden_loss", "mse"))
                 if getattr(args, k) != default]  # set to something other than the parser's default
        if given:
            logging.getLogger("kdqa").warning(
                "%s %s no effect: the hidden-state term is off at --alpha_hidden 0 (give --alpha_hidden W > 0 "
                "to use it)", " and ".join(given), "have" if len(given) > 1 else "has")


# ----------------------------------------------------------------------------- predict and export (issue 16)

INFERENCE_COMMANDS = ("predict", "export")


def _add_predict_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("predict")
    g.add_argument("--question", default=None, help="one question (with --context)")
    g.add_argument("--context", default=None, help="the text that holds the answer to --question")
    g.add_argument("--test_file", default=None,
                   help="SQuAD v1.1 JSON (.json/.json.gz, official or flat layout) or JSON lines of "
                        "{id, question, context}")
    g.add_argument("--max_predict_samples", type=int, default=None, help="answer only the first N questions")
    g.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="auto: ONNX Runtime when the folder has model.onnx (or a .onnx file is given), else PyTorch")
    g.add_argument("--quantize", choices=PREDICT_QUANTIZE, default="none",
                   help="int8: PyTorch dynamic int8 Linear layers, or the folder's model_int8.onnx in ONNX Runtime")

def _add_export_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("export")
    g.add_argument("--quantize", choices=EXPORT_QUANTIZE, default="none",
                   help="int8: also write model_int8.onnx, static int8 calibrated on --train_file (answers do not "
                        "depend on the batch); int8-dynamic: dynamic int8, no calibration, batch-dependent answers")
    g.add_argument("--train_file", default=None, help="SQuAD v1.1 JSON whose first questions calibrate --quantize int8")
    g.add_argument("--calibration_questions", type=int, default=DEFAULT_CALIBRATION_QUESTIONS,
                   help="training questions --quantize int8 calibrates on (cut into --max_seq_length windows)")
    g.add_argument("--validation_file", default=None,
                   help="SQuAD v1.1 JSON whose first 200 questions check the int8 model against the fp32 one "
                        "(default: --train_file's questions after the calibration ones)")
    g.add_argument("--max_int8_drop", type=float, default=DEFAULT_MAX_INT8_DROP, help=MAX_INT8_DROP_HELP)
    g.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest allowed |ONNX Runtime - PyTorch| difference of a start/end logit")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    g.add_argument("--disable_tqdm", action="store_true", help="no progress bars (loading, calibration)")


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
