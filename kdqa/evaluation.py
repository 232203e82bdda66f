"""Old names of the inference path, kept only until their last callers move (then delete this file).

Everything that was here lives in `kdqa.inference` under names that say what it does:

    evaluate_model(...)        -> inference.predict_and_score(...)  (returns metrics, predictions, nbest)
    evaluate_predictions(...)  -> inference.decode_answers(...) + metric.squad_v1_score(...)
    predict_logits(...)        -> inference.predict_logits(...)     (unchanged)
"""

from __future__ import annotations

from .inference import answer_texts, decode_answers, predict_and_score, predict_logits
from .metric import squad_v1_score

__all__ = ["evaluate_model", "evaluate_predictions", "predict_logits"]


def evaluate_model(model, examples, features, collate_fn, **kwargs) -> tuple[dict, dict]:
    """Old name of predict_and_score, without the n-best lists: (metrics, predictions)."""
    metrics, predictions, _ = predict_and_score(model, examples, features, collate_fn, **kwargs)
    return metrics, predictions


def evaluate_predictions(examples, features, all_start_logits, all_end_logits, n_best_size: int = 20,
                         max_answer_length: int = 30) -> tuple[dict, dict]:
    """Old name: decode logits and score them, (metrics, predictions)."""
    answers, _ = decode_answers(examples, features, all_start_logits, all_end_logits, n_best_size, max_answer_length)
    predictions = answer_texts(answers)
    return squad_v1_score(examples, predictions), predictions
