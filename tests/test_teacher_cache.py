"""Teacher-logits cache: equal to the online teacher, keyed by what the logits depend on, crash-safe."""

import glob
import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from kdqa.features import Window
from kdqa.modeling import forward_qa
from kdqa.config import parse_args
from kdqa.teacher_cache import (CacheSettings, TeacherCacheError, TeacherLogitsCache, cache_storage_dtype,
                                fingerprint, teacher_cache_key)
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

N_FEATURES = 37


def _teacher(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BertForQuestionAnswering(config).eval()


def _features(n=N_FEATURES, seed=0):
    """Unpadded features of many lengths, as the feature builder stores them."""
    g = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(n):
        length = int(torch.randint(5, 60, (1,), generator=g))
        question = int(torch.randint(2, length - 1, (1,), generator=g))
        features.append(
            {
                "input_ids": torch.randint(5, 100, (length,), generator=g).tolist(),
                "attention_mask": [1] * length,
                "token_type_ids": [0] * question + [1] * (length - question),
                "offset_mapping": [None] * length,  # not a model input: must be ignored
            }
        )
    return features


def _collate(rows, pad_to_multiple_of=8):
    """Dynamic padding to the batch max (a multiple of 8), like the project's QACollator."""
    longest = max(len(r["input_ids"]) for r in rows)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch = {}
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        batch[name] = torch.tensor([r[name] + [0] * (longest - len(r[name])) for r in rows])
    if "feature_index" in rows[0]:
        batch["feature_index"] = torch.tensor([r["feature_index"] for r in rows])
    return batch


def _online_batches(features, batch_size, seed=1):
    """Shuffled batches (so padded lengths differ from the build's), with feature_index."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).tolist()
    for lo in range(0, len(order), batch_size):
        yield _collate([dict(features[i], feature_index=i) for i in order[lo : lo + batch_size]])


def _rounded(x, dtype):
    return x.to(dtype).float()


def _kd_loss(student_start, student_end, teacher_start, teacher_end, mask, temperature=2.0):
    """KL(teacher || student) of the span distributions, softmax over real tokens only."""
    neg = torch.finfo(torch.float32).min
    total = 0.0
    for s, t in ((student_start, teacher_start), (student_end, teacher_end)):
        s = (s / temperature).masked_fill(~mask, neg)
        t = (t / temperature).masked_fill(~mask, neg)
        p_t = t.softmax(-1)
        total = total + (p_t * (t.log_softmax(-1) - s.log_softmax(-1))).masked_fill(~mask, 0).sum(-1).mean()
    return total * temperature**2 / 2


@pytest.fixture(scope="module")
def teacher():
    return _teacher()


@pytest.fixture(scope="module")
def features():
    return _features()


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def built(request, tmp_path_factory, teacher, features):
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    cache = TeacherLogitsCache.build(
        cache_dir, "k", features, teacher, _collate, batch_size=4, storage_dtype=request.param, progress=False
    )
    return cache, request.param, cache_dir


def test_cached_logits_equal_online_teacher(built, teacher, features):
    cache, dtype, _ = built
    assert len(cache) == N_FEATURES
    assert cache.total_tokens == sum(len(f["input_ids"]) for f in features)
    # One ulp of the storage format, plus float32 noise from a different padded length.
    rtol = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    seen = set()
    padded_lengths = set()
    for batch in _online_batches(features, batch_size=5):
        with torch.no_grad():
            start, end = forward_qa(teacher, batch).logits
        seq_len = batch["input_ids"].shape[1]
        padded_lengths.add(seq_len)
        cached_start, cached_end = cache.lookup(batch["feature_index"], seq_len)
        assert cached_start.dtype == torch.float32 and cached_start.shape == start.shape
        mask = batch["attention_mask"].bool()
        for cached, online in ((cached_start, start), (cached_end, end)):
            torch.testing.assert_close(cached[mask], _rounded(online[mask], dtype), rtol=rtol, atol=1e-4)
            assert (cached[~mask] == 0).all()
        seen.update(batch["feature_index"].tolist())
    assert seen == set(range(N_FEATURES)) and len(padded_lengths) > 2


def test_loss_from_cache_matches_online_teacher(built, teacher, features):
    cache, dtype, _ = built
    student = _teacher(seed=1)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for batch in _online_batches(features, batch_size=8, seed=2):
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            s_start, s_end = forward_qa(student, batch).logits
            t_start, t_end = forward_qa(teacher, batch).logits
        c_start, c_end = cache.lookup(batch["feature_index"].tolist(), batch["input_ids"].shape[1])
        online = _kd_loss(s_start, s_end, t_start, t_end, mask)
        cached = _kd_loss(s_start, s_end, c_start, c_end, mask)
        assert online > 0
        torch.testing.assert_close(cached, online, rtol=tol, atol=1e-4)


def test_files_are_plain_npy_and_never_pickled(built, monkeypatch):
    cache, _, cache_dir = built
    assert sorted(os.listdir(cache.path)) == ["end_logits.npy", "meta.json", "offsets.npy", "start_logits.npy"]
    for name in ("end_logits.npy", "offsets.npy", "start_logits.npy"):
        np.load(os.path.join(cache.path, name), allow_pickle=False, mmap_mode="r")
    meta = json.load(open(os.path.join(cache.path, "meta.json")))
    assert meta["key"] == "k" and meta["num_features"] == N_FEATURES and meta["total_tokens"] == cache.total_tokens

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = TeacherLogitsCache.load(cache_dir, "k")
    assert loaded is not None
    a, b = loaded.lookup([0, 1], 64), cache.lookup([0, 1], 64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_survives_pickling_for_dataloader_workers_without_copying(built):
    cache, _, _ = built
    blob = pickle.dumps(cache)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    assert torch.equal(clone.lookup([3, 4], 64)[1], cache.lookup([3, 4], 64)[1])


def test_stale_cache_errors(built, features):
    cache, _, _ = built
    lengths = np.array([len(f["input_ids"]) for f in features])
    longest = int(lengths.max())
    with pytest.raises(ValueError, match="stale"):
        cache.lookup([int(lengths.argmax())], longest - 1)
    with pytest.raises(IndexError, match="out of range"):
        cache.lookup([0, N_FEATURES], 64)
    with pytest.raises(IndexError, match="out of range"):
        cache.lookup([-1], 64)


def test_half_written_caches_are_not_used(tmp_path, teacher, features, caplog):
    cache_dir = str(tmp_path)
    # A crashed build: only a temp folder from a process that is gone (removed by the next build),
    # and one of a build on another host that may still be running (ignored, left alone).
    dead = tmp_path / f".tmp-k-{socket.gethostname()}-999999999-abc"
    foreign = tmp_path / ".tmp-k-otherhost-1-abc"
    for folder in (dead, foreign):
        folder.mkdir()
        (folder / "offsets.npy").write_bytes(b"junk")
    assert TeacherLogitsCache.load(cache_dir, "k") is None
    with caplog.at_level("INFO", logger="kdqa.teacher_cache"):
        cache = TeacherLogitsCache.load_or_build(cache_dir, "k", features, teacher, _collate, progress=False)
    assert "building" in caplog.text and "no cache for this fingerprint" in caplog.text
    assert len(cache) == N_FEATURES
    reference = cache.lookup(list(range(N_FEATURES)), 64)

    # meta.json is written last: without it the folder is incomplete and gets rebuilt.
    os.remove(os.path.join(cache.path, "meta.json"))
    assert TeacherLogitsCache.load(cache_dir, "k") is None
    caplog.clear()
    with caplog.at_level("INFO", logger="kdqa.teacher_cache"):
        rebuilt = TeacherLogitsCache.load_or_build(cache_dir, "k", features, teacher, _collate, progress=False)
    assert "no meta.json" in caplog.text
    assert torch.equal(rebuilt.lookup(list(range(N_FEATURES)), 64)[0], reference[0])

    # A file cut short or a meta.json for another key: not used either.
    caplog.clear()
    with caplog.at_level("INFO", logger="kdqa.teacher_cache"):
        assert TeacherLogitsCache.load_or_build(cache_dir, "k", features, teacher, _collate) is not None
    assert "using" in caplog.text
    path = os.path.join(cache_dir, "k", "end_logits.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2)
    assert TeacherLogitsCache.load(cache_dir, "k") is None
    TeacherLogitsCache.build(cache_dir, "k", features, teacher, _collate, progress=False)
    meta_path = os.path.join(cache_dir, "k", "meta.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, key="other"), open(meta_path, "w"))
    assert TeacherLogitsCache.load(cache_dir, "k") is None
    # No temp folders are left behind by the builds.
    assert sorted(os.listdir(cache_dir)) == [foreign.name, "k"]


def test_failed_build_leaves_no_cache(tmp_path, teacher, features):
    def broken_collate(rows):
        if len(rows) < 4:
            raise RuntimeError("crash in the last batch")
        return _collate(rows)

    with pytest.raises(RuntimeError, match="crash"):
        TeacherLogitsCache.build(str(tmp_path), "k", features, teacher, broken_collate, batch_size=4, progress=False)
    assert TeacherLogitsCache.load(str(tmp_path), "k") is None
    assert os.listdir(tmp_path) == []


def test_build_restores_training_mode_and_accepts_a_dataset(tmp_path, features):
    datasets = pytest.importorskip("datasets")
    teacher = _teacher().train()
    dataset = datasets.Dataset.from_list([{k: v for k, v in f.items() if k != "offset_mapping"} for f in features])
    cache = TeacherLogitsCache.build(str(tmp_path), "k", dataset, teacher, _collate, batch_size=8, progress=False)
    assert teacher.training
    teacher.eval()
    reference = TeacherLogitsCache.build(str(tmp_path), "ref", features, teacher, _collate, progress=False)
    assert torch.equal(cache.lookup(list(range(N_FEATURES)), 64)[0], reference.lookup(list(range(N_FEATURES)), 64)[0])


def test_each_batch_is_on_disk_before_the_next_runs(tmp_path, teacher, features):
    """Memory stays bounded for any number of windows: each batch's logits go straight into the
    memory-mapped file of the cache being built; no list of all logits waits for the end."""
    snapshots = []

    def collate(rows):
        building = glob.glob(str(tmp_path / ".tmp-k-*" / "start_logits.npy"))
        if building:
            snapshots.append(np.array(np.load(building[0], mmap_mode="r")))
        return _collate(rows)

    cache = TeacherLogitsCache.build(str(tmp_path), "k", features, teacher, collate, batch_size=4, progress=False)
    final = np.load(os.path.join(cache.path, "start_logits.npy"))
    lengths = np.diff(np.load(os.path.join(cache.path, "offsets.npy")))
    last_batch = np.sort(lengths)[:N_FEATURES % 4 or 4].sum()  # the shortest features run last
    assert len(snapshots) == -(-N_FEATURES // 4) and not snapshots[0].any()
    assert (snapshots[-1] == final).sum() == final.size - last_batch


def test_bad_keys_rejected(tmp_path):
    for key in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="cache key"):
            TeacherLogitsCache.load(str(tmp_path), key)


# ---- fingerprint ---------------------------------------------------------------------------------


def _tokenizer(extra_tokens=(), lowercase=True):
    """A tiny WordPiece fast tokenizer built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "##s", *extra_tokens]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


@pytest.fixture()
def fp_inputs(tmp_path):
    data = tmp_path / "train.json"
    data.write_bytes(b'{"data": []}' * 1000)
    return dict(
        data_files=[str(data)],
        dataset_fingerprint=None,
        tokenizer=_tokenizer(),
        teacher=_teacher(),
        window=Window(384, 128, 64),
        num_features=N_FEATURES,
        storage_dtype=torch.float16,
        autocast_dtype=None,
    )


def test_fingerprint_is_stable(fp_inputs, tmp_path):
    key = fingerprint(**fp_inputs)
    assert len(key) == 64 and key == fingerprint(**fp_inputs)
    # Same weights in a fresh model, same bytes at another path, a tokenizer that has been used
    # with truncation and padding (which change its backend's settings): same key.
    twin = _teacher(seed=5)
    twin.load_state_dict(fp_inputs["teacher"].state_dict())
    moved = tmp_path / "moved.json"
    moved.write_bytes(open(fp_inputs["data_files"][0], "rb").read())
    used = _tokenizer()
    used(["the cat sat"] * 2, truncation=True, max_length=4, padding="max_length")
    assert fingerprint(**dict(fp_inputs, teacher=twin, data_files=[str(moved)], tokenizer=used)) == key


def test_fingerprint_changes_with_what_the_logits_depend_on(fp_inputs):
    key = fingerprint(**fp_inputs)
    changed_teacher = _teacher()
    changed_teacher.load_state_dict(fp_inputs["teacher"].state_dict())
    with torch.no_grad():
        changed_teacher.qa_outputs.bias[0] += 1e-3
    data = fp_inputs["data_files"][0]
    changed_data = data + ".changed"
    content = bytearray(open(data, "rb").read())
    content[5] ^= 1
    open(changed_data, "wb").write(bytes(content))
    variants = {
        "weights": dict(teacher=changed_teacher),
        "vocab": dict(tokenizer=_tokenizer(extra_tokens=["dog"])),
        "lowercase": dict(tokenizer=_tokenizer(lowercase=False)),
        "data bytes": dict(data_files=[changed_data]),
        "hub data": dict(data_files=None, dataset_fingerprint="abc123"),
        "max_seq_length": dict(window=Window(256, 128, 64)),
        "doc_stride": dict(window=Window(384, 64, 64)),
        "max_query_length": dict(window=Window(384, 128, 32)),
        "num_features": dict(num_features=N_FEATURES + 1),
        "storage dtype": dict(storage_dtype=torch.bfloat16),
        "teacher in bf16": dict(autocast_dtype=torch.bfloat16),
        "teacher in fp16": dict(autocast_dtype=torch.float16),
    }
    keys = {name: fingerprint(**dict(fp_inputs, **change)) for name, change in variants.items()}
    assert all(k != key for k in keys.values()), [n for n, k in keys.items() if k == key]
    assert len(set(keys.values())) == len(keys)


def test_fingerprint_needs_data_identity(fp_inputs):
    with pytest.raises(ValueError, match="data_files or dataset_fingerprint"):
        fingerprint(**dict(fp_inputs, data_files=None, dataset_fingerprint=None))


def test_with_project_collator_and_length_grouped_sampler(tmp_path, teacher, features):
    """The loop's wiring: QACollator batches from TrainBatchSampler, logits looked up by feature_index."""
    from kdqa.features import QACollator
    from kdqa.samplers import TrainBatchSampler

    collator = QACollator(pad_token_id=0)
    cache = TeacherLogitsCache.build(str(tmp_path), "k", features, teacher, collator, batch_size=6, progress=False)
    data = [dict(f, feature_index=i) for i, f in enumerate(features)]
    sampler = TrainBatchSampler(len(data), 4, lengths=[len(f["input_ids"]) for f in features], group_by_length=True,
                                seed=0)
    sampler.set_epoch(1)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collator)
    for batch in loader:
        with torch.no_grad():
            start, _ = forward_qa(teacher, batch).logits
        cached, _ = cache.lookup(batch["feature_index"], batch["input_ids"].shape[1])
        mask = batch["attention_mask"].bool()
        torch.testing.assert_close(cached[mask], _rounded(start[mask], torch.float16), rtol=2.0**-10, atol=1e-4)


# ----------------------------------------------------------------------------- damaged files and a broken teacher

def _cache_parts():
    return _teacher(), _features(), _collate


@pytest.mark.parametrize("name", ["meta.json", "offsets.npy", "start_logits.npy", "end_logits.npy"])
def test_an_empty_or_unreadable_cache_file_is_rebuilt(tmp_path, name):
    teacher, features, collate = _cache_parts()
    built = TeacherLogitsCache.build(str(tmp_path), "k", features, teacher, collate, progress=False)
    expected = built.lookup(range(len(features)), 64)
    open(tmp_path / "k" / name, "w").close()  # zero-length
    assert TeacherLogitsCache.load(str(tmp_path), "k") is None
    again = TeacherLogitsCache.load_or_build(str(tmp_path), "k", features, teacher, collate, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.lookup(range(len(features)), 64), expected))


def test_non_finite_teacher_logits_are_the_caches_fault_when_built_or_loaded(tmp_path):
    teacher, features, collate = _cache_parts()
    TeacherLogitsCache.build(str(tmp_path), "k", features, teacher, collate, progress=False)
    start = np.load(tmp_path / "k" / "start_logits.npy", mmap_mode="r+")
    start[17] = np.nan  # a damaged file
    start.flush()
    del start
    assert TeacherLogitsCache.load(str(tmp_path), "k") is None
    with torch.no_grad():
        teacher.qa_outputs.bias[0] = float("nan")  # a broken teacher
    with pytest.raises(TeacherCacheError, match="teacher produced non-finite logits.*not the learning rate"):
        TeacherLogitsCache.load_or_build(str(tmp_path), "k", features, teacher, collate, progress=False)


# ----------------------------------------------------------------------------- the training run's cache policy

def test_teacher_cache_key_names_the_precision_the_teacher_runs_in(tmp_path):
    """fp32 and fp16 logits are both stored as fp16: only the teacher's precision in the key keeps
    their caches apart (and bf16's too)."""
    from kdqa.modeling import load_qa_model, load_tokenizer

    train_file = write_squad(str(tmp_path / "train.json"), make_name_task(40, seed=1, prefix="t"))
    model_dir = make_model_folder(str(tmp_path / "bert"), tiny_bert_config(dropout=0.1))
    args = parse_args(["distill", "--teacher_model_name_or_path", model_dir, "--model_name_or_path", model_dir,
                       "--train_file", train_file, "--output_dir", str(tmp_path / "o")])
    teacher, tokenizer = load_qa_model(model_dir), load_tokenizer(model_dir)
    assert cache_storage_dtype(None) == cache_storage_dtype(torch.float16)
    settings = CacheSettings(cache_dir=str(tmp_path / "cache"), window=args.window, data_files=(args.train_file,))
    keys = {dtype: teacher_cache_key(settings, teacher, tokenizer, 100, dtype)
            for dtype in (None, torch.float16, torch.bfloat16)}
    assert len(set(keys.values())) == 3, keys
    assert teacher_cache_key(settings, teacher, tokenizer, 100, None) == keys[None]


# ----------------------------------------------------------------------------- every rank builds its share

def _rank_report(cache_dir, dist):
    """What one rank sees building the caches (fp16 from a list, bf16 from a Dataset as the trainer's),
    using one again and refusing a NaN teacher."""
    from datasets import Dataset

    teacher, features, rows = _teacher(), _features(), []
    dataset = Dataset.from_list([{k: v for k, v in f.items() if k != "offset_mapping"} for f in features])
    collate = lambda batch: (rows.append(len(batch)), _collate(batch))[1]  # noqa: E731
    seen = {}
    for key, dtype, data in (("fp16", torch.float16, features), ("bf16", torch.bfloat16, dataset)):
        TeacherLogitsCache.load_or_build(cache_dir, key, data, teacher, collate, dist=dist, batch_size=3,
                                         storage_dtype=dtype, progress=False)
    seen["rows_run"] = sum(rows)
    start_file = os.path.join(cache_dir, "fp16", "start_logits.npy")
    written = os.stat(start_file).st_mtime_ns
    again = TeacherLogitsCache.load_or_build(cache_dir, "fp16", features, teacher, collate, dist=dist, batch_size=3)
    seen["reused"] = sum(rows) == seen["rows_run"] and os.stat(start_file).st_mtime_ns == written
    seen["lookup"] = again.lookup(range(len(features)), 64)[0].sum().item()
    with torch.no_grad():
        teacher.qa_outputs.bias[0] = float("nan")
    try:
        TeacherLogitsCache.load_or_build(cache_dir, "nan", features, teacher, collate, dist=dist, batch_size=3)
        seen["nan"] = "built"
    except TeacherCacheError as err:
        seen["nan"] = str(err)
    return seen


RANK_WORKER = """
import json, os, sys
sys.path.insert(0, {tests!r})
from kdqa.distributed import cleanup, init_distributed
from test_teacher_cache import _rank_report

dist = init_distributed("cpu")
report = _rank_report(sys.argv[1], dist)
with open(os.path.join(sys.argv[2], f"rank{{dist.rank}}.json"), "w") as f:
    json.dump(report, f)
cleanup(dist)
"""


def _two_ranks(tmp_path):
    """The caches built by torchrun's 2 gloo processes (1 thread each), and each rank's report."""
    script = tmp_path / "worker.py"
    script.write_text(RANK_WORKER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    cache_dir, report_dir = tmp_path / "two-ranks", tmp_path / "reports"
    report_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(cache_dir), str(report_dir)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", KDQA_TRACEBACK="1"), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cache_dir, [json.loads((report_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_gloo_ranks_build_the_one_process_cache_bit_for_bit(tmp_path):
    """torchrun with 2 CPU processes: each runs the teacher over its share of the batches only, and the
    cache they put together is byte for byte the one a single process writes (fp16 and bf16); a second
    call reuses it on every rank, and a NaN teacher is refused on every rank, leaving nothing behind."""
    from kdqa.distributed import DistState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same arithmetic
    try:
        single = tmp_path / "one-process"
        alone = _rank_report(str(single), DistState())
    finally:
        torch.set_num_threads(threads)
    shared, ranks = _two_ranks(tmp_path)
    assert alone["rows_run"] == 2 * N_FEATURES
    assert 0 < ranks[0]["rows_run"] < 2 * N_FEATURES and sum(r["rows_run"] for r in ranks) == 2 * N_FEATURES
    for key in ("fp16", "bf16"):
        for name in ("offsets.npy", "start_logits.npy", "end_logits.npy"):
            assert (single / key / name).read_bytes() == (shared / key / name).read_bytes(), (key, name)
        meta = [json.loads((folder / key / "meta.json").read_text()) for folder in (single, shared)]
        assert [dict(m, created=None) for m in meta[0:1]] == [dict(m, created=None) for m in meta[1:]]
    for report in [alone, *ranks]:
        assert report["reused"] and report["lookup"] == alone["lookup"]
        assert report["nan"].startswith("teacher logits cache: the teacher produced non-finite logits"), report
    assert ranks[0]["nan"] == ranks[1]["nan"] == alone["nan"]
    assert sorted(os.listdir(shared)) == sorted(os.listdir(single)) == ["bf16", "fp16"]
