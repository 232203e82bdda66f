"""Serve a kdqa export (`train.py export`) with Optimum's ORTModelForQuestionAnswering.

Optimum needs transformers < 4.58 and kdqa runs transformers 5, so this runs in an environment of its
own, with nothing of kdqa installed (the windows and span decoding come from serve_onnx_example.py,
beside this file):

    python -m venv optimum-env && . optimum-env/bin/activate
    pip install torch==2.13.0 && pip install "optimum[onnxruntime]" "transformers<4.58"
    python benchmarks/serve_optimum_example.py EXPORT_DIR --squad dev-v1.1.json --limit 20 --out answers.json

Per question it prints nothing and writes {id: answer}: kdqa's decoding on Optimum's logits (the
answers of `train.py predict`), or with --pipeline transformers' question-answering pipeline on the
Optimum model (its own decoding: softmax scores, an answer of at most --max_answer_length tokens).
--check_logits also runs a plain InferenceSession on the same windows and prints the largest
difference of its logits from Optimum's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_onnx_example import OnnxQA, best_span, squad_questions, windows  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", help="a folder written by `train.py export` (model.onnx, config.json, tokenizer)")
    p.add_argument("--squad", required=True, help="SQuAD v1.1 file whose questions to answer")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--out", required=True, help="write {id: answer} here")
    p.add_argument("--pipeline", action="store_true", help="decode with transformers' question-answering pipeline")
    p.add_argument("--max_answer_length", type=int, default=30)
    p.add_argument("--check_logits", action="store_true", help="print max |Optimum - plain ONNX Runtime| logit")
    args = p.parse_args(argv)

    from optimum.onnxruntime import ORTModelForQuestionAnswering
    from transformers import AutoTokenizer, pipeline

    model = ORTModelForQuestionAnswering.from_pretrained(args.export_dir, file_name="model.onnx")
    tokenizer = AutoTokenizer.from_pretrained(args.export_dir)
    rows = squad_questions(args.squad, args.limit)
    if args.pipeline:
        qa = pipeline("question-answering", model=model, tokenizer=tokenizer)
        answers = {qid: qa(question=q, context=c, max_answer_len=args.max_answer_length, max_seq_len=384,
                           doc_stride=128)["answer"] for qid, q, c in rows}
    else:
        plain = OnnxQA(args.export_dir) if args.check_logits else None
        answers, worst = {}, 0.0
        for qid, question, context in rows:
            enc = windows(tokenizer, question, context)
            out = model(**{k: enc[k].astype(np.int64) for k in model.input_names})
            start, end = np.asarray(out.start_logits), np.asarray(out.end_logits)
            answers[qid] = best_span(enc, context, start, end, max_answer_length=args.max_answer_length)[0]
            if plain is not None:
                ref = plain.logits(enc)
                real = enc["attention_mask"].astype(bool)
                worst = max(worst, float(np.abs(start - ref[0])[real].max()), float(np.abs(end - ref[1])[real].max()))
        if plain is not None:
            print(f"max |Optimum - plain ONNX Runtime| logit over {len(rows)} questions: {worst:.3g}")
    with open(args.out, "w") as f:
        json.dump(answers, f, indent=1)
    print(f"wrote {len(answers)} answers to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
