"""From argv and a --config file to the tokens train.py's parser reads, and back to what was given.

- the sub-command found (none: `recipe`, or `finetune` for a run_qa.py command line) and a --config
  given before it moved after it; `COMMAND args.json` means `COMMAND --config args.json`;
- a YAML or JSON config file read and turned into flag tokens, each value checked by its flag's own
  type and choices, so a file is parsed exactly as the command line is;
- which flags a command line sets (a value equal to its default still counts).

Every use of argparse's private parts (its list of actions, its sub-parsers, its value check and its
defaults) is in this module, in the four small functions under "argparse's insides", so a change in
argparse breaks one place.
"""

from __future__ import annotations

import argparse
import json
import os

from kdqa.config_error import ConfigError
from kdqa.run_qa_compat import (BoolFlag, IgnoredFlag, RefuseFlag, looks_like_run_qa, str_to_bool,
                                unsupported_hf_flags, unsupported_message)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag raises ConfigError (one line from train.py, exit 2) instead of exiting here.

    Every store_true flag also takes HfArgumentParser's value form (`--fp16 True`, `--pad_to_max_length
    False`), and a TrainingArguments flag kdqa lacks is named as such, not as "unrecognized".
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", "store_true", BoolFlag)

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            flags = [token[2:].split("=")[0] for token in message.split(": ", 1)[1].split() if token.startswith("--")]
            unsupported = unsupported_hf_flags(flags)
            if unsupported:
                raise ConfigError(unsupported_message(unsupported))
        raise ConfigError(message)


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML or JSON file of flag values, parsed and checked as the flags are (flags given on the "
                        "command line override it); `train.py COMMAND args.json` means the same")


def load_config_file(path: str) -> dict:
    """Read a YAML or JSON config file into a dict of flag values."""
    import yaml  # only where a --config file is given: not at --help

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


def with_command(argv: list[str], commands: list[str]) -> list[str]:
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
        command, rest = ("finetune" if looks_like_run_qa(argv) else "recipe"), argv
    if len(rest) == 1 and rest[0].endswith(CONFIG_SUFFIXES) and not rest[0].startswith("-"):
        rest = ["--config", rest[0]]
    if sum(a == "--config" or a.startswith("--config=") for a in head + rest) > 1:
        raise ConfigError("--config is given more than once; give one file")
    return [command] + head + rest


def config_tokens(values: dict, parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A config mapping as command-line tokens for `parser`, each value checked by the flag's own type
    and choices, so a file is parsed exactly as the command line is.

    Booleans (store_true flags) take true/false only: true adds the flag, false leaves it out.
    null keeps the flag's default. --student_layers also takes a list of layer numbers.
    """
    tokens, unknown = [], []
    for key, value in values.items():
        action = next((a for a in actions(parser) if f"--{key}" in a.option_strings), None)
        if action is None or key in ("config", "help"):
            unknown.append(str(key))
            continue
        where = f"--config {path}: {key}"
        boolean = action.nargs == 0 or isinstance(action, (BoolFlag, RefuseFlag)) or action.type is str_to_bool
        if boolean:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            if isinstance(action, IgnoredFlag):
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
            check_value(parser, action, text)
        except argparse.ArgumentError as err:
            raise ConfigError(f"--config {path}: {err}") from None
        tokens.append(f"--{key}={text}")  # one token: a value starting with '-' is not taken for a flag
    unsupported = unsupported_hf_flags(unknown)
    if unsupported:
        raise ConfigError(f"--config {path}: {unsupported_message(unsupported)}")
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {sorted(unknown)} for '{parser.prog.split()[-1]}'")
    return tokens


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The flags that argv (the command line and --config's tokens) sets, by dest: a value equal to its
    default still counts as given, which the values alone cannot tell. `parser` (a fresh one: its
    defaults are dropped) is train.py's."""
    for p in (parser, *subparsers(parser).values()):
        _forget_defaults(p)
    return set(vars(parser.parse_args(argv))) - {"command"}


# ----------------------------------------------------------------------------- argparse's insides
# The only lines of kdqa that touch argparse's private parts (and `register`, in Parser above).


def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every flag (and the sub-command choice) of `parser`, in the order they were added."""
    return parser._actions


def check_value(parser: argparse.ArgumentParser, action: argparse.Action, text: str) -> None:
    """`text` converted by the flag's type and checked against its choices (argparse.ArgumentError if not)."""
    parser._check_value(action, parser._get_value(action, text))


def _forget_defaults(parser: argparse.ArgumentParser) -> None:
    """Leave out every flag not given: no default, not even set_defaults' (the recipe's models, fixed phases)."""
    parser._defaults.clear()
    for action in parser._actions:
        action.default = argparse.SUPPRESS


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{command name: its parser}."""
    for action in actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no sub-commands")
