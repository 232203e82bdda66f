"""Serve a kdqa export (`train.py export`) with plain ONNX Runtime: tokenizer, InferenceSession, span decoding.

The minimal code, with nothing of kdqa imported: only transformers' tokenizer, onnxruntime and numpy.
It answers as `train.py predict` does on the export (tests/test_serve_onnx_example.py checks it):
the same windows (questions without leading whitespace, context in windows of max_seq_length tokens
overlapping by doc_stride) and the same decoding (per window the n_best best start and end tokens
among the context tokens only, spans of at most max_answer_length tokens, best start + end logit over
all windows). One simplification: questions longer than kdqa's max_query_length (64 tokens) are not
cut here (no SQuAD dev question is that long).

    python benchmarks/serve_onnx_example.py EXPORT_DIR --question "Who ...?" --context "..."
    python benchmarks/serve_onnx_example.py EXPORT_DIR --squad dev-v1.1.json --limit 20 --out answers.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def windows(tokenizer, question: str, context: str, max_seq_length: int = 384, doc_stride: int = 128):
    """The model inputs of every window of one question, padded to the longest window (numpy int64)."""
    return tokenizer(question.lstrip(), context, truncation="only_second", max_length=max_seq_length,
                     stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                     padding=True, return_tensors="np")


def best_span(enc, context: str, start_logits, end_logits, n_best: int = 20, max_answer_length: int = 30):
    """(answer text, score = start + end logit) of the best span over all windows; ("", None) if none."""
    best_score, best = -np.inf, ("", None)
    for w in range(len(enc["input_ids"])):
        in_context = np.array([s == 1 for s in enc.sequence_ids(w)])
        start = np.where(in_context, start_logits[w], -np.inf)
        end = np.where(in_context, end_logits[w], -np.inf)
        for s in np.argsort(-start, kind="stable")[:n_best]:
            for e in np.argsort(-end, kind="stable")[:n_best]:
                score = start[s] + end[e]
                if np.isfinite(score) and 0 <= e - s < max_answer_length and score > best_score:
                    offsets = enc["offset_mapping"][w]
                    best_score, best = score, (context[offsets[s][0]:offsets[e][1]], float(score))
    return best


class OnnxQA:
    """An export folder in ONNX Runtime: answer(question, context) -> (text, score)."""

    def __init__(self, export_dir: str, max_seq_length: int = 384, doc_stride: int = 128):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(export_dir)
        self.session = ort.InferenceSession(os.path.join(export_dir, "model.onnx"), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]  # token_type_ids only where the model takes them
        self.max_seq_length, self.doc_stride = max_seq_length, doc_stride

    def logits(self, enc):
        return self.session.run(["start_logits", "end_logits"], {k: enc[k].astype(np.int64) for k in self.inputs})

    def answer(self, question: str, context: str):
        enc = windows(self.tokenizer, question, context, self.max_seq_length, self.doc_stride)
        return best_span(enc, context, *self.logits(enc))


def squad_questions(path: str, limit: int | None):
    """(id, question, context) of a SQuAD v1.1 file (official nested layout, .json or .json.gz)."""
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    rows = [(qa["id"], qa["question"], p["context"]) for a in data for p in a["paragraphs"] for qa in p["qas"]]
    return rows[:limit]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", help="a folder written by `train.py export` (model.onnx and the tokenizer)")
    p.add_argument("--question")
    p.add_argument("--context")
    p.add_argument("--squad", help="answer the questions of this SQuAD v1.1 file instead")
    p.add_argument("--limit", type=int, default=None, help="with --squad: only the first N questions")
    p.add_argument("--out", help="with --squad: write {id: answer} here (else printed)")
    p.add_argument("--max_seq_length", type=int, default=384)
    p.add_argument("--doc_stride", type=int, default=128)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.export_dir, "model.onnx")):
        p.error(f"{args.export_dir} has no model.onnx; write it with `python train.py export --model_name_or_path "
                f"MODEL --output_dir {args.export_dir}`")
    if not args.squad and not (args.question and args.context):
        p.error("give --question and --context, or --squad FILE")
    qa = OnnxQA(args.export_dir, args.max_seq_length, args.doc_stride)
    if not args.squad:
        text, score = qa.answer(args.question, args.context)
        print(json.dumps({"answer": text, "score": score}))
        return 0
    answers = {qid: qa.answer(question, context)[0] for qid, question, context in squad_questions(args.squad, args.limit)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(answers, f, indent=1)
    else:
        print(json.dumps(answers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
