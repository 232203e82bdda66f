"""The seed's speed test: CPU milliseconds per question, answered one at a time, models taking turns.

A deployed QA model answers one question per request, so that is what is timed: per question, the
predictor (kdqa.inference.QAPredictor) makes its windows, runs the model and decodes the answer. The models
take turns, `turn_size` questions each, swapping who goes first, so a change of machine load affects
them alike. Turns of one question are fair between PyTorch models (one thread pool), but not across
runtimes: ONNX Runtime's and PyTorch's thread pools each keep spinning after a call, so on a small
CPU the model that follows another runtime's runs beside its spinning threads (measured on the 2-core
VM: the teacher took 115 ms per question alternating with an ONNX Runtime model against 48 ms alone).
A deployed model runs alone; turns of 20 questions come close to that and still share the load's
changes. The first `warmup` questions are answered once per model, untimed. The recipe's table and
benchmarks/bench_inference.py both measure with `answer_in_turns`.
"""

from __future__ import annotations

import time

import torch

from kdqa.dev_sample import DEFAULT_EVAL_SAMPLE, sample_indices
from kdqa.features import Window
from kdqa.inference import QAPredictor, TorchRunner
from kdqa.postprocess import Decoding, answer_texts


CROSS_RUNTIME_TURN = 20  # turns when ONNX Runtime and PyTorch models take turns (see the docstring)


def _fresh_stats() -> dict:
    return {"wall_s": 0.0, "features_s": 0.0, "predict_s": 0.0, "decode_s": 0.0, "features": 0, "answers": {}}


def _answer_one(predictor: QAPredictor, row: dict, stats: dict) -> None:
    """One question through the predictor's three stages (QAPredictor.predict, a stage at a time),
    each timed into `stats`."""
    question = {"id": [row["id"]], "question": [row["question"]], "context": [row["context"]]}
    t0 = time.perf_counter()
    features = predictor.features(question)
    t1 = time.perf_counter()
    starts, ends = predictor.logits(features)
    t2 = time.perf_counter()
    answers, _ = predictor.decode(question, features, starts, ends)
    t3 = time.perf_counter()
    stats["features_s"] += t1 - t0
    stats["predict_s"] += t2 - t1
    stats["decode_s"] += t3 - t2
    stats["wall_s"] += t3 - t0
    stats["features"] += len(starts)
    stats["answers"].update(answer_texts(answers))


def answer_in_turns(predictors: dict[str, QAPredictor], rows: list[dict], *, warmup: int = 2,
                    progress_every: int = 0, turn_size: int = 1) -> dict[str, dict]:
    """Each row answered in its own call by every predictor, taking turns of `turn_size` rows; per
    predictor: wall_s (the sum of its calls), the seconds of each stage (features_s, predict_s,
    decode_s), features, and answers {id: text} for scoring."""
    if not rows:
        raise ValueError("the speed test needs at least one question")
    if turn_size < 1:
        raise ValueError(f"turn_size must be at least 1, got {turn_size}")
    names = list(predictors)
    with torch.inference_mode():
        for name in names:
            scratch = _fresh_stats()
            for row in rows[:warmup]:
                _answer_one(predictors[name], row, scratch)
        stats = {name: _fresh_stats() for name in names}
        for turn, first in enumerate(range(0, len(rows), turn_size)):
            block = rows[first:first + turn_size]
            for name in (names if turn % 2 == 0 else reversed(names)):
                for row in block:
                    _answer_one(predictors[name], row, stats[name])
            answered = first + len(block)
            if progress_every and answered // progress_every > first // progress_every:
                print(f"    speed test: {answered}/{len(rows)} questions", flush=True)
    return stats


def speed_test(models: dict, examples, num_questions: int, *, sample: str = DEFAULT_EVAL_SAMPLE, window: Window = Window(),
               decoding: Decoding = Decoding(), warmup: int = 2, device: str = "cpu", progress: bool = True,
               ready: dict[str, QAPredictor] | None = None) -> dict:
    """{name: {"ms_per_question", "questions", "wall_s"}} for models = {name: (model, tokenizer)}.

    `examples` are flat SQuAD rows (a datasets.Dataset or a list of dicts); `num_questions` of them,
    chosen by `sample` (kdqa.dev_sample: spread over the file, so their context lengths are the
    file's, or the first ones), are answered one at a time. `ready`: predictors timed beside
    them (the recipe's ONNX Runtime int8 student); with them, turns of 20 questions (another runtime).
    """
    rows = [examples[i] for i in sample_indices(len(examples), num_questions, sample)]
    predictors = {
        name: QAPredictor(TorchRunner(model.to(device).eval(), device), tokenizer, window, decoding, description=name)
        for name, (model, tokenizer) in models.items()
    } | (ready or {})
    stats = answer_in_turns(predictors, rows, warmup=warmup, progress_every=100 if progress else 0,
                            turn_size=CROSS_RUNTIME_TURN if ready else 1)
    return {name: {"ms_per_question": 1000.0 * s["wall_s"] / len(rows), "questions": len(rows),
                   "wall_s": s["wall_s"]} for name, s in stats.items()}
