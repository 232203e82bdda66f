"""kdqa.speedtest.answer_in_turns: who answers which question when (the timing itself is a benchmark's job)."""

import pytest

import kdqa.speedtest as speedtest


@pytest.fixture
def calls(monkeypatch):
    order = []

    def record(predictor, row, stats):
        order.append((predictor, row["id"]))
        stats["answers"][row["id"]] = predictor

    monkeypatch.setattr(speedtest, "_answer_one", record)
    return order


def test_turns_of_one_alternate_every_question_and_swap_who_goes_first(calls):
    rows = [{"id": i} for i in range(3)]
    speedtest.answer_in_turns({"a": "a", "b": "b"}, rows, warmup=0)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]


def test_turns_of_several_questions_keep_a_model_on_its_own_block(calls):
    rows = [{"id": i} for i in range(5)]
    stats = speedtest.answer_in_turns({"a": "a", "b": "b"}, rows, warmup=1, turn_size=2)
    timed = calls[2:]  # after one warm-up question each
    assert calls[:2] == [("a", 0), ("b", 0)]
    assert timed == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2), ("b", 3), ("a", 2), ("a", 3),
                     ("a", 4), ("b", 4)]
    assert set(stats["a"]["answers"]) == set(stats["b"]["answers"]) == set(range(5)), "every model answers every row"


def test_bad_turn_size_and_no_questions_are_refused(calls):
    with pytest.raises(ValueError, match="turn_size must be at least 1"):
        speedtest.answer_in_turns({"a": "a"}, [{"id": 0}], turn_size=0)
    with pytest.raises(ValueError, match="at least one question"):
        speedtest.answer_in_turns({"a": "a"}, [])
