"""Span decoding: start/end logits of all windows of an example -> its answer text, score and
character offsets.

As run_qa.py's `postprocess_qa_predictions`, with two differences. The n-best start and end
indices are taken among context tokens only; run_qa takes them among all tokens and then throws
away the non-context ones, which can leave fewer than n-best real candidates. So the two pools of
candidates differ, not only in size: ours can hold a context span that run_qa's never considers,
and then the answers differ although both lie inside the context (issue 24 found a handful of
such SQuAD dev questions, ours the higher-scoring span in each). And the work per window is a few
numpy operations instead of a Python double loop.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _column(data, name: str) -> list:
    """A column of a datasets.Dataset, a dict of columns, or a list of row dicts, as a list."""
    if isinstance(data, dict):
        return list(data[name])
    if hasattr(data, "column_names"):
        return data.with_format("arrow")[:].column(name).to_pylist()
    return [row[name] for row in data]


def _char_spans(features) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per feature: (char_start, char_end) int64 arrays over its tokens, -1 where the offset is None."""
    if hasattr(features, "column_names") and not isinstance(features, dict):
        spans = _char_spans_arrow(features)
        if spans is not None:
            return spans
    out = []
    for offsets in _column(features, "offset_mapping"):
        starts = np.fromiter((o[0] if o is not None else -1 for o in offsets), dtype=np.int64, count=len(offsets))
        ends = np.fromiter((o[1] if o is not None else -1 for o in offsets), dtype=np.int64, count=len(offsets))
        out.append((starts, ends))
    return out


def _char_spans_arrow(features):
    """Vectorised offsets from the Arrow column (10k features in well under a second)."""
    import pyarrow as pa

    column = features.with_format("arrow")[:].column("offset_mapping").combine_chunks()
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        return None
    if column.null_count:
        return None
    per_feature = np.diff(column.offsets.to_numpy())
    tokens = column.flatten()  # one [start, end] list or null per token
    valid = tokens.is_valid().to_numpy(zero_copy_only=False)
    pair_sizes = np.diff(tokens.offsets.to_numpy())[valid]
    if pair_sizes.size and (pair_sizes != 2).any():
        return None
    pairs = tokens.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, 2)
    starts = np.full(len(tokens), -1, dtype=np.int64)
    ends = np.full(len(tokens), -1, dtype=np.int64)
    starts[valid] = pairs[:, 0]
    ends[valid] = pairs[:, 1]
    bounds = np.cumsum(per_feature)[:-1]
    return list(zip(np.split(starts, bounds), np.split(ends, bounds)))


def _logit_rows(logits, n_features: int, name: str) -> Sequence:
    if hasattr(logits, "detach"):  # a torch tensor
        logits = logits.detach().float().cpu().numpy()
    if isinstance(logits, np.ndarray) and logits.ndim != 2:
        raise ValueError(f"{name} must be 2-D [features, length] or a list of 1-D arrays, got shape {logits.shape}")
    if len(logits) != n_features:
        raise ValueError(f"{name} has {len(logits)} rows but there are {n_features} features; they must match one to one")
    return logits


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite scores (unordered)."""
    finite = np.flatnonzero(np.isfinite(scores))
    if finite.size <= k:
        return finite
    if k == 1:  # the first of equal maxima, as np.argmax: ties decode the same on every run
        return finite[np.argmax(scores[finite])][None]
    part = np.argpartition(-scores[finite], k - 1)[:k]
    return finite[part]


@dataclass(frozen=True)
class Decoding:
    """How logits become an answer span (run_qa.py's two flags), one value from parsing to the predictor."""

    n_best_size: int = 20
    max_answer_length: int = 30

    @classmethod
    def from_args(cls, args) -> "Decoding":
        return cls(args.n_best_size, args.max_answer_length)


@dataclass(frozen=True)
class Answer:
    """One question's answer: its text, score (start logit + end logit of the span) and character
    offsets in the context (context[start:end] == text). No valid span in any window: text "",
    score/start/end None."""

    id: str
    text: str
    score: float | None
    start: int | None
    end: int | None


def answer_texts(answers: dict[str, Answer]) -> dict[str, str]:
    """{id: text}: the official predictions format."""
    return {qid: answer.text for qid, answer in answers.items()}


def decode_answers(
    examples,
    features,
    all_start_logits,
    all_end_logits,
    decoding: Decoding = Decoding(),
    with_nbest: bool = False,
):
    """The best answer per example id, from the logits of all its features: (answers, nbest or None).

    examples: Dataset / rows / dict of columns with id and context (gold answers are not needed).
    features: Dataset / rows with example_id and offset_mapping (None outside the context), in
    the order of the logits. all_*_logits: one 1-D array per feature (a padded tail past the
    feature's length is ignored) or a 2-D array.

    Per example, over all its windows: the n_best_size best start and end tokens of the context,
    spans with end >= start and at most max_answer_length tokens, best start+end score. answers:
    id -> Answer. With with_nbest=True also id -> the n_best_size best distinct spans, best first, as
    {text, score, start_logit, end_logit, offsets, probability} (probability: softmax of the scores
    over that list), the content of run_qa.py's nbest file.
    """
    n_best_size, max_answer_length = decoding.n_best_size, decoding.max_answer_length
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError("n_best_size and max_answer_length must be at least 1")
    example_ids = _column(examples, "id")
    contexts = _column(examples, "context")
    feature_example_ids = _column(features, "example_id")
    spans = _char_spans(features)
    n_features = len(feature_example_ids)
    start_rows = _logit_rows(all_start_logits, n_features, "all_start_logits")
    end_rows = _logit_rows(all_end_logits, n_features, "all_end_logits")

    features_of = collections.defaultdict(list)
    for index, example_id in enumerate(feature_example_ids):
        features_of[example_id].append(index)

    best_answers = collections.OrderedDict()
    nbest_all = collections.OrderedDict() if with_nbest else None
    for example_id, context in zip(example_ids, contexts):
        candidates = []  # (score, start_char, end_char, start_logit, end_logit)
        for index in features_of.get(example_id, ()):
            candidates.extend(
                _window_candidates(spans[index], start_rows[index], end_rows[index], index, n_best_size,
                                   max_answer_length, n_best_size if with_nbest else 1)
            )
        if not candidates:
            best_answers[example_id] = Answer(example_id, "", None, None, None)
            if with_nbest:
                nbest_all[example_id] = []
            continue
        candidates.sort(key=lambda c: -c[0])
        score, s_char, e_char = candidates[0][:3]
        best_answers[example_id] = Answer(example_id, context[s_char:e_char], score, s_char, e_char)
        if with_nbest:
            nbest_all[example_id] = _nbest_list(candidates, context, n_best_size)
    return best_answers, nbest_all


def _window_candidates(char_spans, start_row, end_row, index: int, n_best_size: int, max_answer_length: int,
                       keep: int) -> list[tuple]:
    """The `keep` best valid spans of one window as (score, start_char, end_char, start_logit, end_logit).

    Keeping only the n-best of each window loses nothing: a span outside its window's n-best has
    n_best_size better, distinct spans before it, so it cannot reach the example's n-best either.
    """
    char_starts, char_ends = char_spans
    n = len(char_starts)
    start_logits = np.asarray(start_row, dtype=np.float32)
    end_logits = np.asarray(end_row, dtype=np.float32)
    if start_logits.shape[0] < n or end_logits.shape[0] < n:
        raise ValueError(
            f"the logits of feature {index} have {min(start_logits.shape[0], end_logits.shape[0])} entries "
            f"but the feature has {n} tokens; pass one row per feature, in feature order"
        )
    context_mask = char_starts >= 0
    start_logits = np.where(context_mask, start_logits[:n], -np.inf)
    end_logits = np.where(context_mask, end_logits[:n], -np.inf)
    starts = _top_k(start_logits, n_best_size)
    ends = _top_k(end_logits, n_best_size)
    if starts.size == 0 or ends.size == 0:
        return []
    lengths = ends[None, :] - starts[:, None]
    scores = start_logits[starts][:, None] + end_logits[ends][None, :]
    scores = np.where((lengths >= 0) & (lengths < max_answer_length), scores, -np.inf).ravel()
    out = []
    for flat in _top_k(scores, keep).tolist():
        r, c = divmod(flat, ends.size)
        s, e = starts[r], ends[c]
        out.append((float(scores[flat]), int(char_starts[s]), int(char_ends[e]), float(start_logits[s]),
                    float(end_logits[e])))
    return out


def _nbest_list(candidates: list[tuple], context: str, n_best_size: int) -> list[dict]:
    """The n best distinct spans (candidates sorted best first) with their softmax probability."""
    nbest, seen = [], set()
    for score, s_char, e_char, s_logit, e_logit in candidates:
        if (s_char, e_char) in seen:  # the same span seen from two overlapping windows
            continue
        seen.add((s_char, e_char))
        nbest.append({"text": context[s_char:e_char], "score": score, "start_logit": s_logit, "end_logit": e_logit,
                      "offsets": [s_char, e_char]})
        if len(nbest) == n_best_size:
            break
    scores = np.array([p["score"] for p in nbest], dtype=np.float64)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    for p, prob in zip(nbest, probs.tolist()):
        p["probability"] = prob
    return nbest


def postprocess_qa_predictions(
    examples,
    features,
    all_start_logits,
    all_end_logits,
    decoding: Decoding = Decoding(),
    return_nbest: bool = False,
):
    """Answer text per example id (an example without any valid span gets ""), as run_qa.py's
    function of that name; with return_nbest=True also the n-best lists (see decode_answers)."""
    best, nbest = decode_answers(examples, features, all_start_logits, all_end_logits, decoding,
                                 with_nbest=return_nbest)
    predictions = collections.OrderedDict((example_id, answer.text) for example_id, answer in best.items())
    return (predictions, nbest) if return_nbest else predictions
