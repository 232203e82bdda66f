"""Tokenisation into features and the collator, on synthetic examples with a tiny offline tokenizer
(small max_seq_length / doc_stride force many windows and answers at window edges)."""

import copy

import datasets
import pytest
import torch

from kdqa.features import QACollator, Window, prepare_eval_features, prepare_train_features
from synthetic import make_examples, make_tokenizer

datasets.disable_progress_bars()

MAX_LEN, STRIDE, MAX_Q = 64, 16, 16


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def long_examples():
    # Contexts of 40..260 words: up to ~15 windows of 64 tokens each.
    return make_examples(n=120, seed=1, min_context_words=40, max_context_words=260, max_answer_words=6)


@pytest.fixture(scope="module")
def both_features(tokenizer, long_examples):
    window = Window(MAX_LEN, STRIDE, MAX_Q)
    return (
        prepare_train_features(long_examples, tokenizer, window),
        prepare_eval_features(long_examples, tokenizer, window),
    )


def test_columns_are_minimal(both_features):
    train, evaluation = both_features
    assert train.column_names == ["input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"]
    assert evaluation.column_names == ["input_ids", "attention_mask", "token_type_ids", "example_id", "offset_mapping"]


def test_no_token_type_ids_when_tokenizer_has_none(long_examples):
    tok = make_tokenizer(with_token_type_ids=False)
    train = prepare_train_features(long_examples[:5], tok, Window(MAX_LEN, STRIDE, MAX_Q))
    assert "token_type_ids" not in train.column_names


def test_every_answer_inside_a_window_maps_back_to_its_text(tokenizer, long_examples, both_features):
    """The labels of each window, read through the window's offsets, give exactly the answer text;
    a window labels CLS exactly when it does not hold the whole answer."""
    train, evaluation = both_features
    assert len(train) == len(evaluation)
    assert train["input_ids"] == evaluation["input_ids"]  # same windows in the same order
    by_id = {ex["id"]: ex for ex in long_examples}
    windows_per_example = {}
    found = set()
    edge_hits = 0
    for feat, ev in zip(train, evaluation):
        ex = by_id[ev["example_id"]]
        windows_per_example[ex["id"]] = windows_per_example.get(ex["id"], 0) + 1
        offsets = ev["offset_mapping"]
        assert len(feat["input_ids"]) <= MAX_LEN
        context_idx = [i for i, o in enumerate(offsets) if o is not None]
        first, last = context_idx[0], context_idx[-1]
        assert context_idx == list(range(first, last + 1))
        text = ex["answers"]["text"][0]
        a_start = ex["answers"]["answer_start"][0]
        a_end = a_start + len(text)
        inside = offsets[first][0] <= a_start and a_end <= offsets[last][1]
        s, e = feat["start_positions"], feat["end_positions"]
        if not inside:
            assert s == e == 0 and feat["input_ids"][0] == tokenizer.cls_token_id
            continue
        assert first <= s <= e <= last
        assert ex["context"][offsets[s][0] : offsets[e][1]] == text
        found.add(ex["id"])
        edge_hits += s == first or e == last
    assert max(windows_per_example.values()) >= 6, "contexts must be longer than several windows"
    # An answer no longer than the windows' overlap is always wholly inside some window.
    short = {i for i, ex in by_id.items() if len(tokenizer(ex["answers"]["text"][0], add_special_tokens=False)["input_ids"]) <= STRIDE}
    assert len(short) > 0.7 * len(by_id)
    assert short <= found, "every answer that fits the overlap must be inside a window"
    assert edge_hits >= 3, "the synthetic data must put answers at a window's edge"


def test_windows_overlap_by_doc_stride(both_features):
    _, evaluation = both_features
    ids, offsets = evaluation["example_id"], evaluation["offset_mapping"]
    checked = 0
    for k in range(len(ids) - 1):
        if ids[k] != ids[k + 1]:
            continue
        this = [o for o in offsets[k] if o is not None]
        nxt = [o for o in offsets[k + 1] if o is not None]
        assert this[-STRIDE:] == nxt[:STRIDE]
        checked += 1
    assert checked > 100


def test_eval_offsets_only_on_context_and_example_ids(tokenizer, long_examples, both_features):
    _, evaluation = both_features
    for ev in evaluation.select(range(20)):
        ids = ev["input_ids"]
        sep = ids.index(tokenizer.sep_token_id)
        assert all(o is None for o in ev["offset_mapping"][: sep + 1])  # CLS, question, SEP
        assert ev["offset_mapping"][-1] is None  # final SEP
        assert all(o is not None for o in ev["offset_mapping"][sep + 1 : -1])
    assert set(evaluation["example_id"]) == {ex["id"] for ex in long_examples}


def test_max_query_length_truncates_question(tokenizer):
    ex = make_examples(n=1, seed=3, question_words=(60, 60))[0]
    full = tokenizer(ex["question"], add_special_tokens=False)["input_ids"]
    assert len(full) > 30
    feats = prepare_eval_features([ex], tokenizer, Window(128, 32, 10))
    ids = feats[0]["input_ids"]
    sep = ids.index(tokenizer.sep_token_id)
    assert ids[1:sep] == full[:10]
    untruncated = prepare_eval_features([ex], tokenizer, Window(256, 32, 200))
    u_ids = untruncated[0]["input_ids"]
    assert u_ids[1 : u_ids.index(tokenizer.sep_token_id)] == full


def test_leading_whitespace_of_question_is_stripped(tokenizer):
    ex = make_examples(n=1, seed=4)[0]
    spaced = copy.deepcopy(ex)
    spaced["question"] = "   \t " + ex["question"]
    a = prepare_train_features([ex], tokenizer, Window(MAX_LEN, STRIDE, MAX_Q))
    b = prepare_train_features([spaced], tokenizer, Window(MAX_LEN, STRIDE, MAX_Q))
    assert a[:] == b[:]


def test_bad_tokenizers_and_lengths_are_refused(tokenizer):
    examples = make_examples(n=3, seed=5)

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ValueError, match="not a fast tokenizer"):
        prepare_train_features(examples, SlowTokenizer())
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    with pytest.raises(ValueError, match="pads on the 'left'.*only right padding"):
        prepare_eval_features(examples, left)
    with pytest.raises(ValueError, match="max_seq_length 20 is too small"):
        prepare_train_features(examples, tokenizer, Window(max_seq_length=20, doc_stride=16))
    long_q = make_examples(n=2, seed=6, question_words=(40, 40))
    with pytest.raises(ValueError, match=r"too small for question 'syn-0000\d'.*Raise max_seq_length"):
        prepare_train_features(long_q, tokenizer, Window(64, 16, 64))


def test_wrong_answer_start_without_fix_gives_cls(tokenizer):
    """Sanity: labels follow answer_start (which is why fix_answer_starts runs first)."""
    ex = make_examples(n=1, seed=7, min_context_words=10, max_context_words=12)[0]
    ex["answers"] = {"text": ex["answers"]["text"], "answer_start": [len(ex["context"]) + 5]}
    feats = prepare_train_features([ex], tokenizer, Window(MAX_LEN, STRIDE, MAX_Q))
    assert feats["start_positions"] == [0] and feats["end_positions"] == [0]


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------


def _feature(n, offset=1, **extra):
    f = {"input_ids": list(range(offset, offset + n)), "attention_mask": [1] * n, "token_type_ids": [0] * (n // 2) + [1] * (n - n // 2)}
    f.update(extra)
    return f


def test_collator_pads_to_batch_max_rounded_to_8():
    collate = QACollator(pad_token_id=0)
    batch = collate([_feature(5, start_positions=1, end_positions=2), _feature(17, start_positions=3, end_positions=4),
                     _feature(13, start_positions=0, end_positions=0)])
    assert batch["input_ids"].shape == (3, 24)
    assert batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5] + [0] * 19
    assert batch["attention_mask"].sum(1).tolist() == [5, 17, 13]
    assert batch["token_type_ids"][1].tolist() == [0] * 8 + [1] * 9 + [0] * 7
    assert batch["start_positions"].tolist() == [1, 3, 0] and batch["end_positions"].tolist() == [2, 4, 0]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}


def test_collator_exact_multiple_other_pad_id_and_ignored_keys():
    collate = QACollator(pad_token_id=7, pad_to_multiple_of=8)
    feats = [_feature(16, example_id="x", offset_mapping=[None] * 16, feature_index=3), _feature(9, example_id="y", offset_mapping=[None] * 9, feature_index=4)]
    batch = collate(feats)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][1, 9:].tolist() == [7] * 7
    assert batch["attention_mask"][1, 9:].tolist() == [0] * 7
    assert batch["feature_index"].tolist() == [3, 4] and batch["feature_index"].dtype == torch.int64
    assert "example_id" not in batch and "offset_mapping" not in batch
    assert QACollator(pad_token_id=0, pad_to_multiple_of=1)(feats)["input_ids"].shape == (2, 16)
    assert QACollator(pad_token_id=0, pad_to_multiple_of=1)([_feature(9)])["input_ids"].shape == (1, 9)


def test_collator_accepts_tensors_and_arrays_like_lists(both_features):
    train, _ = both_features
    rows = [train[i] for i in range(8)]
    collate = QACollator(pad_token_id=0)
    expected = collate(rows)
    as_tensors = [train.with_format("torch")[i] for i in range(8)]
    as_numpy = [train.with_format("numpy")[i] for i in range(8)]
    for other in (collate(as_tensors), collate(as_numpy)):
        assert set(other) == set(expected)
        for key in expected:
            assert torch.equal(other[key], expected[key]), key
    assert expected["input_ids"].shape[1] % 8 == 0
    assert expected["input_ids"].shape[1] < max(len(r["input_ids"]) for r in rows) + 8


def test_collator_errors():
    collate = QACollator(pad_token_id=0)
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    bad = _feature(5)
    bad["attention_mask"] = [1] * 4
    with pytest.raises(ValueError, match="attention_mask and input_ids differ in length"):
        collate([bad])
    with pytest.raises(KeyError, match="some features have start_positions"):
        collate([_feature(3, start_positions=1), _feature(4)])
    with pytest.raises(ValueError, match="no pad token"):
        QACollator(pad_token_id=None)


def test_minilm_tokenizer_windows_map_back(minilm_dir, long_examples):
    """The same round trip with the real bert-base-uncased vocabulary (when installed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    train = prepare_train_features(long_examples[:40], tok, Window(MAX_LEN, STRIDE, MAX_Q))
    evaluation = prepare_eval_features(long_examples[:40], tok, Window(MAX_LEN, STRIDE, MAX_Q))
    by_id = {ex["id"]: ex for ex in long_examples}
    hits = 0
    for feat, ev in zip(train, evaluation):
        if feat["start_positions"] == 0:
            continue
        ex = by_id[ev["example_id"]]
        off = ev["offset_mapping"]
        assert ex["context"][off[feat["start_positions"]][0] : off[feat["end_positions"]][1]] == ex["answers"]["text"][0]
        hits += 1
    assert hits >= 40


def test_small_inputs_skip_dataset_map_with_identical_features(tokenizer, long_examples, both_features, monkeypatch):
    """Inputs of one batch are converted without Dataset.map (fast one-question inference); the
    result must equal the Dataset.map path's."""
    import kdqa.features as features_module

    window = Window(MAX_LEN, STRIDE, MAX_Q)
    monkeypatch.setattr(features_module, "DIRECT_LIMIT", 0)  # force Dataset.map
    via_map = (prepare_train_features(long_examples, tokenizer, window), prepare_eval_features(long_examples, tokenizer, window))
    for direct, mapped in zip(both_features, via_map):
        assert direct.features == mapped.features
        assert direct[:] == mapped[:]
