"""The command line of train.py, its one public entry: `parse_args(argv) -> Flags`.

Flags come in groups (model, data, windows, decoding, runtime, training, distillation, run_qa.py
compatibility, and predict's, export's and the recipe's own), each declared once (kdqa.flags);
COMMANDS gives each sub-command the groups it reads, so its --help lists only those. Parsing imports
no torch: `train.py --help` stays instant, and the rules that need torch (kdqa.objective, kdqa.loss)
are imported only to validate a parsed command line (kdqa.validation).

Flag names follow Hugging Face's run_qa.py so SQuAD users feel at home (its --do_*, --fp16/--bf16,
--pad_to_max_length and `COMMAND args.json` work too; without a sub-command, a run_qa.py command
line means finetune, and TrainingArguments' forms such as `--fp16 True` are accepted:
kdqa.run_qa_compat). A --config file (YAML or JSON) holds the same keys as the flags and is parsed by
the same parser, so its values meet the same types, choices and range checks; flags given on the
command line override it (kdqa.argv_config). Every error is a ConfigError: one line.
"""

from __future__ import annotations

import argparse
import sys

from kdqa import argv_config
from kdqa.argv_config import config_tokens, load_config_file, subparsers, with_command
from kdqa.config_error import ConfigError
from kdqa.flags import build_parser
from kdqa.run_qa_compat import resolve_run_qa_flags, resolve_training_arguments_flags
from kdqa.validation import validate_args

__all__ = ["ConfigError", "Flags", "build_parser", "given_flags", "parse_args"]


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
    def decoding(self):
        from kdqa.postprocess import Decoding  # postprocess imports numpy (a tenth of a second): not at --help

        return Decoding.from_args(self)


def parse_args(argv: list[str] | None = None) -> Flags:
    """Parse train.py's command line; no sub-command means `recipe`.

    A --config file (before or after the sub-command) is turned into flags placed before the command
    line's own, so both go through the same parser and checks and the command line wins.
    """
    parser = build_parser()
    argv = with_command(list(sys.argv[1:] if argv is None else argv), list(subparsers(parser)))
    try:
        args = parser.parse_args(argv, namespace=Flags())
        if args.config:
            values = load_config_file(args.config)
            argv = argv[:1] + config_tokens(values, subparsers(parser)[argv[0]], args.config) + argv[1:]
            args = parser.parse_args(argv, namespace=Flags())
    except ConfigError as err:
        raise ConfigError(f"{err}; see `train.py {argv[0]} --help`") from None
    resolve_run_qa_flags(args)
    resolve_training_arguments_flags(args)
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
    return argv_config.given_flags(build_parser(), argv)
