"""The command line of train.py: sub-commands, every flag with its default, and --config files.

Flag names follow Hugging Face's run_qa.py so SQuAD users feel at home. A --config file (YAML or
JSON) holds the same keys as the flags; flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

RECIPE_DEFAULTS = {
    "teacher_model_name_or_path": "bert-base-uncased",
    "model_name_or_path": "distilbert-base-uncased",
    "teacher_num_train_epochs": 2.0,
    "num_train_epochs": 3.0,
}


class ConfigError(ValueError):
    """A flag or config-file value is wrong; the message names it and says what is expected."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default="squad", help="hub dataset used when no local files are given")
    g.add_argument("--train_file", default=None, help="local SQuAD v1.1 train JSON (.json or .json.gz)")
    g.add_argument("--validation_file", default=None, help="local SQuAD v1.1 dev JSON (.json or .json.gz)")
    g.add_argument("--max_seq_length", type=int, default=384, help="tokens per feature (question + context window)")
    g.add_argument("--doc_stride", type=int, default=128, help="overlap in tokens between context windows")
    g.add_argument("--max_query_length", type=int, default=64, help="questions are cut to this many tokens")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training questions")
    g.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N evaluation questions")
    g.add_argument("--preprocessing_num_workers", type=int, default=None, help="processes for tokenisation")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--n_best_size", type=int, default=20, help="start/end candidates per window when decoding")
    g.add_argument("--max_answer_length", type=int, default=30, help="longest answer in tokens when decoding")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--per_device_train_batch_size", type=int, default=16, help="features per step per GPU")
    g.add_argument("--per_device_eval_batch_size", type=int, default=64, help="features per evaluation batch")
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
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on GPUs that support it, else fp16 with a gradient scaler; fp32 on the CPU")
    g.add_argument("--loss_impl", choices=["auto", "triton", "torch"], default="auto",
                   help="fused Triton loss or its PyTorch reference (auto: Triton on CUDA)")
    g.add_argument("--seed", type=int, default=42, help="seed of weights init, dropout and data order")
    g.add_argument("--group_by_length", action="store_true", help="batch features of similar length together")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the student (and online teacher)")
    g.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"],
                   help="attention kernel of the models (sdpa: torch scaled_dot_product_attention)")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--student_layers", default=None,
                   help="build the student from these encoder layers (e.g. 0,2,4) of --model_name_or_path, "
                        "or of the teacher when no --model_name_or_path is given, plus its embeddings")
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--output_dir", default=None, help="where the model, metrics and checkpoints go")
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow a non-empty output dir without resuming")
    g.add_argument("--logging_steps", type=int, default=50, help="log to metrics.jsonl every N optimizer steps")
    g.add_argument("--eval_strategy", choices=["epoch", "steps", "no"], default="epoch", help="when to evaluate")
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (eval_strategy steps)")
    g.add_argument("--save_steps", type=int, default=500, help="checkpoint every N optimizer steps (0: only at epoch ends)")
    g.add_argument("--save_total_limit", type=int, default=2, help="keep only the last N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output_dir")
    g.add_argument("--disable_tqdm", action="store_true", help="no progress bars")


def _add_distill_args(p: argparse.ArgumentParser, teacher_required: bool) -> None:
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher_model_name_or_path", required=teacher_required, default=None,
                   help="the fine-tuned teacher (folder or hub name)")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of the KD term")
    g.add_argument("--alpha_ce", type=float, default=0.5, help="weight of the cross-entropy on gold spans")
    g.add_argument("--alpha_kd", type=float, default=0.5, help="weight of T^2 * KL(teacher || student)")
    g.add_argument("--teacher_logits_cache", default=None,
                   help="folder caching the teacher's logits of every training feature, computed once")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        formatter_class=_HelpFormatter,
        description=(
            "Task-specific knowledge distillation for extractive QA (SQuAD v1.1).\n\n"
            "  python train.py finetune --model_name_or_path M --output_dir D\n"
            "  python train.py distill --teacher_model_name_or_path T --model_name_or_path S --output_dir D\n"
            "  python train.py evaluate --model_name_or_path M --validation_file F --output_dir D\n"
            "  python train.py [recipe flags]   # the seed recipe: teacher, student, distilled student\n"
        ),
    )
    parser.add_argument("--config", default=None, help="YAML or JSON file with flag values (flags override it)")
    sub = parser.add_subparsers(dest="command", metavar="{finetune,distill,evaluate,recipe}")

    p = sub.add_parser("finetune", formatter_class=_HelpFormatter, help="plain fine-tuning (CE loss, no teacher)")
    p.add_argument("--model_name_or_path", default=None, help="the model to fine-tune (folder or hub name)")
    p.add_argument("--config", default=None, help="YAML or JSON file with flag values (flags override it)")
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--teacher_model_name_or_path", default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("distill", formatter_class=_HelpFormatter, help="distil a student from a fine-tuned teacher")
    p.add_argument("--model_name_or_path", default=None,
                   help="the student's starting weights (folder or hub name); see --student_layers")
    p.add_argument("--config", default=None, help="YAML or JSON file with flag values (flags override it)")
    _add_data_args(p)
    _add_train_args(p)
    _add_distill_args(p, teacher_required=False)

    p = sub.add_parser("evaluate", formatter_class=_HelpFormatter, help="EM/F1 of a model on a dev set")
    p.add_argument("--model_name_or_path", default=None, help="the model to evaluate (folder or hub name)")
    p.add_argument("--config", default=None, help="YAML or JSON file with flag values (flags override it)")
    _add_data_args(p)
    _add_train_args(p)

    p = sub.add_parser(
        "recipe", formatter_class=_HelpFormatter,
        help="the seed recipe end to end (also what `python train.py` with no sub-command runs)",
        description="Fine-tune the teacher, fine-tune the student (baseline), distil the student from the "
                    "teacher, and print the table teacher / student / distilled student in EM/F1.",
    )
    p.add_argument("--model_name_or_path", default=RECIPE_DEFAULTS["model_name_or_path"],
                   help="the student's base model (ignored where --student_layers builds it from the teacher)")
    p.add_argument("--config", default=None, help="YAML or JSON file with flag values (flags override it)")
    _add_data_args(p)
    _add_train_args(p)
    _add_distill_args(p, teacher_required=False)
    p.set_defaults(teacher_model_name_or_path=RECIPE_DEFAULTS["teacher_model_name_or_path"],
                   num_train_epochs=RECIPE_DEFAULTS["num_train_epochs"], output_dir="runs/recipe")
    p.add_argument("--teacher_num_train_epochs", type=float, default=RECIPE_DEFAULTS["teacher_num_train_epochs"],
                   help="epochs of the teacher's fine-tuning (students use --num_train_epochs)")
    p.add_argument("--teacher_learning_rate", type=float, default=None,
                   help="learning rate of the teacher's fine-tuning (default: --learning_rate)")
    p.add_argument("--data_dir", default=None,
                   help="folder holding SQuAD v1.1 under its official names (train-v1.1*.json[.gz], "
                        "dev-v1.1.json[.gz]); without it: $KDQA_DATA_DIR, data/squad/ in the repository, "
                        "../shared/data/squad/ beside it, or the hub")
    p.add_argument("--full", action="store_true",
                   help="all of the data on the CPU too (without it, a CPU-only machine runs a ~15-minute preset)")
    p.add_argument("--speed_test_questions", type=int, default=None,
                   help="dev questions of the speed test (default: 1000, or the CPU preset's 200)")
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise AssertionError("no sub-commands")


def load_config_file(path: str) -> dict:
    """Read a YAML or JSON config file into a dict of flag values."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse train.py's command line; no sub-command means `recipe`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = ("finetune", "distill", "evaluate", "recipe")
    if not any(a in commands for a in argv) and not any(a in ("-h", "--help") for a in argv):
        argv = ["recipe"] + argv
    elif argv and argv[0] not in commands and not argv[0].startswith("-"):
        parser.error(f"unknown sub-command {argv[0]!r}; choose one of {', '.join(commands)}")
    # Split off a --config before the sub-command too.
    first = parser.parse_args(argv)
    command = first.command or "recipe"
    sub = _subparser(parser, command)
    if first.config:
        values = load_config_file(first.config)
        known = {a.dest for a in sub._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"--config {first.config}: unknown key(s) {unknown} for '{command}'; "
                              f"see `python train.py {command} --help`")
        values.pop("config", None)
        sub.set_defaults(**values)
        args = parser.parse_args(argv)
    else:
        args = first
    args.command = command
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Catch wrong flag combinations before anything is loaded."""
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)

    need(args.max_seq_length > 0 and args.doc_stride > 0, "--max_seq_length and --doc_stride must be positive")
    need(args.doc_stride < args.max_seq_length, "--doc_stride must be smaller than --max_seq_length")
    need(args.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be at least 1")
    need(args.per_device_eval_batch_size >= 1, "--per_device_eval_batch_size must be at least 1")
    need(args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1")
    need(args.learning_rate > 0, "--learning_rate must be positive")
    need(0.0 <= args.warmup_ratio < 1.0, "--warmup_ratio must be in [0, 1)")
    need(args.logging_steps >= 1, "--logging_steps must be at least 1")
    need(args.save_total_limit >= 1, "--save_total_limit must be at least 1")
    if args.eval_strategy == "steps":
        need(args.eval_steps is not None and args.eval_steps >= 1,
             "--eval_strategy steps needs --eval_steps N (N >= 1)")
    if getattr(args, "temperature", None) is not None:
        need(args.temperature > 0, f"--temperature must be > 0, got {args.temperature}")
        need(args.alpha_ce >= 0 and args.alpha_kd >= 0, "--alpha_ce and --alpha_kd must be >= 0")
    if args.command in ("finetune", "evaluate"):
        need(args.model_name_or_path is not None, f"{args.command} needs --model_name_or_path")
    if args.command == "distill":
        need(args.teacher_model_name_or_path is not None, "distill needs --teacher_model_name_or_path")
        need(args.model_name_or_path is not None or args.student_layers is not None,
             "distill needs a student: --model_name_or_path S, or --student_layers 0,2,4 to build it from the teacher")
    if args.command in ("finetune", "distill", "evaluate"):
        need(args.output_dir is not None, f"{args.command} needs --output_dir")
    if getattr(args, "speed_test_questions", None) is not None:
        need(args.speed_test_questions >= 1, "--speed_test_questions must be at least 1")
    if args.command == "evaluate":
        need(args.validation_file is not None or args.dataset_name, "evaluate needs --validation_file")
