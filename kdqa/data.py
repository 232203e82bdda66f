"""Loading SQuAD v1.1: the hub dataset `squad` for users online, or local files (plain `.json` or
`.json.gz`) for everyone else, in the official nested layout or in run_qa.py's flat layout (one record
per question: id, title, context, question, answers {text, answer_start}), either as JSON lines (what
`datasets`' to_json writes) or as {"data": [flat records]}; the layout is detected from the content.

Every path gives the same flat examples (id, title, context, question, answers {text, answer_start})
as a `datasets.Dataset`, so everything downstream is written once. Bad input fails early with a
SquadDataError that names the file and the problem, because a KeyError deep inside tokenisation
an hour into a job says neither.
"""

from __future__ import annotations

import gzip
import json
import logging
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

logger = logging.getLogger("kdqa")

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


def read_text(path: str) -> str:
    """A plain or gzip-compressed UTF-8 file as text (gzip is recognised by its magic bytes; a UTF-8
    BOM is dropped, as kdqa.evaluate's JSON reading does); every error names the file."""
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
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SquadDataError(f"{path}: is not JSON (not UTF-8 text: {err.reason} at byte {err.start}); "
                             "save it as UTF-8") from None


def _read_json(path: str):
    """Parse a plain or gzip-compressed JSON file (or JSON lines)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_json_lines(text, path)
        raise SquadDataError(f"{path}: is not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None


class JsonLines(list):
    """The records of a JSON lines file, as (line number, record) pairs."""


def _read_json_lines(text: str, path: str) -> JsonLines:
    records = JsonLines()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise SquadDataError(
                f"{path}: is neither JSON nor JSON lines (line {number}: {err.msg} at column {err.colno})"
            ) from None
    return records


NESTED_LAYOUT = ('SQuAD v1.1 layout', '{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", '
                 '"answers": [{"text", "answer_start"}]}]}]}]}')
FLAT_LAYOUT = ("flat run_qa layout", 'one record per question, {"id", "title", "context", "question", '
               '"answers": {"text": [...], "answer_start": [...]}}, as JSON lines or as {"data": [records]}')


def _layout_error(path: str, where: str, problem: str, layout=NESTED_LAYOUT) -> SquadDataError:
    return SquadDataError(f"{path}: not in {layout[0]}: {where}: {problem} (expected {layout[1]})")


def _get(obj, key: str, kind, path: str, where: str, layout=NESTED_LAYOUT):
    """obj[key] checked for type; `where` is the JSON path of obj, used in the error."""
    if not isinstance(obj, dict):
        raise _layout_error(path, where, f"expected an object, got {type(obj).__name__}", layout)
    if key not in obj:
        raise _layout_error(path, where, f"missing key {key!r}", layout)
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise _layout_error(path, f"{where}.{key}", f"expected {expected}, got {type(value).__name__}", layout)
    return value


def _marked_v2(qa: dict) -> bool:
    """SQuAD v2.0 marks its unanswerable questions; v1.1 has neither key."""
    return bool(qa.get("is_impossible")) or "plausible_answers" in qa


class _Columns:
    """Flat columns being filled, with the checks every layout shares (unique ids, v2 marks)."""

    def __init__(self, path: str, layout):
        self.path, self.layout = path, layout
        self.data = {c: [] for c in COLUMNS}
        self.seen: dict[str, str] = {}
        self.v2_marked = 0

    def add(self, where: str, qid, title: str, context: str, question: str, texts: list, starts: list, qa: dict):
        qid = str(qid)
        if qid in self.seen:
            raise _layout_error(self.path, where, f"question id {qid!r} repeats the id of {self.seen[qid]}; ids "
                                "must be unique", self.layout)
        self.seen[qid] = where
        self.v2_marked += _marked_v2(qa)
        data = self.data
        data["id"].append(qid)
        data["title"].append(title)
        data["context"].append(context)
        data["question"].append(question)
        data["answers"].append({"text": texts, "answer_start": starts})


def _title(obj: dict, path: str, where: str, layout) -> str:
    title = obj.get("title", "")
    if not isinstance(title, str):
        raise _layout_error(path, f"{where}.title", f"expected str, got {type(title).__name__}", layout)
    return title


def _flatten_nested(payload, path: str) -> _Columns:
    out = _Columns(path, NESTED_LAYOUT)
    data = _get(payload, "data", list, path, "top level")
    for a, article in enumerate(data):
        where_a = f"data[{a}]"
        paragraphs = _get(article, "paragraphs", list, path, where_a)
        title = _title(article, path, where_a, NESTED_LAYOUT)
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
                out.add(where_q, qid, title, context, question, texts, starts, qa)
    return out


def _flatten_flat(records: list[tuple[str, object]], path: str) -> _Columns:
    """run_qa.py's flat records; `records` pairs each with its place ("line 3", "data[2]") for errors."""
    out = _Columns(path, FLAT_LAYOUT)
    for where, record in records:
        def get(key, kind, obj=record, at=where):
            return _get(obj, key, kind, path, at, FLAT_LAYOUT)

        qid, context, question = get("id", (str, int)), get("context", str), get("question", str)
        title = _title(record, path, where, FLAT_LAYOUT)
        gold = get("answers", dict)
        texts = get("text", list, gold, f"{where}.answers")
        starts = get("answer_start", list, gold, f"{where}.answers")
        if len(texts) != len(starts):
            raise _layout_error(path, f"{where}.answers", f"{len(texts)} texts but {len(starts)} answer_starts",
                                FLAT_LAYOUT)
        for i, (text, start) in enumerate(zip(texts, starts)):
            if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                raise _layout_error(path, f"{where}.answers[{i}]", "expected a str text and an int answer_start, "
                                    f"got {type(text).__name__} and {type(start).__name__}", FLAT_LAYOUT)
        out.add(where, qid, title, context, question, list(texts), list(starts), record)
    return out


def _is_flat_record(obj) -> bool:
    return isinstance(obj, dict) and "paragraphs" not in obj and ("question" in obj or "context" in obj)


def _flatten_any(payload, path: str) -> _Columns:
    """Detect the layout from the content: JSON lines, {"data": [flat records]}, one flat record, or nested."""
    if isinstance(payload, JsonLines):
        return _flatten_flat([(f"line {n}", record) for n, record in payload], path)
    if _is_flat_record(payload) and "data" not in payload:  # a JSON lines file of one line
        return _flatten_flat([("line 1", payload)], path)
    data = payload.get("data") if isinstance(payload, dict) else None
    if isinstance(data, list) and data and _is_flat_record(data[0]):
        return _flatten_flat([(f"data[{i}]", record) for i, record in enumerate(data)], path)
    return _flatten_nested(payload, path)


def flatten_squad(payload, path: str = "<data>") -> dict[str, list]:
    """Any supported layout (see the module docstring) -> flat columns (id, title, context, question, answers)."""
    return _flatten_any(payload, path).data


def load_squad_json(path: str, split: str | None = None) -> Dataset:
    """A SQuAD v1.1 file (any supported layout, plain or .json.gz) as flat examples.

    With `split`, questions without answers are checked for what that split can do with them: a
    validation file refuses them (they would score 0), a training file says what will be dropped.
    """
    path = os.fspath(path)
    columns = _flatten_any(_read_json(path), path)
    if not columns.data["id"]:
        raise SquadDataError(f"{path}: the dataset is empty (no questions); give a SQuAD v1.1 file with questions")
    if split is not None:
        _check_unanswerable(columns, split, path)
    return _to_dataset(columns.data, path)


def _check_unanswerable(columns: _Columns, split: str, path: str) -> None:
    total = len(columns.data["id"])
    no_answer = sum(1 for gold in columns.data["answers"] if not gold["text"])
    if not no_answer and not columns.v2_marked:
        return
    v2 = (f"looks like SQuAD v2.0 ({columns.v2_marked} of {total} questions carry is_impossible or "
          "plausible_answers); kdqa is for SQuAD v1.1. ") if columns.v2_marked else ""
    if split == "validation" and no_answer:
        raise SquadDataError(
            f"{path}: {v2}{no_answer} of {total} questions have no gold answer, and a question without one "
            "would score 0 whatever the model says. Evaluate on a SQuAD v1.1 dev file, or remove those questions."
        )
    if split == "train" and v2:
        logger.warning("%s: %s%d of its %d questions have no answer and are dropped from training.", path, v2,
                       no_answer, total)


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


def datasets_cache_dir() -> str:
    return os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE))


def hub_dataset_cached(dataset_name: str) -> bool:
    """True when the datasets cache ($HF_HOME/datasets) holds `dataset_name` as `load_dataset` left it:
    what datasets itself reads there when the hub cannot be reached (its CachedDatasetModuleFactory)."""
    from datasets.load import CachedDatasetModuleFactory

    try:
        _quietly(CachedDatasetModuleFactory(dataset_name, cache_dir=datasets_cache_dir()).get_module)
        return True
    except Exception:  # FileNotFoundError where absent; a name that is no repository id fails its checks
        return False


def _quietly(function, *args):
    """function(*args) without datasets' "using the latest cached version" warnings (four lines on
    every load); kdqa says it in one."""
    loggers = [logging.getLogger(name) for name in ("datasets.load", "datasets.packaged_modules.cache.cache")]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        return function(*args)
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


def _load_dataset_offline(dataset_name: str):
    """`load_dataset` in offline mode, reading the datasets cache. datasets reads HF_HUB_OFFLINE once, at
    import; with the hub unreachable it must not be asked (or retried) either, so the mode is set here."""
    logger.info("dataset %r: from the datasets cache (%s), as the hub cannot be reached", dataset_name,
                datasets_cache_dir())
    names = [n for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(datasets.config, n)]
    saved = {n: getattr(datasets.config, n) for n in names}
    for name in names:
        setattr(datasets.config, name, True)
    try:
        return _quietly(datasets.load_dataset, dataset_name)
    finally:
        for name, value in saved.items():
            setattr(datasets.config, name, value)


def _load_from_hub(dataset_name: str, splits: tuple[str, ...]) -> dict[str, Dataset]:
    """The hub dataset, from the hub if it answers, else from the datasets cache (offline mode)."""
    from .modeling import hub_reachable

    flags = "/".join(FILE_FLAGS[s] for s in splits)
    online = hub_reachable()
    if not online and not hub_dataset_cached(dataset_name):
        raise SquadDataError(
            f"no local SQuAD files were given and the Hugging Face hub cannot be reached to download the "
            f"dataset {dataset_name!r}, nor does the datasets cache ({datasets_cache_dir()}) hold it. Without "
            f"internet, pre-fill that cache on a machine with internet (python -c \"import datasets; "
            f"datasets.load_dataset('{dataset_name}')\", then copy its $HF_HOME here), or give SQuAD v1.1 JSON "
            f"files (.json or .json.gz) with {flags}."
        )
    try:
        loaded = datasets.load_dataset(dataset_name) if online else _load_dataset_offline(dataset_name)
    except Exception as err:  # the hub client raises many unrelated types; all mean "not loaded"
        where = "the Hugging Face hub" if online else f"the datasets cache ({datasets_cache_dir()})"
        raise SquadDataError(
            f"could not load the dataset {dataset_name!r} from {where} ({type(err).__name__}: {err}). "
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
        out[split] = load_squad_json(files[split], split=split)
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
    its text nearest to the given start; an answer whose text is not in the context is removed.
    A question without any answer left (or without answers to begin with, as SQuAD v2.0's
    unanswerable ones) is dropped: kdqa would otherwise train it on [CLS]. The counts are reported
    once via `log`; a file with no question left is refused.
    """
    table = dataset.with_format("arrow")[:]  # honours an indices mapping from select/shuffle
    contexts = table.column("context").to_pylist()
    answers = table.column("answers").to_pylist()
    keep, new_answers = [], []
    n_fixed = n_unanswered = n_not_found = 0
    for i, (context, gold) in enumerate(zip(contexts, answers)):
        if not gold["text"]:
            n_unanswered += 1
            continue
        good_texts, good_starts = [], []
        for text, start in zip(gold["text"], gold["answer_start"]):
            if text and start >= 0 and context[start : start + len(text)] == text:
                found = start
            else:
                found = _relocate(context, text, start)
                n_fixed += found is not None
            if found is not None:
                good_texts.append(text)
                good_starts.append(found)
        if good_texts:
            keep.append(i)
            new_answers.append({"text": good_texts, "answer_start": good_starts})
        else:
            n_not_found += 1
    if log is not None:
        log(
            f"answer check: checked {len(answers)} training questions, fixed {n_fixed} answer starts, dropped "
            f"{n_unanswered} questions without answers and {n_not_found} whose answer text is not in the context"
        )
    if not keep:
        raise SquadDataError(
            f"no training question is left: {n_unanswered} of {len(answers)} have no answer and {n_not_found} have "
            "no answer text in their context. kdqa trains on SQuAD v1.1, where every training question has an "
            "answer; give a SQuAD v1.1 training file."
        )
    if new_answers == answers:
        return dataset
    fixed = dataset.select(keep).flatten_indices() if len(keep) < len(dataset) else dataset
    fixed = fixed.remove_columns("answers")
    return fixed.add_column("answers", new_answers, feature=dataset.features["answers"]).select_columns(
        dataset.column_names
    )


# ----------------------------------------------------------------------------- question files (predict --test_file)


def read_questions_file(path: str):
    """--test_file: SQuAD v1.1 (the layouts kdqa.data reads) or JSON lines of {id, question, context}.

    JSON lines whose first record has no "answers" are questions to answer (_read_question_lines);
    everything else goes to load_squad_json, which knows the SQuAD layouts and their errors. Both
    read the file with read_text (gzip, UTF-8 with or without a BOM, errors naming the file).
    """
    text = read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and "data" not in record and "answers" not in record:
        return _read_question_lines(text, path)
    return _scored_only_if_all_answered(load_squad_json(path), path)


def _scored_only_if_all_answered(examples, path: str):
    """The rule `evaluate` follows: a file is scored only when every question has a gold answer (one
    without would score 0 whatever the model says). None has one: answered, not scored. Some: refused."""
    unanswered = sum(1 for gold in examples["answers"] if not gold["text"])
    if unanswered == len(examples):
        logger.info("%s: no question has a gold answer; answering them without a score", path)
        return examples.remove_columns("answers")
    if unanswered:
        raise SquadDataError(
            f"{path}: {unanswered} of {len(examples)} questions have no gold answer, and a question without one "
            "would score 0 whatever the model says (evaluate refuses such a file too). Remove those questions, or "
            "remove every gold answer to have the questions answered without a score."
        )
    return examples


def _read_question_lines(text: str, path: str) -> dict[str, list]:
    """JSON lines of {id, question, context} as columns; errors name the line and the fix."""
    columns = {"id": [], "question": [], "context": []}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SquadDataError(f"{path}: line {number} is not JSON ({err.msg})") from None
        bad = [k for k in columns if not isinstance(record.get(k) if isinstance(record, dict) else None, str)]
        if bad:
            raise SquadDataError(f"{path}: line {number} lacks {bad} as text; each line must be "
                                 '{"id": ..., "question": ..., "context": ...}')
        for key in columns:
            columns[key].append(record[key])
    if not columns["id"]:
        raise SquadDataError(f"{path}: no questions in the file")
    if len(set(columns["id"])) != len(columns["id"]):
        raise SquadDataError(f"{path}: question ids are not unique; give every line its own id")
    return columns
