"""The official SQuAD v1.1 metric (exact match and token F1), re-implemented to give the same
numbers as the official `evaluate-v1.1.py`.

Normalisation is the official one, in the official order: lower case, remove punctuation, remove
the articles a/an/the, collapse whitespace. Each question scores the maximum over its gold answers;
the averages are over all questions, a question without a prediction scoring 0.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Mapping

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 of the normalised texts (0 when they share no token, as in the official script)."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(metric_fn, prediction: str, ground_truths) -> float:
    return max((metric_fn(prediction, gt) for gt in ground_truths), default=0.0)


def _gold_answers(examples_or_dataset) -> list[tuple[str, list[str]]]:
    """(id, gold answer texts) per question from flat examples, a Dataset, or the official JSON."""
    if isinstance(examples_or_dataset, Mapping) and "data" in examples_or_dataset:
        return [
            (str(qa["id"]), [a["text"] for a in qa["answers"]])
            for article in examples_or_dataset["data"]
            for paragraph in article["paragraphs"]
            for qa in paragraph["qas"]
        ]
    if isinstance(examples_or_dataset, Mapping):  # a dict of columns
        ids, answers = examples_or_dataset["id"], examples_or_dataset["answers"]
    elif hasattr(examples_or_dataset, "column_names"):  # datasets.Dataset
        table = examples_or_dataset.select_columns(["id", "answers"]).with_format("arrow")[:]
        ids = table.column("id").to_pylist()
        answers = table.column("answers").to_pylist()
    else:
        rows = list(examples_or_dataset)
        ids = [row["id"] for row in rows]
        answers = [row["answers"] for row in rows]
    out = []
    for qid, gold in zip(ids, answers):
        texts = gold["text"] if isinstance(gold, Mapping) else [a["text"] for a in gold]
        out.append((str(qid), list(texts)))
    return out


def squad_v1_score(examples_or_dataset, predictions: Mapping[str, str]) -> dict:
    """{"exact_match", "f1"} in percent over ALL questions, plus "total" and "missing" (counts).

    examples_or_dataset: flat examples (a datasets.Dataset, a list of rows or a dict of columns,
    with id and answers {text, answer_start}) or the official JSON object ({"data": [...]}).
    predictions: question id -> answer text; ids not in the data are ignored, as officially.
    """
    gold = _gold_answers(examples_or_dataset)
    exact = f1 = 0.0
    missing = 0
    for qid, ground_truths in gold:
        if qid not in predictions:
            missing += 1
            continue
        prediction = predictions[qid]
        exact += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    total = len(gold)
    return {
        "exact_match": 100.0 * exact / total if total else 0.0,
        "f1": 100.0 * f1 / total if total else 0.0,
        "total": total,
        "missing": missing,
    }


def missing_ids(examples_or_dataset, predictions: Mapping[str, str]) -> list[str]:
    """Question ids of the data that have no prediction, in data order."""
    return [qid for qid, _ in _gold_answers(examples_or_dataset) if qid not in predictions]
