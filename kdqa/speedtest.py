"""The seed's speed test: CPU milliseconds per question, answered one at a time, models taking turns.

A deployed QA model answers one question per request, so that is what is timed: per question, its
windows are made (prepare_eval_features), run (predict_logits) and decoded (postprocess). The models
take turns question by question, swapping who goes first, so a change of machine load affects them
alike. The first `warmup` questions are answered once per model, untimed.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from kdqa.evaluation import predict_logits
from kdqa.features import QACollator, prepare_eval_features
from kdqa.postprocess import postprocess_qa_predictions

COLUMNS = ("id", "title", "context", "question", "answers")


def _answer_one(model, tokenizer, collate, row: dict, settings: dict, device: str) -> str:
    examples = {k: [row[k]] for k in COLUMNS}
    features = prepare_eval_features(examples, tokenizer, max_seq_length=settings["max_seq_length"],
                                     doc_stride=settings["doc_stride"],
                                     max_query_length=settings["max_query_length"])
    starts, ends = predict_logits(model, features, collate, 64, device)  # all windows at once
    predictions = postprocess_qa_predictions(examples, features, starts, ends, n_best_size=settings["n_best_size"],
                                             max_answer_length=settings["max_answer_length"])
    return predictions[row["id"]]


def speed_test(models: dict, examples, num_questions: int, *, max_seq_length: int = 384, doc_stride: int = 128,
               max_query_length: int = 64, n_best_size: int = 20, max_answer_length: int = 30, warmup: int = 2,
               device: str = "cpu", progress: bool = True) -> dict:
    """{name: {"ms_per_question", "questions", "wall_s"}} for models = {name: (model, tokenizer)}.

    `examples` are flat SQuAD rows (a datasets.Dataset or a list of dicts); the first
    `num_questions` of them are answered.
    """
    rows = [examples[i] for i in range(min(num_questions, len(examples)))]
    if not rows:
        raise ValueError("the speed test needs at least one question")
    settings = dict(max_seq_length=max_seq_length, doc_stride=doc_stride, max_query_length=max_query_length,
                    n_best_size=n_best_size, max_answer_length=max_answer_length)
    runners = {}
    for name, (model, tokenizer) in models.items():
        model.to(device).eval()
        runners[name] = (model, tokenizer, QACollator(tokenizer.pad_token_id))
    names = list(runners)
    wall = dict.fromkeys(names, 0.0)
    with torch.inference_mode():
        for name in names:
            for row in rows[:warmup]:
                _answer_one(*runners[name], row, settings, device)
        for q, row in enumerate(tqdm(rows, desc="speed test", disable=not progress, dynamic_ncols=True)):
            for name in (names if q % 2 == 0 else reversed(names)):
                started = time.perf_counter()
                _answer_one(*runners[name], row, settings, device)
                wall[name] += time.perf_counter() - started
    return {name: {"ms_per_question": 1000.0 * wall[name] / len(rows), "questions": len(rows),
                   "wall_s": wall[name]} for name in names}
