"""The teacher-logits cache: the teacher runs once over the training features, never again.

The teacher's start/end logits are stored for the unpadded tokens of every feature only, in fp16
or bf16, in flat memory-mapped .npy files, under a folder named by a fingerprint of everything the
logits depend on. A changed input therefore lands in a new folder instead of silently reusing stale
logits, and a cache is written in a temporary folder and renamed into place whole, so a crash never
leaves a folder that `load` would accept.

The logits go to disk batch by batch as the teacher computes them (memory-mapped, or appended to a
rank's part file), so memory does not grow with the number of windows. Under torchrun every rank runs
the teacher over its share of the batches, and rank 0 puts the shares together: the same bytes as a
one-process build, since each batch is the one that build runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from kdqa.distributed import DistState, all_gather_object, barrier, broadcast_object
from kdqa.features import FeatureRows, Window
from kdqa.modeling import logits_over_features
from kdqa.precision import PRECISION_NAMES
from kdqa.atomic_io import fsync_path, write_json_atomic
from kdqa.staging import new_staging, remove_dead_staging, replace_folder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NUMPY_STORAGE = {"float16": np.float16, "bfloat16": np.uint16}  # numpy has no bf16: raw bits
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# Config entries that name where or with what a model was saved, not what it computes.
_CONFIG_IGNORED = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")
_TMP_PREFIX = ".tmp-"


def _update_tensor(h, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


def _tokenizer_description(tokenizer) -> bytes:
    parts = {"class": type(tokenizer).__name__, "do_lower_case": getattr(tokenizer, "do_lower_case", None)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Set as a side effect of every call with truncation/padding: not a property of the tokenizer.
        state.pop("truncation", None)
        state.pop("padding", None)
        parts["backend"] = state
    parts["vocab"] = sorted(tokenizer.get_vocab().items())
    return json.dumps(parts, sort_keys=True, default=str).encode()


def fingerprint(
    *,
    data_files: Sequence[str] | None,
    dataset_fingerprint: str | None,
    tokenizer,
    teacher,
    window: Window,
    num_features: int,
    storage_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None,
) -> str:
    """sha256 (hex) of everything the cached logits depend on; the cache folder's name.

    data_files are hashed by content (streamed), in the order given, so moving a file keeps its
    cache; dataset_fingerprint stands in when the data came from the hub. autocast_dtype is the
    dtype the teacher runs in (None: fp32): logits computed in fp16 are not those of fp32.
    """
    if not data_files and not dataset_fingerprint:
        raise ValueError("fingerprint needs data_files or dataset_fingerprint: stale logits could not be detected")
    if storage_dtype not in _DTYPES:
        raise ValueError(f"storage_dtype must be torch.float16 or torch.bfloat16, got {storage_dtype}")
    if autocast_dtype not in PRECISION_NAMES:
        raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {autocast_dtype}")
    h = hashlib.sha256()
    h.update(f"kdqa-teacher-logits-v{FORMAT_VERSION}\n".encode())
    for path in data_files or ():
        h.update(b"file\n")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(f"|{os.path.getsize(path)}\n".encode())
    if dataset_fingerprint:
        h.update(f"dataset|{dataset_fingerprint}\n".encode())
    h.update(b"tokenizer\n" + _tokenizer_description(tokenizer) + b"\n")
    config = teacher.config.to_dict() if hasattr(teacher, "config") else {}
    for name in _CONFIG_IGNORED:
        config.pop(name, None)
    h.update(f"{type(teacher).__name__}\n".encode() + json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in teacher.state_dict().items():
        _update_tensor(h, name, tensor)
    settings = {
        "max_seq_length": int(window.max_seq_length),
        "doc_stride": int(window.doc_stride),
        "max_query_length": int(window.max_query_length),
        "num_features": int(num_features),
        "storage_dtype": _DTYPES[storage_dtype],
        "teacher_precision": PRECISION_NAMES[autocast_dtype],
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


class TeacherCacheError(ValueError):
    """The teacher's logits cannot be cached as they are (NaN/inf): the teacher's fault, not training's."""


def _first_non_finite(arrays, dtype_name: str, chunk: int = 1 << 24) -> int | None:
    """Index of the first NaN/inf value in the flat logit arrays, or None (read in chunks)."""
    for arr in arrays:
        for lo in range(0, arr.shape[0], chunk):
            part = np.asarray(arr[lo: lo + chunk])
            if dtype_name == "bfloat16":  # raw bits: exponent all ones is inf or NaN
                bad = (part & 0x7F80) == 0x7F80
            else:
                bad = ~np.isfinite(part)
            if bad.any():
                return lo + int(np.argmax(bad))
    return None


def _non_finite_teacher_message(token: int, offsets: np.ndarray, dtype_name: str) -> str:
    feature = int(np.searchsorted(offsets, token, side="right") - 1)
    hint = "check the teacher's weights" + (
        " (or, if its logits are only too large for float16, store them as bfloat16)" if dtype_name == "float16"
        else "")
    return (f"teacher logits cache: the teacher produced non-finite logits (NaN or inf) for training feature "
            f"{feature}; nothing was cached. The teacher model is at fault, not the learning rate: {hint}")


class TeacherLogitsCache:
    """Read side of a built cache: `lookup` turns feature indices into padded float32 logits."""

    def __init__(self, path: str, meta: dict, offsets: np.ndarray, start: np.ndarray, end: np.ndarray):
        self.path = path
        self.meta = meta
        self.key = meta["key"]
        self.dtype = meta["dtype"]
        self.num_features = int(meta["num_features"])
        self.total_tokens = int(meta["total_tokens"])
        self._offsets = offsets
        self._start = start
        self._end = end

    def __len__(self) -> int:
        return self.num_features

    # The memory maps pickle as full in-memory copies; a DataLoader worker reopens the files instead.
    def __getstate__(self):
        return {"path": self.path, "key": self.key}

    def __setstate__(self, state):
        cache, reason = self._open(os.path.dirname(state["path"]), state["key"])
        if cache is None:
            raise RuntimeError(f"teacher logits cache {state['path']} cannot be reopened: {reason}")
        self.__dict__.update(cache.__dict__)

    def lookup(self, feature_index: torch.Tensor | Sequence[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, seq_len] float32 start and end logits: a feature's cached values, then zeros.

        The zeros sit under padding that the loss masks out. A cached feature longer than seq_len
        or an unknown index means the cache was built for other features: that is an error.
        Called by QACollator with CPU feature indices, in the DataLoader's workers.
        """
        idx = torch.as_tensor(feature_index, dtype=torch.int64).reshape(-1).cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_features):
            bad = idx[(idx < 0) | (idx >= self.num_features)][:5].tolist()
            raise IndexError(
                f"feature indices {bad} are out of range for the teacher logits cache {self.path} "
                f"({self.num_features} features): the cache is stale or built for another data set"
            )
        starts = self._offsets[idx]
        lens = self._offsets[idx + 1] - starts
        if lens.size and lens.max() > seq_len:
            i = int(np.argmax(lens))
            raise ValueError(
                f"feature {int(idx[i])} has {int(lens[i])} cached tokens but its batch is {seq_len} long: "
                f"the teacher logits cache {self.path} does not match these features (stale cache?)"
            )
        rows = np.repeat(np.arange(idx.size), lens)
        first = np.repeat(np.cumsum(lens) - lens, lens)
        cols = np.arange(rows.size) - first
        src = np.repeat(starts, lens) + cols
        out = []
        for flat in (self._start, self._end):
            values = np.zeros((idx.size, seq_len), dtype=np.float32)
            values[rows, cols] = self._to_float32(flat[src])
            out.append(torch.from_numpy(values))
        return out[0], out[1]

    def _to_float32(self, stored: np.ndarray) -> np.ndarray:
        if self.dtype == "bfloat16":
            return (stored.astype(np.uint32) << 16).view(np.float32)
        return stored.astype(np.float32)

    @classmethod
    def load(cls, cache_dir: str, key: str) -> TeacherLogitsCache | None:
        """The complete cache at cache_dir/key, memory-mapped, or None when absent or not intact."""
        cache, reason = cls._open(cache_dir, key)
        if cache is None:
            logger.debug("teacher logits cache %s not used: %s", os.path.join(cache_dir, key), reason)
        return cache

    @classmethod
    def _open(cls, cache_dir: str, key: str) -> tuple[TeacherLogitsCache | None, str]:
        _check_key(key)
        path = os.path.join(cache_dir, key)
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isdir(path):
            return None, "no cache for this fingerprint"
        if not os.path.isfile(meta_path):
            return None, "incomplete cache (no meta.json)"
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("format_version") != FORMAT_VERSION:
                return None, f"format version {meta.get('format_version')}, expected {FORMAT_VERSION}"
            if meta.get("key") != key:
                return None, f"meta.json names key {meta.get('key')!r}"
            if meta.get("dtype") not in _NUMPY_STORAGE:
                return None, f"unknown storage dtype {meta.get('dtype')!r}"
            n, total = int(meta["num_features"]), int(meta["total_tokens"])
            offsets = np.load(os.path.join(path, "offsets.npy"), mmap_mode="r", allow_pickle=False)
            if offsets.dtype != np.int64 or offsets.shape != (n + 1,):
                return None, f"offsets.npy has shape {offsets.shape} ({offsets.dtype}), expected ({n + 1},) int64"
            offsets = np.array(offsets)  # small; checked once, then read on every lookup
            if offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
                return None, "offsets.npy is inconsistent with meta.json"
            arrays = []
            for name in ("start_logits.npy", "end_logits.npy"):
                arr = np.load(os.path.join(path, name), mmap_mode="r", allow_pickle=False)
                if arr.dtype != _NUMPY_STORAGE[meta["dtype"]] or arr.shape != (total,):
                    return None, f"{name} has shape {arr.shape} ({arr.dtype}), expected ({total},)"
                arrays.append(arr)
            bad = _first_non_finite(arrays, meta["dtype"])
        except Exception as err:  # any unreadable file (empty, truncated, garbage) means: rebuild
            return None, f"unreadable cache ({type(err).__name__}: {err})"
        if bad is not None:
            return None, f"the cache holds non-finite logits (NaN or inf) at token {bad}: damaged cache"
        return cls(path, meta, offsets, arrays[0], arrays[1]), "ok"

    @classmethod
    def build(
        cls,
        cache_dir: str,
        key: str,
        features,
        teacher: torch.nn.Module,
        collate_fn: Callable[[list[dict]], dict],
        *,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
        storage_dtype: torch.dtype = torch.float16,
        progress: bool = True,
        dist: DistState | None = None,
    ) -> TeacherLogitsCache:
        """Run the teacher over every feature once and write cache_dir/key atomically.

        features: a datasets.Dataset or a list of dicts with input_ids, attention_mask (right
        padding or none) and optionally token_type_ids; feature i's logits are stored at index i.
        The teacher must already be on `device`; it is put in eval mode and its mode restored.
        Batches are formed from length-sorted features so little is computed on padding.
        dist: under torchrun every rank calls build with the same features and runs the teacher
        over its share of the batches; rank 0 puts the shares together (the bytes one process writes).
        """
        _check_key(key)
        dist = dist or DistState()
        offsets = _token_offsets(features, storage_dtype, batch_size)
        _same_features_on_every_rank(offsets, dist)
        tmp = _new_build_folder(cache_dir, key, dist)
        run = dict(batch_size=batch_size, device=device, autocast_dtype=autocast_dtype,
                   progress=progress and dist.is_main)
        try:
            if dist.enabled:
                _write_sharded(tmp, offsets, storage_dtype, teacher, features, collate_fn, dist, **run)
            else:
                _write_teacher_logits(tmp, offsets, storage_dtype, teacher, features, collate_fn, **run)
            if dist.is_main:
                _publish(tmp, cache_dir, key, _meta(key, offsets, storage_dtype, teacher))
        except BaseException:
            if dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier(dist)
        return cls._load_written(cache_dir, key)

    @classmethod
    def _load_written(cls, cache_dir: str, key: str) -> TeacherLogitsCache:
        cache = cls.load(cache_dir, key)
        if cache is None:
            raise RuntimeError(f"the teacher logits cache just written to {os.path.join(cache_dir, key)} "
                               "does not load back")
        return cache

    @classmethod
    def load_or_build(
        cls,
        cache_dir: str,
        key: str,
        features,
        teacher: torch.nn.Module,
        collate_fn: Callable[[list[dict]], dict],
        *,
        dist: DistState | None = None,
        **build_kwargs,
    ) -> TeacherLogitsCache:
        """The cache for this key, built first when there is none or it does not fit the features.
        Under torchrun every rank calls it: rank 0 looks, and all ranks build or all load."""
        dist = dist or DistState()
        path = os.path.join(cache_dir, key)
        cache, reason = cls._open(cache_dir, key) if dist.is_main else (None, None)
        if cache is not None and len(cache) != len(features):
            cache, reason = None, f"it holds {len(cache)} features, the data has {len(features)}"
        reason = broadcast_object(None if cache is not None else reason, dist)
        if reason is None:
            if dist.is_main:
                logger.info(
                    "teacher logits cache: using %s (%d features, %d tokens, %s)",
                    path, len(cache), cache.total_tokens, cache.dtype,
                )
            return cache if dist.is_main else cls._load_written(cache_dir, key)
        if dist.is_main:
            logger.info("teacher logits cache: building %s (%s)", path, reason)
        return cls.build(cache_dir, key, features, teacher, collate_fn, dist=dist, **build_kwargs)


def _token_offsets(features, storage_dtype: torch.dtype, batch_size: int) -> np.ndarray:
    """The build's arguments checked, and feature i's tokens' place in the flat arrays:
    offsets[i]:offsets[i + 1] (n + 1 entries)."""
    if storage_dtype not in _DTYPES:
        raise ValueError(f"storage_dtype must be torch.float16 or torch.bfloat16, got {storage_dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows = FeatureRows(features)
    n = len(rows)
    if n == 0:
        raise ValueError("no features to run the teacher on")
    lengths = rows.lengths()
    if (lengths < 1).any():
        raise ValueError(f"feature {int(np.argmin(lengths))} has no tokens (attention_mask all zero)")
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _meta(key: str, offsets: np.ndarray, storage_dtype: torch.dtype, teacher) -> dict:
    return {
        "key": key,
        "format_version": FORMAT_VERSION,
        "dtype": _DTYPES[storage_dtype],
        "num_features": len(offsets) - 1,
        "total_tokens": int(offsets[-1]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "teacher": type(teacher).__name__,
    }


def _new_build_folder(cache_dir: str, key: str, dist: DistState) -> str:
    """Rank 0's fresh temp folder for this build (named after its host and pid), known to every rank;
    those that dead builds of this key left on this host are removed first."""
    tmp = None
    if dist.is_main:
        os.makedirs(cache_dir, exist_ok=True)
        remove_dead_staging(cache_dir, f"{_TMP_PREFIX}{key}-")
        tmp = new_staging(cache_dir, f"{_TMP_PREFIX}{key}-")
    return broadcast_object(tmp, dist)


def _new_flat_arrays(tmp: str, offsets: np.ndarray, storage_dtype: torch.dtype) -> dict[str, np.ndarray]:
    """offsets.npy written, and the two flat logit arrays created as memory maps (nothing in memory)."""
    np.save(os.path.join(tmp, "offsets.npy"), offsets, allow_pickle=False)
    return {
        name: np.lib.format.open_memmap(
            os.path.join(tmp, f"{name}.npy"), mode="w+", dtype=_NUMPY_STORAGE[_DTYPES[storage_dtype]],
            shape=(int(offsets[-1]),)
        )
        for name in ("start_logits", "end_logits")
    }


def _close_checked(flat: dict[str, np.ndarray], offsets: np.ndarray, storage_dtype: torch.dtype) -> str | None:
    """The flat arrays flushed to their files, or, where the teacher wrote NaN/inf, why not."""
    dtype_name = _DTYPES[storage_dtype]
    bad = _first_non_finite(list(flat.values()), dtype_name)
    if bad is not None:
        return _non_finite_teacher_message(bad, offsets, dtype_name)
    for arr in flat.values():
        arr.flush()
    return None


def _write_teacher_logits(tmp: str, offsets: np.ndarray, storage_dtype: torch.dtype, teacher, features,
                          collate_fn, **run_kwargs) -> None:
    """Run the teacher over the features and write offsets.npy and the two flat logit arrays into
    tmp, each batch as it comes; a non-finite teacher logit is a TeacherCacheError (nothing published)."""
    flat = _new_flat_arrays(tmp, offsets, storage_dtype)

    def store(indices, batch_lengths, start_logits, end_logits):
        for name, values in (("start_logits", start_logits), ("end_logits", end_logits)):
            stored = _to_storage(values.float(), storage_dtype)
            for row, (i, length) in enumerate(zip(indices.tolist(), batch_lengths.tolist())):
                flat[name][offsets[i] : offsets[i + 1]] = stored[row, :length]

    logits_over_features(teacher, features, collate_fn, store, desc="teacher logits", **run_kwargs)
    failure = _close_checked(flat, offsets, storage_dtype)
    del flat
    if failure is not None:
        raise TeacherCacheError(failure)


# ----------------------------------------------------------------------------- a build by every rank

def _same_features_on_every_rank(offsets: np.ndarray, dist: DistState) -> None:
    """Each rank runs the teacher over its share of its own features: they must be rank 0's."""
    if not dist.enabled:
        return
    digests = all_gather_object(hashlib.sha256(offsets.tobytes()).hexdigest(), dist)
    if len(set(digests)) > 1:
        raise ValueError("teacher logits cache: the ranks hold different training features (their token counts "
                         "differ), so their shares of the cache would not fit together: give every rank the same "
                         "training data, tokenizer and window")


def _shard(lengths: np.ndarray, batch_size: int, dist: DistState) -> np.ndarray:
    """This rank's features, in order: every world_size-th of the batches one process runs (features by
    length, longest first, as logits_over_features cuts them). Each batch is then the very batch of a
    one-process build, padding included, so each logit is bit for bit that build's."""
    order = np.argsort(-lengths, kind="stable")
    starts = range(dist.rank * batch_size, len(order), dist.world_size * batch_size)
    return np.concatenate([order[s: s + batch_size] for s in starts] or [np.zeros(0, dtype=np.int64)])


def _subset(features, indices: np.ndarray):
    """The features at `indices`, in that order, not copied (a Dataset gets an indices mapping)."""
    if hasattr(features, "select") and hasattr(features, "column_names"):
        return features.select(indices)
    if isinstance(features, dict):  # a dict of columns
        return {name: [column[int(i)] for i in indices] for name, column in features.items()}
    return [features[int(i)] for i in indices]


def _part_path(tmp: str, rank: int, name: str) -> str:
    return os.path.join(tmp, f"part-{rank}.{name}")


def _write_part(tmp: str, offsets: np.ndarray, storage_dtype: torch.dtype, teacher, features, collate_fn,
                dist: DistState, **run_kwargs) -> None:
    """This rank's share (_shard) through the teacher, appended as computed to part-<rank>.index
    (feature numbers), .start and .end (their real tokens' logits): files of its own, so ranks on
    several hosts never write one page of a shared file."""
    mine = _shard(np.diff(offsets), run_kwargs["batch_size"], dist)
    files = {name: open(_part_path(tmp, dist.rank, name), "wb") for name in ("index", "start", "end")}

    def store(indices, batch_lengths, start_logits, end_logits):
        files["index"].write(mine[indices].astype(np.int64).tobytes())
        real = np.arange(start_logits.shape[1]) < batch_lengths[:, None]  # row by row, real tokens only
        for name, values in (("start", start_logits), ("end", end_logits)):
            files[name].write(_to_storage(values.float(), storage_dtype)[real].tobytes())

    try:
        if mine.size:
            logits_over_features(teacher, _subset(features, mine), collate_fn, store, desc="teacher logits",
                                 **run_kwargs)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()


def _add_part(tmp: str, rank: int, flat: dict[str, np.ndarray], offsets: np.ndarray, chunk: int = 4096) -> int:
    """Copy rank's part files into the flat arrays at its features' places, `chunk` features at a time
    (memory stays bounded), then delete them; returns how many features they held."""
    index = np.fromfile(_part_path(tmp, rank, "index"), dtype=np.int64)
    with open(_part_path(tmp, rank, "start"), "rb") as start, open(_part_path(tmp, rank, "end"), "rb") as end:
        for lo in range(0, index.size, chunk):
            features = index[lo: lo + chunk]
            lengths = offsets[features + 1] - offsets[features]
            places = np.repeat(offsets[features] - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
            for f, name in ((start, "start_logits"), (end, "end_logits")):
                values = np.frombuffer(f.read(places.size * flat[name].itemsize), dtype=flat[name].dtype)
                if values.size != places.size:
                    raise RuntimeError(f"teacher logits cache: rank {rank}'s {name} part in {tmp} is cut short")
                flat[name][places] = values
    for name in ("index", "start", "end"):
        os.remove(_part_path(tmp, rank, name))
    return int(index.size)


def _write_sharded(tmp: str, offsets: np.ndarray, storage_dtype: torch.dtype, teacher, features, collate_fn,
                   dist: DistState, **run_kwargs) -> None:
    """Every rank its share into its part files, then rank 0 the flat arrays from all parts; a
    non-finite teacher logit is a TeacherCacheError on every rank (nothing published)."""
    _write_part(tmp, offsets, storage_dtype, teacher, features, collate_fn, dist, **run_kwargs)
    barrier(dist)
    failure = None
    if dist.is_main:
        flat = _new_flat_arrays(tmp, offsets, storage_dtype)
        added = sum(_add_part(tmp, rank, flat, offsets) for rank in range(dist.world_size))
        if added != len(offsets) - 1:
            raise RuntimeError(f"teacher logits cache: the ranks' parts hold {added} features, not {len(offsets) - 1}")
        failure = _close_checked(flat, offsets, storage_dtype)
        del flat
    failure = broadcast_object(failure, dist)
    if failure is not None:
        raise TeacherCacheError(failure)


def _to_storage(values: torch.Tensor, storage_dtype: torch.dtype) -> np.ndarray:
    stored = values.to(storage_dtype).cpu()
    if storage_dtype == torch.bfloat16:
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


def _publish(tmp: str, cache_dir: str, key: str, meta: dict) -> None:
    """Make the written folder tmp the cache cache_dir/key: files synced, meta.json last (it marks
    the cache complete), then one rename, replacing whatever incomplete cache held the key."""
    for name in ("offsets.npy", "start_logits.npy", "end_logits.npy"):
        fsync_path(os.path.join(tmp, name))
    write_json_atomic(os.path.join(tmp, "meta.json"), meta, indent=1, ensure_ascii=True, end="")
    # an incomplete or mismatching cache under this key is replaced
    replace_folder(tmp, os.path.join(cache_dir, key), stale_prefix=f"{_TMP_PREFIX}stale-{key}-")


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"cache key must be a plain folder name (letters, digits, _ . -), got {key!r}")


# ----------------------------------------------------------------------------- the training run's cache policy

@dataclass(frozen=True)
class CacheSettings:
    """What the training run's cache takes from the command line, as values read once by the caller."""

    cache_dir: str                      # --teacher_logits_cache
    window: Window                      # the windows the features were cut with
    data_files: tuple[str, ...] = ()    # the training data's files, hashed by content
    dataset_fingerprint: str | None = None  # stands in for data_files when the data came from the hub
    batch_size: int = 64                # sequences per teacher forward
    progress: bool = True               # a progress bar on the main process


def teacher_cache_key(settings: CacheSettings, teacher, tokenizer, num_features: int, autocast_dtype) -> str:
    """The cache folder's name: a fingerprint of the data, tokenizer, teacher, windows and the
    precision the teacher runs in (so fp32 and fp16/bf16 logits never share a folder)."""
    data_files = list(settings.data_files) or None
    return fingerprint(data_files=data_files, dataset_fingerprint=None if data_files else settings.dataset_fingerprint,
                       tokenizer=tokenizer, teacher=teacher, window=settings.window, num_features=num_features,
                       storage_dtype=cache_storage_dtype(autocast_dtype), autocast_dtype=autocast_dtype)


def cache_storage_dtype(autocast_dtype) -> torch.dtype:
    """bf16 logits are stored as bf16 (fp16 could overflow them); everything else as fp16."""
    return torch.bfloat16 if autocast_dtype == torch.bfloat16 else torch.float16


def teacher_logits_from_cache(settings: CacheSettings, teacher, tokenizer, train_features, collator, dist,
                              autocast_dtype) -> TeacherLogitsCache:
    """The teacher's logits of the training features, computed once (each rank its share of them),
    then memory-mapped by every rank."""
    key = broadcast_object(teacher_cache_key(settings, teacher, tokenizer, len(train_features), autocast_dtype), dist)
    return TeacherLogitsCache.load_or_build(settings.cache_dir, key, train_features, teacher.to(dist.device), collator,
                                            dist=dist, batch_size=settings.batch_size, device=dist.device,
                                            autocast_dtype=autocast_dtype,
                                            storage_dtype=cache_storage_dtype(autocast_dtype),
                                            progress=settings.progress)
