"""Loading SQuAD JSON (plain / gzip), its error messages, the hub path offline, answer_start repair."""

import gzip
import json
import time

import datasets
import pytest

import kdqa.data as data_module
from kdqa.data import SQUAD_FEATURES, SquadDataError, fix_answer_starts, load_squad, load_squad_json, read_questions_file
from synthetic import make_examples, to_squad_json, write_squad_json

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def examples():
    return make_examples(n=30, seed=11, n_answers=2)


@pytest.mark.parametrize("gz", [False, True])
def test_roundtrip_plain_and_gzip(tmp_path, examples, gz):
    path = write_squad_json(tmp_path / ("dev.json.gz" if gz else "dev.json"), examples, gz=gz)
    ds = load_squad_json(path)
    assert isinstance(ds, datasets.Dataset)
    assert ds.features == SQUAD_FEATURES
    assert ds.column_names == ["id", "title", "context", "question", "answers"]
    assert ds.to_list() == examples


def test_gzip_recognised_without_gz_extension(tmp_path, examples):
    path = tmp_path / "dev.json"
    path.write_bytes(gzip.compress(json.dumps(to_squad_json(examples)).encode()))
    assert len(load_squad_json(str(path))) == len(examples)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(SquadDataError, match=r"nope\.json: file not found"):
        load_squad_json(path)
    with pytest.raises(SquadDataError, match="is a directory"):
        load_squad_json(str(tmp_path))


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{\"data\": [1, 2,,]}")
    with pytest.raises(SquadDataError, match=r"bad\.json: is not JSON \(.*line 1 column"):
        load_squad_json(str(path))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SquadDataError, match=r"binary\.json: is not JSON"):
        load_squad_json(str(binary))
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(SquadDataError, match=r"empty\.json: is empty"):
        load_squad_json(str(empty))


def test_bad_gzip(tmp_path, examples):
    truncated = tmp_path / "cut.json.gz"
    truncated.write_bytes(gzip.compress(json.dumps(to_squad_json(examples)).encode())[:60])
    with pytest.raises(SquadDataError, match=r"cut\.json\.gz: is not a valid gzip file"):
        load_squad_json(str(truncated))
    plain = tmp_path / "plain.json.gz"
    plain.write_text(json.dumps(to_squad_json(examples)))
    with pytest.raises(SquadDataError, match=r"plain\.json\.gz: ends in \.gz but is not a gzip file"):
        load_squad_json(str(plain))


def _nested(examples):
    return to_squad_json(examples)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("data"), r"top level: missing key 'data'"),
        (lambda d: d["data"][1].pop("paragraphs"), r"data\[1\]: missing key 'paragraphs'"),
        (lambda d: d["data"][1]["paragraphs"][0].pop("context"), r"data\[1\]\.paragraphs\[0\]: missing key 'context'"),
        (lambda d: d["data"][1]["paragraphs"][0]["qas"][0].pop("question"),
         r"data\[1\]\.paragraphs\[0\]\.qas\[0\]: missing key 'question'"),
        (lambda d: d["data"][1]["paragraphs"][2]["qas"][0]["answers"][1].pop("answer_start"),
         r"data\[1\]\.paragraphs\[2\]\.qas\[0\]\.answers\[1\]: missing key 'answer_start'"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start="12"),
         r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\]\.answer_start: expected int, got str"),
        (lambda d: d["data"][0]["paragraphs"].__setitem__(0, ["not", "an", "object"]),
         r"data\[0\]\.paragraphs\[0\]: expected an object, got list"),
        (lambda d: d["data"][1]["paragraphs"][1]["qas"][0].update(id=d["data"][1]["paragraphs"][0]["qas"][0]["id"]),
         r"data\[1\]\.paragraphs\[1\]\.qas\[0\]: question id 'syn-00001' repeats the id of data\[1\]\.paragraphs\[0\]\.qas\[0\]"),
    ],
)
def test_not_squad_layout_names_the_place(tmp_path, examples, mutate, message):
    payload = _nested(examples)
    mutate(payload)
    path = write_squad_json(tmp_path / "odd.json", payload)
    with pytest.raises(SquadDataError, match=r"odd\.json: not in SQuAD v1\.1 layout: " + message):
        load_squad_json(path)


def test_not_an_object_at_top_level(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(SquadDataError, match=r"list\.json: not in SQuAD v1\.1 layout: top level: expected an object, got list"):
        load_squad_json(str(path))


def test_empty_dataset(tmp_path):
    for name, payload in [("none.json", {"version": "1.1", "data": []}),
                          ("noqas.json", {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": []}]}]})]:
        path = write_squad_json(tmp_path / name, payload)
        with pytest.raises(SquadDataError, match=name.replace(".", r"\.") + r": the dataset is empty \(no questions\)"):
            load_squad_json(path)


def test_load_squad_local_files_and_single_split(tmp_path, examples):
    train = write_squad_json(tmp_path / "train.json", examples[:20])
    dev = write_squad_json(tmp_path / "dev.json.gz", examples[20:], gz=True)
    both = load_squad(train_file=train, validation_file=dev)
    assert set(both) == {"train", "validation"}
    assert len(both["train"]) == 20 and len(both["validation"]) == 10
    only = load_squad(validation_file=dev, splits=("validation",))
    assert list(only) == ["validation"] and only["validation"]["id"] == [e["id"] for e in examples[20:]]
    # A train file is not needed (nor read) when only validation is asked for.
    assert list(load_squad(train_file=str(tmp_path / "absent.json"), validation_file=dev, splits=("validation",))) == ["validation"]
    with pytest.raises(SquadDataError, match="validation split was asked for but --validation_file is not given"):
        load_squad(train_file=train)
    with pytest.raises(ValueError, match="splits must be"):
        load_squad(train_file=train, splits=("test",))


def test_hub_unreachable_fails_fast_and_names_the_flags(monkeypatch):
    import kdqa.modeling

    monkeypatch.setattr(kdqa.modeling, "hub_reachable", lambda timeout=3.0: False)

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("load_dataset must not be called when the hub is unreachable")

    monkeypatch.setattr(data_module.datasets, "load_dataset", must_not_be_called)
    start = time.perf_counter()
    with pytest.raises(SquadDataError, match=r"hub cannot be reached.*'squad'.*--train_file/--validation_file"):
        load_squad()
    assert time.perf_counter() - start < 5
    with pytest.raises(SquadDataError, match=r"with --validation_file\.$"):
        load_squad(splits=("validation",))


def test_hub_failure_is_wrapped(monkeypatch, examples):
    import kdqa.modeling

    monkeypatch.setattr(kdqa.modeling, "hub_reachable", lambda timeout=3.0: True)

    def broken(name, *args, **kwargs):
        raise ConnectionError(f"cannot fetch {name}")

    monkeypatch.setattr(data_module.datasets, "load_dataset", broken)
    with pytest.raises(SquadDataError, match=r"could not load the dataset 'squad'.*ConnectionError: cannot fetch squad.*--train_file/--validation_file"):
        load_squad()

    fake = datasets.DatasetDict({"train": datasets.Dataset.from_list(examples[:5]), "validation": datasets.Dataset.from_list(examples[5:9])})
    monkeypatch.setattr(data_module.datasets, "load_dataset", lambda name, *a, **k: fake)
    loaded = load_squad(splits=("validation",))
    assert list(loaded) == ["validation"] and len(loaded["validation"]) == 4


def test_fix_answer_starts_relocates_or_drops():
    context = "Kestrel ivory sorrel. Ivory cobalt juniper, then ivory again."
    rows = [
        {"id": "ok", "title": "t", "context": context, "question": "q?", "answers": {"text": ["sorrel"], "answer_start": [14]}},
        # 'ivory' occurs at 8, 22 (Ivory: case differs, not a match) and 49; the start 45 is nearest to 49.
        {"id": "near-late", "title": "t", "context": context, "question": "q?", "answers": {"text": ["ivory"], "answer_start": [45]}},
        {"id": "near-early", "title": "t", "context": context, "question": "q?", "answers": {"text": ["ivory"], "answer_start": [3]}},
        {"id": "gone", "title": "t", "context": context, "question": "q?", "answers": {"text": ["mosswood"], "answer_start": [5]}},
        {"id": "past-end", "title": "t", "context": context, "question": "q?", "answers": {"text": ["cobalt"], "answer_start": [400]}},
        {"id": "two", "title": "t", "context": context, "question": "q?",
         "answers": {"text": ["nettle", "juniper"], "answer_start": [0, 35]}},
    ]
    assert context[14:20] == "sorrel" and context.find("ivory", 10) == 49 and context[35:42] == "juniper" and context[28:34] == "cobalt"
    ds = datasets.Dataset.from_list(rows).cast(SQUAD_FEATURES)
    lines = []
    fixed = fix_answer_starts(ds, log=lines.append)
    assert lines == ["answer check: checked 6 training questions, fixed 3 answer starts, "
                     "dropped 0 questions without answers and 1 whose answer text is not in the context"]
    assert fixed.features == SQUAD_FEATURES and fixed.column_names == ds.column_names
    got = {row["id"]: row["answers"] for row in fixed}
    assert set(got) == {"ok", "near-late", "near-early", "past-end", "two"}
    assert got["near-late"] == {"text": ["ivory"], "answer_start": [49]}
    assert got["near-early"] == {"text": ["ivory"], "answer_start": [8]}
    assert got["past-end"] == {"text": ["cobalt"], "answer_start": [28]}
    assert got["two"] == {"text": ["juniper"], "answer_start": [35]}
    for row in fixed:
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start : start + len(text)] == text


def test_fix_answer_starts_leaves_good_data_alone(examples):
    ds = datasets.Dataset.from_list(examples).cast(SQUAD_FEATURES)
    lines = []
    assert fix_answer_starts(ds, log=lines.append) is ds
    assert lines == [f"answer check: checked {len(examples)} training questions, fixed 0 answer starts, "
                     "dropped 0 questions without answers and 0 whose answer text is not in the context"]
    with pytest.raises(SquadDataError, match="no training question is left"):
        bad = [dict(e, answers={"text": ["zzz not there"], "answer_start": [0]}) for e in examples[:3]]
        fix_answer_starts(datasets.Dataset.from_list(bad).cast(SQUAD_FEATURES), log=None)


# --------------------------------------------------------------------------- run_qa.py's flat layout

def _flat_records(examples):
    return [{k: e[k] for k in ("id", "title", "context", "question", "answers")} for e in examples]


@pytest.mark.parametrize("layout", ["datasets_to_json", "data_list", "one_line"])
def test_flat_layouts_load_like_the_nested_one(tmp_path, examples, layout):
    nested = load_squad_json(write_squad_json(tmp_path / "nested.json", to_squad_json(examples)))
    path = tmp_path / "flat.json"
    chosen = examples[:1] if layout == "one_line" else examples
    if layout == "data_list":
        path.write_text(json.dumps({"data": _flat_records(chosen)}))
    else:  # what run_qa.py users have: datasets' to_json writes JSON lines
        datasets.Dataset.from_list(_flat_records(chosen)).to_json(str(path))
    flat = load_squad_json(str(path))
    assert flat.features == SQUAD_FEATURES
    assert flat.to_list() == nested.to_list()[: len(chosen)]


FLAT = r"not in flat run_qa layout: "


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a", "title": "t", "context": "c", "question": "q", "answers": {"text": [], "answer_start": []}}\n'
         '{"id": "b", "title": "t", "question": "q", "answers": {"text": [], "answer_start": []}}\n',
         FLAT + r"line 2: missing key 'context'"),
        ('{"data": [{"id": "a", "context": "c", "question": "q", "answers": {"text": ["c"], "answer_start": ["0"]}}]}',
         FLAT + r"data\[0\]\.answers\[0\]: expected a str text and an int answer_start, got str and str"),
        ('{"data": [{"id": "a", "context": "c", "question": "q", "answers": {"text": ["c"], "answer_start": []}}]}',
         FLAT + r"data\[0\]\.answers: 1 texts but 0 answer_starts"),
        ('{"data": [{"id": "a", "context": "c", "question": "q", "answers": [{"text": "c", "answer_start": 0}]}]}',
         FLAT + r"data\[0\]\.answers: expected dict, got list"),
        ('{"id": "a", "context": "c", "question": "q", "answers": {"text": ["c"], "answer_start": [0]}}\n'
         '{"id": "a", "context": "c", "question": "q", "answers": {"text": ["c"], "answer_start": [0]}}\n',
         FLAT + r"line 2: question id 'a' repeats the id of line 1"),
        ('{"id": "a"}\n{"id": \n', r"is neither JSON nor JSON lines \(line 2: "),
    ],
)
def test_flat_layout_errors_name_the_place(tmp_path, content, message):
    path = tmp_path / "flat.json"
    path.write_text(content)
    with pytest.raises(SquadDataError, match=r"flat\.json: " + message):
        load_squad_json(str(path))


# --------------------------------------------------------------------------- questions without answers

def test_answerless_training_questions_are_really_dropped_and_counted(examples):
    rows = [dict(e, answers={"text": [], "answer_start": []}) if i % 3 == 0 else e for i, e in enumerate(examples)]
    lines = []
    kept = fix_answer_starts(datasets.Dataset.from_list(rows).cast(SQUAD_FEATURES), log=lines.append)
    assert sorted(kept["id"]) == sorted(e["id"] for i, e in enumerate(examples) if i % 3)
    assert all(row["answers"]["text"] for row in kept)
    assert "dropped 10 questions without answers" in lines[0] and len(lines) == 1


def test_training_file_without_any_answer_is_refused(examples):
    rows = [dict(e, answers={"text": [], "answer_start": []}) for e in examples]
    with pytest.raises(SquadDataError, match=r"no training question is left: 30 of 30 have no answer"):
        fix_answer_starts(datasets.Dataset.from_list(rows).cast(SQUAD_FEATURES), log=None)


def _v2_payload(examples):
    payload = to_squad_json(examples)
    payload["version"] = "v2.0"
    qa = payload["data"][0]["paragraphs"][0]["qas"][0]
    qa.update(is_impossible=True, plausible_answers=qa["answers"], answers=[])
    return payload


def test_squad_v2_training_file_is_named_and_its_unanswerable_questions_dropped(tmp_path, examples, caplog):
    train = write_squad_json(tmp_path / "train-v2.0.json", _v2_payload(examples[:20]))
    dev = write_squad_json(tmp_path / "dev.json", to_squad_json(examples[20:]))
    with caplog.at_level("WARNING", logger="kdqa"):
        loaded = load_squad(train_file=train, validation_file=dev)
    assert "train-v2.0.json: looks like SQuAD v2.0 (1 of 20 questions carry is_impossible" in caplog.text
    assert "1 of its 20 questions have no answer and are dropped" in caplog.text
    assert len(fix_answer_starts(loaded["train"], log=None)) == 19


@pytest.mark.parametrize("v2", [True, False])
def test_evaluation_file_with_unanswerable_questions_is_refused(tmp_path, examples, v2):
    payload = _v2_payload(examples) if v2 else to_squad_json(examples)
    if not v2:
        payload["data"][0]["paragraphs"][0]["qas"][0]["answers"] = []
    dev = write_squad_json(tmp_path / "dev.json", payload)
    pattern = r"dev\.json: " + (r"looks like SQuAD v2\.0 \(1 of 30 questions .*" if v2 else "") + \
        r"1 of 30 questions have no gold answer.* would score 0"
    with pytest.raises(SquadDataError, match=pattern):
        load_squad(validation_file=dev, splits=("validation",))


# ----------------------------------------------------------------------------- question files (predict --test_file)


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "question": "q", "context": "c"}\nnot json\n', "line 2 is not JSON"),
    ('{"id": "a", "question": "q"}\n', r"line 1 lacks \['context'\]"),
    ('{"id": "a", "question": "q", "context": "c"}\n{"id": "a", "question": "r", "context": "c"}\n', "not unique"),
])
def test_bad_question_lines_name_the_line(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(SquadDataError, match=message):
        read_questions_file(str(path))
