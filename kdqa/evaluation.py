"""Running a QA model over evaluation features and scoring it: shared by the training loop and the
benchmarks so that both report the same numbers the same way.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .metric import squad_v1_score
from .modeling import logits_over_features
from .postprocess import postprocess_qa_predictions

def predict_logits(
    model,
    features,
    collate_fn,
    batch_size: int,
    device,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "evaluating",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits per feature, unpadded float32 numpy arrays in feature order.

    The model runs over length-sorted batches (modeling.logits_over_features); the result is put
    back in feature order.
    """
    all_start: list[np.ndarray | None] = [None] * len(features)
    all_end: list[np.ndarray | None] = [None] * len(features)

    def keep(indices, lengths, start_logits, end_logits):
        start_logits, end_logits = start_logits.float().cpu().numpy(), end_logits.float().cpu().numpy()
        for j, (i, n) in enumerate(zip(indices.tolist(), lengths.tolist())):
            all_start[i], all_end[i] = start_logits[j, :n].copy(), end_logits[j, :n].copy()

    logits_over_features(model, features, collate_fn, keep, batch_size=batch_size, device=torch.device(device),
                         autocast_dtype=autocast_dtype, progress=progress, desc=desc)
    return all_start, all_end


def evaluate_predictions(
    examples,
    features,
    all_start_logits,
    all_end_logits,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> tuple[dict, dict]:
    """Decode logits into answers and score them: (metrics, predictions id -> text)."""
    predictions = postprocess_qa_predictions(
        examples, features, all_start_logits, all_end_logits, n_best_size=n_best_size, max_answer_length=max_answer_length
    )
    return squad_v1_score(examples, predictions), dict(predictions)


def evaluate_model(
    model,
    examples,
    features,
    collate_fn,
    *,
    batch_size: int,
    device,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[dict, dict]:
    """Run the model over the evaluation features, decode, score.

    metrics: exact_match, f1 (percent), total, missing, runtime_s (forward + decoding + scoring),
    samples_per_second (features per second, as the HF Trainer counts eval samples) and
    examples_per_second (questions per second).
    """
    start = time.perf_counter()
    device = torch.device(device)
    all_start, all_end = predict_logits(
        model, features, collate_fn, batch_size, device, autocast_dtype=autocast_dtype, progress=progress
    )
    metrics, predictions = evaluate_predictions(
        examples, features, all_start, all_end, n_best_size=n_best_size, max_answer_length=max_answer_length
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    runtime = time.perf_counter() - start
    metrics["runtime_s"] = runtime
    metrics["samples_per_second"] = len(all_start) / runtime if runtime > 0 else float("inf")
    metrics["examples_per_second"] = metrics["total"] / runtime if runtime > 0 else float("inf")
    return metrics, predictions
