"""The official SQuAD v1.1 metric against cases worked out by hand."""

import datasets
import pytest

from kdqa.metric import exact_match_score, f1_score, missing_ids, normalize_answer, squad_v1_score
from synthetic import to_squad_json


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("Theater and anthem", "theater and anthem"),  # articles only as whole words
        ("U.S. Army's 3rd", "us armys 3rd"),
        # Official order: punctuation goes before articles, so "A.n" becomes the article "an".
        ("A.n apple", "apple"),
        ("  \tspaced\n\nout  ", "spaced out"),
        ("The", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match_score("The Eiffel Tower.", "eiffel tower")
    assert exact_match_score("a", "the")  # both normalise to ""
    assert not exact_match_score("Eiffel", "Eiffel Tower")
    assert not exact_match_score("", "tower")


def test_f1_worked_by_hand():
    # "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 3/3, F1 = 2*(3/4)/(7/4) = 6/7.
    assert f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # Counts are clipped: "red red red" vs "red green": 1 common, P = 1/3, R = 1/2, F1 = 2/5.
    assert f1_score("red red red", "red green") == pytest.approx(0.4)
    # Order does not matter, punctuation and case do not count.
    assert f1_score("Green, RED!", "red green") == pytest.approx(1.0)
    assert f1_score("blue", "red green") == 0.0
    assert f1_score("", "red") == 0.0
    # Official v1.1: two answers that normalise to nothing share no token, F1 0 (EM is 1).
    assert f1_score("the", "a") == 0.0


def _examples():
    return [
        {"id": "q1", "title": "t", "context": "c", "question": "?", "answers": {"text": ["Denver Broncos", "Broncos"], "answer_start": [0, 7]}},
        {"id": "q2", "title": "t", "context": "c", "question": "?", "answers": {"text": ["a cat on a mat", "dog"], "answer_start": [0, 0]}},
        {"id": "q3", "title": "t", "context": "c", "question": "?", "answers": {"text": ["red"], "answer_start": [0]}},
        {"id": "q4", "title": "t", "context": "c", "question": "?", "answers": {"text": ["blue"], "answer_start": [0]}},
    ]


PREDICTIONS = {
    "q1": "the broncos",        # EM 1 (second gold), F1 1
    "q2": "the cat sat on the mat",  # EM 0, F1 max(6/7, 0)
    "q3": "",                   # empty prediction: 0, 0
    # q4 missing: 0, 0
    "extra": "ignored",         # ids not in the data are ignored
}


def test_squad_v1_score_several_golds_missing_and_empty():
    scores = squad_v1_score(_examples(), PREDICTIONS)
    assert scores["total"] == 4 and scores["missing"] == 1
    assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 6 / 7) / 4)
    assert missing_ids(_examples(), PREDICTIONS) == ["q4"]


def test_squad_v1_score_accepts_dataset_rows_and_official_json():
    examples = _examples()
    expected = squad_v1_score(examples, PREDICTIONS)
    assert squad_v1_score(datasets.Dataset.from_list(examples), PREDICTIONS) == expected
    assert squad_v1_score(to_squad_json(examples), PREDICTIONS) == expected
    columns = {k: [e[k] for e in examples] for k in examples[0]}
    assert squad_v1_score(columns, PREDICTIONS) == expected


def test_perfect_and_empty_predictions():
    examples = _examples()
    perfect = {e["id"]: e["answers"]["text"][-1] for e in examples}
    assert squad_v1_score(examples, perfect) == {"exact_match": 100.0, "f1": 100.0, "total": 4, "missing": 0}
    assert squad_v1_score(examples, {}) == {"exact_match": 0.0, "f1": 0.0, "total": 4, "missing": 4}
