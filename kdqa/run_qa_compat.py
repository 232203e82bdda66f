"""run_qa.py / TrainingArguments compatibility (issue 24): what lets a Hugging Face user's command line
run unchanged, and names what kdqa does not do.

- HfArgumentParser's booleans (`--fp16 True`), TrainingArguments' ratio forms of *_steps;
- run_qa.py's flag group (--fp16/--bf16, --pad_to_max_length, --do_*) and TrainingArguments' (logging,
  saving, schedule, memory), with the flags accepted where they have nothing to do here;
- --help notes where our defaults or meanings differ from run_qa.py's;
- a command line without a sub-command that is run_qa.py's means finetune;
- after parsing, the aliases folded into kdqa's own flags (--precision, --device, the phases) and
  TrainingArguments' combinations checked;
- a run_qa.py / TrainingArguments flag kdqa lacks is named as such, not as "unrecognized".
"""

from __future__ import annotations

import argparse
import json
import math
import os

from kdqa.config_error import ConfigError


def str_to_bool(text) -> bool:
    """HfArgumentParser's booleans: yes/true/t/y/1 and no/false/f/n/0, any case."""
    value = str(text).lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class BoolFlag(argparse.Action):
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


def add_training_arguments_args(p: argparse.ArgumentParser) -> None:
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
        g.add_argument(f"--{name}", action=IgnoredFlag, kind=kind, help=f"accepted, no effect: {why}")


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


class IgnoredFlag(argparse.Action):
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


class RefuseFlag(argparse.Action):
    """A run_qa.py flag that kdqa deliberately does not support: refused by name, never ignored
    (`--flag False`, HfArgumentParser's way of leaving it off, is accepted)."""

    def __init__(self, option_strings, dest, reason: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", const=True, type=str_to_bool, default=argparse.SUPPRESS,
                         metavar="BOOL", **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        if values:
            raise argparse.ArgumentError(self, self.reason)


def add_run_qa_args(p: argparse.ArgumentParser, fixed_phases: dict | None = None) -> None:
    """run_qa.py's flags: --fp16/--bf16, --pad_to_max_length, and --do_train/--do_eval/--do_predict with
    --test_file unless the command's phases are fixed (`fixed_phases`: evaluate, recipe).

    The aliases are folded into --precision and the phases resolved by `resolve_run_qa_flags`;
    TrainingArguments' flags are the training group's (`add_training_arguments_args`).
    """
    g = p.add_argument_group("run_qa.py compatibility")
    g.add_argument("--fp16", action="store_true", help="same as --precision fp16")
    g.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    g.add_argument("--pad_to_max_length", action="store_true",
                   help="pad every batch to --max_seq_length, not to its longest feature (slower, as run_qa.py)")
    g.add_argument("--version_2_with_negative", action=RefuseFlag,
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


def note_run_qa_differences(actions: list[argparse.Action]) -> None:
    """--help of each flag (a parser's actions) says where our default or meaning differs from run_qa.py's."""
    for action in actions:
        if action.dest in RUN_QA_DEFAULTS:
            action.help = f"{action.help} (default: %(default)s; run_qa.py's: {RUN_QA_DEFAULTS[action.dest]})"
        if action.dest in RUN_QA_MEANINGS:
            action.help = f"{action.help}; NOTE: {RUN_QA_MEANINGS[action.dest]}"


def looks_like_run_qa(argv: list[str]) -> bool:
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


def resolve_run_qa_flags(args: argparse.Namespace) -> None:
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


def resolve_training_arguments_flags(args: argparse.Namespace) -> None:
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
