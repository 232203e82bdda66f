"""Tokenisation of SQuAD examples into model features, as Hugging Face's `run_qa.py` does it, and
the dynamic-padding collator.

A feature is one window of an example: `[CLS] question [SEP] context-window [SEP]`. Contexts
longer than `max_seq_length` give several windows overlapping by `doc_stride` tokens; questions
are cut to `max_query_length` tokens first (as the original BERT SQuAD code did), so a
long question cannot eat the context's room. Features stay unpadded: the collator pads each
batch to its own longest feature, which on SQuAD is far less than 384 for most batches.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from datasets import Dataset

logger = logging.getLogger(__name__)

# run_qa.py's defaults.
MAX_SEQ_LENGTH = 384
DOC_STRIDE = 128
MAX_QUERY_LENGTH = 64
# Inputs up to this many examples are converted in one go without Dataset.map; it is also the
# map's batch size.
DIRECT_LIMIT = 1000


@dataclass(frozen=True)
class Window:
    """How an example is cut into features (run_qa.py's three flags), one value from parsing to
    the predictor, so training, evaluation and serving cannot cut differently."""

    max_seq_length: int = MAX_SEQ_LENGTH
    doc_stride: int = DOC_STRIDE
    max_query_length: int = MAX_QUERY_LENGTH

    @classmethod
    def from_args(cls, args) -> "Window":
        return cls(args.max_seq_length, args.doc_stride, args.max_query_length)


# ---------------------------------------------------------------------------------------------
# Checks and shared tokenisation
# ---------------------------------------------------------------------------------------------


def check_fast_tokenizer(tokenizer, source: str | None = None) -> None:
    """SQuAD features need offset mappings and overflowing windows: only fast (Rust) tokenizers give them."""
    if not getattr(tokenizer, "is_fast", False):
        of = f" of {source!r}" if source else ""
        raise ValueError(
            f"the tokenizer{of} ({type(tokenizer).__name__}) is not a fast tokenizer; SQuAD features need "
            "offset mappings and overflowing windows, which only fast (Rust) tokenizers give. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True) from a folder that has a tokenizer.json."
        )


def _check_setup(tokenizer, window: Window) -> int:
    """Fail early, with the fix, on set-ups the windowing cannot handle; return max_seq_length."""
    max_seq_length, doc_stride, max_query_length = window.max_seq_length, window.doc_stride, window.max_query_length
    check_fast_tokenizer(tokenizer)
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError(
            f"the tokenizer pads on the {tokenizer.padding_side!r}; kdqa supports only right padding "
            "(question first, context second). Set tokenizer.padding_side = 'right'."
        )
    if max_query_length < 1:
        raise ValueError(f"max_query_length must be at least 1, got {max_query_length}")
    if doc_stride < 0:
        raise ValueError(f"doc_stride must be >= 0, got {doc_stride}")
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 1_000_000 and max_seq_length > model_max:
        logger.warning(
            "max_seq_length %d is larger than the tokenizer's model_max_length %d; using %d",
            max_seq_length, model_max, model_max,
        )
        max_seq_length = int(model_max)
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    if max_seq_length - n_special - 1 <= doc_stride:
        raise ValueError(
            f"max_seq_length {max_seq_length} is too small: with {n_special} special tokens and even a one-token "
            f"question it leaves no more than doc_stride {doc_stride} tokens per window for the context. "
            "Raise max_seq_length or lower doc_stride."
        )
    return max_seq_length


def _truncate_questions(questions: Sequence[str], tokenizer, max_query_length: int) -> tuple[list[str], list[int]]:
    """Questions without leading whitespace and cut to at most `max_query_length` tokens.

    One batched tokenisation with offsets: a too-long question is cut at the end offset of its
    last kept token, which keeps exactly those tokens without decoding anything back to text.
    Leading whitespace is stripped as run_qa does (some SQuAD questions have a lot of it, and it
    would shift nothing but waste the truncation's room).
    """
    questions = [q.lstrip() for q in questions]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    lengths = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        if len(offsets) > max_query_length:
            questions[i] = questions[i][: offsets[max_query_length - 1][1]]
            lengths.append(max_query_length)
        else:
            lengths.append(len(offsets))
    return questions, lengths


def _tokenize(examples: dict, tokenizer, max_seq_length: int, doc_stride: int, max_query_length: int):
    questions, q_lengths = _truncate_questions(examples["question"], tokenizer, max_query_length)
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    longest = max(range(len(q_lengths)), key=q_lengths.__getitem__, default=None)
    if longest is not None:
        room = max_seq_length - q_lengths[longest] - n_special
        if room <= doc_stride:
            raise ValueError(
                f"max_seq_length {max_seq_length} is too small for question {examples['id'][longest]!r}: its "
                f"{q_lengths[longest]} tokens (after max_query_length {max_query_length}) and {n_special} special "
                f"tokens leave {room} tokens for the context, which must be more than doc_stride {doc_stride}. "
                "Raise max_seq_length, or lower max_query_length or doc_stride."
            )
    return tokenizer(
        questions,
        examples["context"],
        truncation="only_second",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )


def _context_range(sequence_ids: list) -> tuple[int, int] | None:
    """First and last token index of the context (sequence id 1) in a window; None if it has none."""
    if 1 not in sequence_ids:
        return None
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    return first, last


def _model_inputs(enc) -> dict:
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    return out


def _as_columns(examples) -> dict | None:
    """A dict of columns for a small in-memory input, else None (then Dataset.map is used)."""
    if isinstance(examples, Dataset):
        return examples[:] if 0 < len(examples) <= DIRECT_LIMIT else None
    if isinstance(examples, dict):
        n = len(next(iter(examples.values()), []))
        return examples if 0 < n <= DIRECT_LIMIT else None
    rows = list(examples)
    if not 0 < len(rows) <= DIRECT_LIMIT:
        return None
    return {key: [row[key] for row in rows] for key in rows[0]}


def _as_dataset(examples) -> Dataset:
    if isinstance(examples, Dataset):
        return examples
    if isinstance(examples, dict):
        return Dataset.from_dict(examples)
    return Dataset.from_list(list(examples))


def _map(examples, function, num_proc, desc: str, as_dataset: bool = True) -> Dataset | dict:
    """Apply a batched conversion. Small inputs (one batch) are converted directly: Dataset.map
    costs ~0.2 s of fingerprinting per call, which would dominate one-question inference; with
    as_dataset=False they stay a dict of columns (Dataset.from_dict costs more than tokenising)."""
    columns = _as_columns(examples) if not num_proc or num_proc == 1 else None
    names = list(columns) if columns is not None else _as_dataset(examples).column_names
    missing = [c for c in ("id", "context", "question") if c not in names]
    if missing:
        raise ValueError(f"the examples lack the SQuAD columns {missing} (they have {names})")
    if columns is not None:
        converted = function(columns)
        return Dataset.from_dict(converted) if as_dataset else converted
    examples = _as_dataset(examples)
    return examples.map(
        function,
        batched=True,
        batch_size=DIRECT_LIMIT,
        num_proc=num_proc,
        remove_columns=examples.column_names,
        desc=desc,
    )


# ---------------------------------------------------------------------------------------------
# Training and evaluation features
# ---------------------------------------------------------------------------------------------


def answer_token_span(offsets: list, sequence_ids: list, start_char: int, end_char: int) -> tuple[int, int] | None:
    """Token indices (start, end) of the character span [start_char, end_char) in one window, or None
    when the window does not hold the whole span.

    Start: the last context token starting at or before start_char; end: the first context token
    ending at or after end_char (an answer ending inside a token takes the whole token, as
    run_qa.py does). Searching only the context avoids run_qa's walk into the final [SEP].
    """
    context_range = _context_range(sequence_ids)
    if context_range is None:
        return None
    first, last = context_range
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    window = offsets[first : last + 1]
    starts = [o[0] for o in window]
    ends = [o[1] for o in window]
    start = first + max(bisect.bisect_right(starts, start_char) - 1, 0)
    end = first + min(bisect.bisect_left(ends, end_char), len(window) - 1)
    if end < start:
        return None
    return start, end


def prepare_train_features(
    examples,
    tokenizer,
    window: Window = Window(),
    num_proc: int | None = None,
) -> Dataset:
    """Training features: input_ids, attention_mask, [token_type_ids], start_positions, end_positions.

    Labels are the first gold answer's token span; a window that does not hold the whole answer
    points at its CLS token, as run_qa.py does. Run fix_answer_starts on the examples first.
    """
    max_seq_length = _check_setup(tokenizer, window)
    doc_stride, max_query_length = window.doc_stride, window.max_query_length
    cls_id = tokenizer.cls_token_id

    def convert(batch):
        enc = _tokenize(batch, tokenizer, max_seq_length, doc_stride, max_query_length)
        sample_map = enc["overflow_to_sample_mapping"]
        starts, ends = [], []
        for i, offsets in enumerate(enc["offset_mapping"]):
            input_ids = enc["input_ids"][i]
            cls_index = input_ids.index(cls_id) if cls_id is not None and cls_id in input_ids else 0
            answers = batch["answers"][sample_map[i]]
            span = None
            if answers["answer_start"]:
                text = answers["text"][0]
                start_char = answers["answer_start"][0]
                # Whitespace around an answer text is no part of the answer's tokens.
                stripped = text.lstrip()
                start_char += len(text) - len(stripped)
                end_char = start_char + len(stripped.rstrip())
                span = answer_token_span(offsets, enc.sequence_ids(i), start_char, end_char)
            if span is None:
                starts.append(cls_index)
                ends.append(cls_index)
            else:
                starts.append(span[0])
                ends.append(span[1])
        out = _model_inputs(enc)
        out["start_positions"] = starts
        out["end_positions"] = ends
        return out

    return _map(examples, convert, num_proc, "tokenising training examples")


def prepare_eval_features(
    examples,
    tokenizer,
    window: Window = Window(),
    num_proc: int | None = None,
    as_dataset: bool = True,
) -> Dataset | dict:
    """Evaluation features: model inputs, `example_id`, and `offset_mapping` with None for every
    token outside the context, so span decoding can only pick context tokens.

    as_dataset=False: inputs of up to DIRECT_LIMIT examples give a dict of columns (answering
    questions one at a time), larger ones a Dataset as always."""
    max_seq_length = _check_setup(tokenizer, window)
    doc_stride, max_query_length = window.doc_stride, window.max_query_length

    def convert(batch):
        enc = _tokenize(batch, tokenizer, max_seq_length, doc_stride, max_query_length)
        sample_map = enc["overflow_to_sample_mapping"]
        example_ids, offset_mapping = [], []
        for i, offsets in enumerate(enc["offset_mapping"]):
            example_ids.append(batch["id"][sample_map[i]])
            seq_ids = enc.sequence_ids(i)
            offset_mapping.append([o if s == 1 else None for o, s in zip(offsets, seq_ids)])
        out = _model_inputs(enc)
        out["example_id"] = example_ids
        out["offset_mapping"] = offset_mapping
        return out

    return _map(examples, convert, num_proc, "tokenising evaluation examples", as_dataset)


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------


class QACollator:
    """Pads a list of features to the batch's longest one, rounded up to `pad_to_multiple_of`
    (or to at least `pad_to_length` when given).

    input_ids are padded with `pad_token_id`, attention_mask and token_type_ids with 0;
    start_positions, end_positions and feature_index (where present) become int64 [B] tensors.
    Every other key (example_id, offset_mapping, ...) is ignored. Values may be lists, numpy
    arrays or tensors. Shared by training, evaluation, the teacher-logits cache and benchmarks.

    With `teacher_logits` (a TeacherLogitsCache) the batch also gets the cached teacher logits of
    its features, `teacher_start_logits` / `teacher_end_logits` (float32 [B, width]), looked up by
    feature_index here, in the DataLoader's workers and pinned with the batch: the training step
    then never waits for the host to read the cache.
    """

    SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")
    SCALAR_KEYS = ("start_positions", "end_positions", "feature_index")

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8, teacher_logits=None,
                 pad_to_length: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer has no pad token; set tokenizer.pad_token first")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of or 1
        self.teacher_logits = teacher_logits
        self.pad_to_length = pad_to_length  # run_qa.py's --pad_to_max_length: every batch this wide

    def __repr__(self) -> str:
        cache = f", teacher_logits={self.teacher_logits.path!r}" if self.teacher_logits is not None else ""
        return f"QACollator(pad_token_id={self.pad_token_id}, pad_to_multiple_of={self.pad_to_multiple_of}{cache})"

    @staticmethod
    def _flat(values: list, key: str) -> tuple[np.ndarray, np.ndarray]:
        """All sequences of one key concatenated, and their lengths."""
        arrays = []
        for v in values:
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            a = np.asarray(v)
            if a.ndim != 1:
                raise ValueError(f"QACollator: {key} of a feature must be 1-D, got shape {a.shape}")
            arrays.append(a)
        lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, np.int64)
        return flat, lengths

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("QACollator got an empty list of features")
        first = features[0]
        if "input_ids" not in first:
            raise KeyError(f"QACollator: the features have no input_ids (keys: {sorted(first)})")
        ids_flat, lengths = self._flat([f["input_ids"] for f in features], "input_ids")
        if lengths.min() == 0:
            raise ValueError("QACollator: a feature has empty input_ids")
        multiple = self.pad_to_multiple_of
        width = int(-(-int(lengths.max()) // multiple) * multiple)
        if self.pad_to_length is not None:
            width = max(width, self.pad_to_length)
        mask = np.arange(width)[None, :] < lengths[:, None]

        batch = {}
        for key in self.SEQUENCE_KEYS:
            if key not in first:
                continue
            if key == "input_ids":
                flat = ids_flat
            else:
                flat, key_lengths = self._flat([f[key] for f in features], key)
                if not np.array_equal(key_lengths, lengths):
                    raise ValueError(f"QACollator: {key} and input_ids differ in length in a feature")
            out = np.full((len(features), width), self.pad_token_id if key == "input_ids" else 0, dtype=np.int64)
            out[mask] = flat
            batch[key] = torch.from_numpy(out)
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
        for key in self.SCALAR_KEYS:
            if key not in first:
                continue
            try:
                values = [int(f[key]) for f in features]
            except KeyError:
                raise KeyError(f"QACollator: some features have {key} and others do not") from None
            batch[key] = torch.tensor(values, dtype=torch.int64)
        if self.teacher_logits is not None:
            if "feature_index" not in batch:
                raise KeyError("QACollator: cached teacher logits are looked up by feature_index, which the features lack")
            start, end = self.teacher_logits.lookup(batch["feature_index"], width)
            batch["teacher_start_logits"], batch["teacher_end_logits"] = start, end
        return batch


class FeatureRows:
    """Batched access to features (a Dataset, a dict of columns or a list of dicts): model inputs only, as lists.

    What running a model over features needs (evaluation, the teacher-logits cache): rows by
    index, read a batch at a time, and each feature's number of real tokens.
    """

    MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, features):
        if isinstance(features, dict):  # a dict of columns (one question's windows, not worth a Dataset)
            keep = [c for c in self.MODEL_INPUTS if c in features]
            if "input_ids" not in keep:
                raise ValueError(f"the features have no input_ids column (they have {sorted(features)})")
            features = [dict(zip(keep, values)) for values in zip(*(features[c] for c in keep))]
        self._is_dataset = hasattr(features, "with_format") and hasattr(features, "column_names")
        if self._is_dataset:
            if "input_ids" not in features.column_names:
                raise ValueError(f"the features have no input_ids column (they have {features.column_names})")
            keep = [c for c in self.MODEL_INPUTS if c in features.column_names]
            features = features.select_columns(keep).with_format(None)
        self._features = features

    def __len__(self) -> int:
        return len(self._features)

    def rows(self, indices: Sequence[int]) -> list[dict]:
        if self._is_dataset:
            columns = self._features[[int(i) for i in indices]]  # one batched read
            return [dict(zip(columns, values)) for values in zip(*columns.values())]
        rows = (self._features[int(i)] for i in indices)
        return [{k: _as_list(row[k]) for k in self.MODEL_INPUTS if k in row} for row in rows]

    def lengths(self, chunk: int = 2048) -> np.ndarray:
        """Real tokens per feature (int64): the sum of attention_mask, else the length of input_ids."""
        out = []
        for lo in range(0, len(self), chunk):
            for row in self.rows(range(lo, min(lo + chunk, len(self)))):
                mask = row.get("attention_mask")
                out.append(sum(_as_list(mask)) if mask is not None else len(row["input_ids"]))
        return np.asarray(out, dtype=np.int64)


def _as_list(values):
    return values.tolist() if hasattr(values, "tolist") else list(values)
