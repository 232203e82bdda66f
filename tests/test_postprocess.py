"""Span decoding on hand-built features whose right answer is known."""

import datasets
import numpy as np
import pytest

from kdqa.features import Window, prepare_eval_features
from kdqa.postprocess import Decoding, postprocess_qa_predictions
from synthetic import make_examples, make_tokenizer

datasets.disable_progress_bars()

CONTEXT = "Alpha beta gamma delta epsilon."
# [CLS] q q [SEP] Alpha beta gamma delta epsilon . [SEP]
OFFSETS = [None, None, None, None, (0, 5), (6, 10), (11, 16), (17, 22), (23, 30), (30, 31), None]
ALPHA, BETA, GAMMA, DELTA, EPSILON, DOT = range(4, 10)
N = len(OFFSETS)


def _example(eid="e1", context=CONTEXT):
    return {"id": eid, "context": context}


def _logits(peaks: dict) -> np.ndarray:
    out = np.zeros(N, dtype=np.float32)
    for index, value in peaks.items():
        out[index] = value
    return out


def _decode(starts: dict, ends: dict, decoding: Decoding = Decoding()):
    features = [{"example_id": "e1", "offset_mapping": OFFSETS}]
    return postprocess_qa_predictions([_example()], features, [_logits(starts)], [_logits(ends)], decoding)["e1"]


def test_best_span():
    assert _decode({BETA: 5}, {DELTA: 5}) == "beta gamma delta"
    assert _decode({EPSILON: 3}, {DOT: 3}) == "epsilon."


def test_non_context_tokens_are_never_chosen():
    # CLS and the question score highest, yet only context tokens may start or end an answer.
    assert _decode({0: 100, 1: 90, 2: 80, BETA: 5}, {0: 100, 3: 90, 10: 95, GAMMA: 5}) == "beta gamma"


def test_end_before_start_is_skipped_and_n_best_matters():
    starts, ends = {DELTA: 5, GAMMA: 3}, {BETA: 5, EPSILON: 2}
    assert _decode(starts, ends) == "delta epsilon"  # (delta, beta) scores 10 but ends before it starts
    # With one candidate each, the only pair is (delta, beta): invalid, so no answer at all.
    assert _decode(starts, ends, Decoding(n_best_size=1)) == ""


def test_max_answer_length_in_tokens():
    starts, ends = {ALPHA: 5}, {EPSILON: 5, GAMMA: 1}
    assert _decode(starts, ends, Decoding(max_answer_length=3)) == "Alpha beta gamma"
    assert _decode(starts, ends, Decoding(max_answer_length=5)) == "Alpha beta gamma delta epsilon"


def test_padded_tail_ignored_and_2d_input():
    start = np.concatenate([_logits({BETA: 5}), np.full(13, 1000.0, np.float32)])
    end = np.concatenate([_logits({GAMMA: 5}), np.full(13, 1000.0, np.float32)])
    features = [{"example_id": "e1", "offset_mapping": OFFSETS}]
    assert postprocess_qa_predictions([_example()], features, [start], [end])["e1"] == "beta gamma"
    assert postprocess_qa_predictions([_example()], features, start[None, :], end[None, :])["e1"] == "beta gamma"


def test_best_window_wins_and_features_may_interleave():
    long_context = "one two three four five six"
    # Window A holds "one two three four", window B "three four five six".
    offs_a = [None, None, (0, 3), (4, 7), (8, 13), (14, 18), None]
    offs_b = [None, None, (8, 13), (14, 18), (19, 23), (24, 27), None]
    other_offs = [None, None, (0, 5), (6, 10), (11, 16), None]
    features = [
        {"example_id": "long", "offset_mapping": offs_a},
        {"example_id": "e1", "offset_mapping": other_offs},
        {"example_id": "long", "offset_mapping": offs_b},
    ]
    starts = [np.array([0, 0, 4, 0, 0, 0, 0.0]), np.array([0, 0, 0, 3, 0, 0.0]), np.array([0, 0, 0, 0, 5, 0, 0.0])]
    ends = [np.array([0, 0, 0, 4, 0, 0, 0.0]), np.array([0, 0, 0, 0, 3, 0.0]), np.array([0, 0, 0, 0, 0, 5, 0.0])]
    examples = [_example("e1"), _example("long", long_context), _example("lonely", "no features here")]
    predictions = postprocess_qa_predictions(examples, features, starts, ends)
    assert list(predictions) == ["e1", "long", "lonely"]
    assert predictions == {"e1": "beta gamma", "long": "five six", "lonely": ""}


def test_nbest_lists():
    long_context = "one two three four five six"
    offs_a = [None, (0, 3), (4, 7), (8, 13), (14, 18), None]
    offs_b = [None, (8, 13), (14, 18), (19, 23), (24, 27), None]
    features = [{"example_id": "long", "offset_mapping": offs_a}, {"example_id": "long", "offset_mapping": offs_b}]
    # "three four" gets the same score from both windows: it must be listed once.
    starts = [np.array([0, 0, 0, 2, 0, 0.0]), np.array([0, 2, 0, 0, 1, 0.0])]
    ends = [np.array([0, 0, 0, 0, 2, 0.0]), np.array([0, 0, 2, 0, 1, 0.0])]
    predictions, nbest = postprocess_qa_predictions(
        [_example("long", long_context)], features, starts, ends, Decoding(n_best_size=5), return_nbest=True
    )
    entries = nbest["long"]
    assert predictions["long"] == entries[0]["text"] == "three four"
    assert entries[0]["score"] == pytest.approx(4.0)
    texts = [e["text"] for e in entries]
    assert len(texts) == len(set(texts)) == 5
    scores = [e["score"] for e in entries]
    assert scores == sorted(scores, reverse=True)
    assert sum(e["probability"] for e in entries) == pytest.approx(1.0)
    assert entries[0]["start_logit"] == pytest.approx(2.0) and entries[0]["end_logit"] == pytest.approx(2.0)


def test_errors():
    features = [{"example_id": "e1", "offset_mapping": OFFSETS}]
    with pytest.raises(ValueError, match="has 2 rows but there are 1 features"):
        postprocess_qa_predictions([_example()], features, [np.zeros(N)] * 2, [np.zeros(N)] * 2)
    with pytest.raises(ValueError, match="have 5 entries but the feature has 11 tokens"):
        postprocess_qa_predictions([_example()], features, [np.zeros(5)], [np.zeros(5)])


def test_dataset_features_match_row_features():
    """The vectorised Arrow path for a Dataset and the plain-rows path decode identically."""
    tokenizer = make_tokenizer()
    examples = make_examples(n=40, seed=21, min_context_words=30, max_context_words=150)
    features = prepare_eval_features(examples, tokenizer, Window(64, 16, 16))
    rng = np.random.default_rng(0)
    starts = [rng.normal(size=len(ids)).astype(np.float32) for ids in features["input_ids"]]
    ends = [rng.normal(size=len(ids)).astype(np.float32) for ids in features["input_ids"]]
    from_dataset = postprocess_qa_predictions(datasets.Dataset.from_list(examples), features, starts, ends)
    from_rows = postprocess_qa_predictions(examples, features.to_list(), starts, ends)
    assert from_dataset == from_rows
    assert all(from_dataset[e["id"]] and from_dataset[e["id"]] in e["context"] for e in examples)
