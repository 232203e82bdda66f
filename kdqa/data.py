"""Loading SQuAD v1.1: the hub dataset `squad` for users online, or local files in the official
JSON layout (plain `.json` or `.json.gz`) for everyone else.

Both paths give the same flat examples (id, title, context, question, answers {text, answer_start})
as a `datasets.Dataset`, so everything downstream is written once. Bad input fails early with a
SquadDataError that names the file and the problem, because a KeyError deep inside tokenisation
an hour into a job says neither.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Callable, Iterable

import datasets
import pyarrow as pa
from datasets import Dataset, DatasetInfo, Features, Value

try:  # datasets >= 4
    from datasets import List as _ListFeature
except ImportError:  # pragma: no cover - older datasets
    from datasets import Sequence as _ListFeature

SPLITS = ("train", "validation")
FILE_FLAGS = {"train": "--train_file", "validation": "--validation_file"}
COLUMNS = ("id", "title", "context", "question", "answers")

# Same schema as the hub dataset `squad`, so local and hub examples are interchangeable.
SQUAD_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": {
            "text": _ListFeature(Value("string")),
            "answer_start": _ListFeature(Value("int32")),
        },
    }
)


class SquadDataError(ValueError):
    """SQuAD data is missing or malformed; the message names the file, the place and the fix."""


# ---------------------------------------------------------------------------------------------
# Local JSON files
# ---------------------------------------------------------------------------------------------


def _read_json(path: str):
    """Parse a plain or gzip-compressed JSON file (gzip is recognised by its magic bytes)."""
    if not os.path.exists(path):
        raise SquadDataError(f"{path}: file not found. Give the path of a SQuAD v1.1 JSON file (.json or .json.gz)")
    if os.path.isdir(path):
        raise SquadDataError(f"{path}: is a directory, not a SQuAD v1.1 JSON file (.json or .json.gz)")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise SquadDataError(f"{path}: cannot be read ({err.strerror or err})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise SquadDataError(f"{path}: is not a valid gzip file ({err}); re-download or re-compress it") from None
    elif path.endswith(".gz"):
        raise SquadDataError(f"{path}: ends in .gz but is not a gzip file; rename it to .json if it is plain JSON")
    if not raw.strip():
        raise SquadDataError(f"{path}: is empty, not SQuAD v1.1 JSON")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as err:
        raise SquadDataError(f"{path}: is not JSON (not UTF-8 text: {err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise SquadDataError(f"{path}: is not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None


def _layout_error(path: str, where: str, problem: str) -> SquadDataError:
    return SquadDataError(
        f"{path}: not in SQuAD v1.1 layout: {where}: {problem} (expected "
        '{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers": '
        '[{"text", "answer_start"}]}]}]}]})'
    )


def _get(obj, key: str, kind, path: str, where: str):
    """obj[key] checked for type; `where` is the JSON path of obj, used in the error."""
    if not isinstance(obj, dict):
        raise _layout_error(path, where, f"expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise _layout_error(path, where, f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise _layout_error(path, f"{where}.{key}", f"expected {expected}, got {type(value).__name__}")
    return value


def flatten_squad(payload, path: str = "<data>") -> dict[str, list]:
    """Official nested layout -> flat columns (id, title, context, question, answers)."""
    data = _get(payload, "data", list, path, "top level")
    ids, titles, contexts, questions, answers = [], [], [], [], []
    seen: dict[str, str] = {}
    for a, article in enumerate(data):
        where_a = f"data[{a}]"
        paragraphs = _get(article, "paragraphs", list, path, where_a)
        title = article.get("title", "")
        if not isinstance(title, str):
            raise _layout_error(path, f"{where_a}.title", f"expected str, got {type(title).__name__}")
        for p, paragraph in enumerate(paragraphs):
            where_p = f"{where_a}.paragraphs[{p}]"
            context = _get(paragraph, "context", str, path, where_p)
            qas = _get(paragraph, "qas", list, path, where_p)
            for q, qa in enumerate(qas):
                where_q = f"{where_p}.qas[{q}]"
                qid = _get(qa, "id", (str, int), path, where_q)
                question = _get(qa, "question", str, path, where_q)
                gold = _get(qa, "answers", list, path, where_q)
                texts, starts = [], []
                for g, answer in enumerate(gold):
                    where_g = f"{where_q}.answers[{g}]"
                    texts.append(_get(answer, "text", str, path, where_g))
                    starts.append(_get(answer, "answer_start", int, path, where_g))
                qid = str(qid)
                if qid in seen:
                    raise _layout_error(
                        path, where_q, f"question id {qid!r} repeats the id of {seen[qid]}; ids must be unique"
                    )
                seen[qid] = where_q
                ids.append(qid)
                titles.append(title)
                contexts.append(context)
                questions.append(question)
                answers.append({"text": texts, "answer_start": starts})
    return {"id": ids, "title": titles, "context": contexts, "question": questions, "answers": answers}


def load_squad_json(path: str) -> Dataset:
    """A SQuAD v1.1 file in the official JSON layout (plain or .json.gz) as flat examples."""
    path = os.fspath(path)
    columns = flatten_squad(_read_json(path), path)
    if not columns["id"]:
        raise SquadDataError(f"{path}: the dataset is empty (no questions); give a SQuAD v1.1 file with questions")
    return _to_dataset(columns, path)


def _to_dataset(columns: dict[str, list], path: str = "<data>") -> Dataset:
    # Building the Arrow table directly is ~3x faster than Dataset.from_dict on the train file.
    try:
        table = pa.Table.from_pydict(columns, schema=SQUAD_FEATURES.arrow_schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
        raise SquadDataError(f"{path}: a value does not fit the SQuAD schema ({err})") from None
    return Dataset(table, info=DatasetInfo(features=SQUAD_FEATURES))


# ---------------------------------------------------------------------------------------------
# Local files or the hub
# ---------------------------------------------------------------------------------------------


def _load_from_hub(dataset_name: str, splits: tuple[str, ...]) -> dict[str, Dataset]:
    from .modeling import hub_reachable

    flags = "/".join(FILE_FLAGS[s] for s in splits)
    if not hub_reachable():
        raise SquadDataError(
            f"no local SQuAD files were given and the Hugging Face hub cannot be reached to download the "
            f"dataset {dataset_name!r}. Without internet, give SQuAD v1.1 JSON files (.json or .json.gz) "
            f"with {flags}."
        )
    try:
        loaded = datasets.load_dataset(dataset_name)
    except Exception as err:  # the hub client raises many unrelated types; all mean "not loaded"
        raise SquadDataError(
            f"could not load the dataset {dataset_name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"Give local SQuAD v1.1 JSON files with {flags} instead."
        ) from None
    out = {}
    for split in splits:
        if split not in loaded:
            raise SquadDataError(
                f"the hub dataset {dataset_name!r} has no {split!r} split (it has {sorted(loaded)}); "
                f"give a local file with {FILE_FLAGS[split]}"
            )
        missing = [c for c in COLUMNS if c not in loaded[split].column_names]
        if missing:
            raise SquadDataError(
                f"the hub dataset {dataset_name!r} ({split}) lacks the SQuAD columns {missing}; "
                f"give a SQuAD v1.1 dataset name or a local file with {FILE_FLAGS[split]}"
            )
        if len(loaded[split]) == 0:
            raise SquadDataError(f"the hub dataset {dataset_name!r} ({split}) is empty")
        out[split] = loaded[split]
    return out


def load_squad(
    train_file: str | None = None,
    validation_file: str | None = None,
    dataset_name: str = "squad",
    splits: Iterable[str] = SPLITS,
) -> dict[str, Dataset]:
    """{"train": ..., "validation": ...} for the requested `splits`.

    Local files when any is given (then every requested split needs its file), else the hub
    dataset `dataset_name`, checked for reachability first so an offline machine fails in seconds.
    """
    splits = tuple(splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits}")
    files = {"train": train_file, "validation": validation_file}
    if not any(files.values()):
        return _load_from_hub(dataset_name, splits)
    out = {}
    for split in splits:
        if not files[split]:
            given = [FILE_FLAGS[s] for s in SPLITS if files[s]]
            raise SquadDataError(
                f"the {split} split was asked for but {FILE_FLAGS[split]} is not given (only {', '.join(given)}); "
                f"give {FILE_FLAGS[split]} too, or give no files to load {dataset_name!r} from the hub"
            )
        out[split] = load_squad_json(files[split])
    return out


# ---------------------------------------------------------------------------------------------
# Training answers whose answer_start is wrong
# ---------------------------------------------------------------------------------------------


def _relocate(context: str, text: str, start: int) -> int | None:
    """The occurrence of `text` in `context` nearest to `start`, or None when it does not occur."""
    if not text:
        return None
    best = None
    pos = context.find(text)
    while pos != -1:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        elif pos > start:
            break  # occurrences only get further away from here on
        pos = context.find(text, pos + 1)
    return best


def fix_answer_starts(dataset: Dataset, log: Callable[[str], None] | None = print) -> Dataset:
    """Training data only: make every answer_start point at its text, or drop the question.

    A wrong start would train the model on the wrong span. An answer is moved to the occurrence of
    its text nearest to the given start; an answer whose text is not in the context is removed,
    and a question left without answers is dropped. The counts are reported once via `log`.
    """
    table = dataset.with_format("arrow")[:]  # honours an indices mapping from select/shuffle
    contexts = table.column("context").to_pylist()
    answers = table.column("answers").to_pylist()
    keep, new_answers = [], []
    n_fixed = n_dropped = 0
    changed = False
    for i, (context, gold) in enumerate(zip(contexts, answers)):
        texts, starts = list(gold["text"]), list(gold["answer_start"])
        good_texts, good_starts = [], []
        for text, start in zip(texts, starts):
            if text and start >= 0 and context[start : start + len(text)] == text:
                good_texts.append(text)
                good_starts.append(start)
                continue
            found = _relocate(context, text, start)
            if found is None:
                changed = True
                continue
            n_fixed += 1
            changed = True
            good_texts.append(text)
            good_starts.append(found)
        if good_texts:
            keep.append(i)
            new_answers.append({"text": good_texts, "answer_start": good_starts})
        else:
            n_dropped += 1
    if log is not None:
        log(
            f"answer_start check: checked {len(answers)} questions, fixed {n_fixed} answer starts, "
            f"dropped {n_dropped} questions whose answer text is not in the context"
        )
    if not changed:
        return dataset
    if not keep:
        raise SquadDataError(
            "no training question is left: no answer text occurs in its context. Is this a SQuAD v1.1 training file?"
        )
    fixed = dataset.select(keep) if len(keep) < len(dataset) else dataset
    fixed = fixed.flatten_indices() if len(keep) < len(dataset) else fixed
    fixed = fixed.remove_columns("answers")
    return fixed.add_column("answers", new_answers, feature=dataset.features["answers"]).select_columns(
        dataset.column_names
    )
