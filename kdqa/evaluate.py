"""Command line of the official SQuAD v1.1 metric, a drop-in for the official `evaluate-v1.1.py`:

    python -m kdqa.evaluate DATASET_FILE PREDICTIONS_FILE

prints `{"exact_match": ..., "f1": ...}`. DATASET_FILE is SQuAD v1.1 JSON, plain or .json.gz;
PREDICTIONS_FILE a JSON object from question id to answer text. Unanswered questions score 0 and
are reported on stderr. Bad input exits with code 2 and a one-line message, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PROG = "kdqa-evaluate"
if __name__ == "__main__":  # before datasets and pyarrow import (a second): a SIGTERM meanwhile is one line, 143
    from .interrupt import exit_on_stop_signals

    exit_on_stop_signals(PROG)

from .data import SquadDataError, load_squad_json  # noqa: E402
from .metric import missing_ids, squad_v1_score  # noqa: E402

MAX_LISTED_MISSING = 10


def _fail(message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_predictions(path: str) -> dict[str, str]:
    """The predictions file as {id: text}; errors name the file and the problem."""
    if not os.path.exists(path):
        _fail(f"{path}: predictions file not found")
    if os.path.isdir(path):
        _fail(f"{path}: is a directory, not a predictions JSON file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        _fail(f"{path}: cannot be read ({err.strerror or err})")
    try:
        predictions = json.loads(raw)
    except UnicodeDecodeError:
        _fail(f"{path}: is not JSON (not UTF-8 text)")
    except json.JSONDecodeError as err:
        _fail(f"{path}: is not JSON ({err.msg} at line {err.lineno} column {err.colno})")
    if not isinstance(predictions, dict):
        _fail(
            f"{path}: predictions must be a JSON object from question id to answer text, "
            f"got a JSON {type(predictions).__name__}"
        )
    bad = [key for key, value in predictions.items() if not isinstance(value, str)]
    if bad:
        _fail(
            f"{path}: the prediction for question {bad[0]!r} is a {type(predictions[bad[0]]).__name__}, "
            f"not answer text ({len(bad)} such entries); give a JSON object from question id to answer text"
        )
    return predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Official SQuAD v1.1 evaluation: exact match and F1 of a predictions file."
    )
    parser.add_argument("dataset_file", metavar="DATASET_FILE", help="SQuAD v1.1 JSON (.json or .json.gz)")
    parser.add_argument("prediction_file", metavar="PREDICTIONS_FILE", help="JSON object: question id -> answer text")
    args = parser.parse_args(argv)

    try:
        dataset = load_squad_json(args.dataset_file)
    except SquadDataError as err:
        _fail(str(err))
    predictions = read_predictions(args.prediction_file)

    scores = squad_v1_score(dataset, predictions)
    if scores["missing"]:
        unanswered = missing_ids(dataset, predictions)
        for qid in unanswered[:MAX_LISTED_MISSING]:
            print(f"Unanswered question {qid} will receive score 0.", file=sys.stderr)
        if len(unanswered) > MAX_LISTED_MISSING:
            print(
                f"... and {len(unanswered) - MAX_LISTED_MISSING} more unanswered questions "
                f"({len(unanswered)} of {scores['total']} in all) will receive score 0.",
                file=sys.stderr,
            )
    print(json.dumps({"exact_match": scores["exact_match"], "f1": scores["f1"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
