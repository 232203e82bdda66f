"""Running a QA model over evaluation features and scoring it: shared by the training loop and the
benchmarks so that both report the same numbers the same way.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from .metric import squad_v1_score
from .modeling import forward_qa
from .postprocess import postprocess_qa_predictions

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def _model_rows(features) -> tuple[list[dict], list[int]]:
    """Rows with only the model's inputs (cheap to fetch and collate), and their lengths."""
    if hasattr(features, "column_names") and not isinstance(features, dict):
        columns = [c for c in MODEL_COLUMNS if c in features.column_names]
        if "input_ids" not in columns:
            raise ValueError(f"the features have no input_ids column (they have {features.column_names})")
        table = features.select_columns(columns).with_format("arrow")[:]
        values = [table.column(c).to_pylist() for c in columns]
        rows = [dict(zip(columns, row)) for row in zip(*values)]
    else:
        rows = list(features)
    lengths = [len(row["input_ids"]) for row in rows]
    return rows, lengths


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

    Batches are formed from features sorted by length, so dynamic padding pads little; the result
    is put back in feature order. The model runs in eval mode under no_grad (its previous mode is
    restored after), with autocast when autocast_dtype is given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    rows, lengths = _model_rows(features)
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    all_start: list[np.ndarray | None] = [None] * len(rows)
    all_end: list[np.ndarray | None] = [None] * len(rows)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc=desc, unit="feature")
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            for begin in range(0, len(rows), batch_size):
                indices = order[begin : begin + batch_size].tolist()
                batch = collate_fn([rows[i] for i in indices])
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                start_logits, end_logits = forward_qa(model, batch)
                start_logits = start_logits.float().cpu().numpy()
                end_logits = end_logits.float().cpu().numpy()
                for j, i in enumerate(indices):
                    all_start[i] = start_logits[j, : lengths[i]].copy()
                    all_end[i] = end_logits[j, : lengths[i]].copy()
                if bar is not None:
                    bar.update(len(indices))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
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
