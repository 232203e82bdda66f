"""Oracle test on the real SQuAD v1.1 dev set: tokenisation, offsets, windows, span decoding and
the metric checked together.

Logits that peak exactly at the first gold answer's token span must decode back to (almost) the
gold text. What is lost is only what tokenisation cannot express (an answer ending inside a word
piece, e.g. "5" of "5th") and questions whose first answer differs from the others: a careful
implementation scores about 99.7 EM / F1.
"""

import time

import datasets
import numpy as np
import pytest

from kdqa.data import load_squad_json
from kdqa.features import Window, answer_token_span, prepare_eval_features
from kdqa.metric import squad_v1_score
from kdqa.postprocess import Decoding, postprocess_qa_predictions

pytestmark = [pytest.mark.slow, pytest.mark.real_data]


def test_oracle_logits_reach_gold_on_real_dev(squad_dev_file, minilm_dir):
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    examples = load_squad_json(squad_dev_file)
    assert len(examples) == 10570
    features = prepare_eval_features(examples, tokenizer, Window(384, 128, 64))
    assert len(features) >= len(examples)

    gold = {row["id"]: row["answers"] for row in examples.select_columns(["id", "answers"])}
    feature_ids = features["example_id"]
    offsets_col = features["offset_mapping"]
    starts, ends = [], []
    windows_with_answer = set()
    for example_id, offsets in zip(feature_ids, offsets_col):
        n = len(offsets)
        start_logits = np.zeros(n, dtype=np.float32)
        end_logits = np.zeros(n, dtype=np.float32)
        answers = gold[example_id]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        sequence_ids = [1 if o is not None else 0 for o in offsets]
        sequence_ids[0] = None  # the decoder only needs context vs not; CLS is never context
        filled = [o if o is not None else (0, 0) for o in offsets]
        span = answer_token_span(filled, sequence_ids, start_char, end_char)
        if span is not None:
            start_logits[span[0]] = 10.0
            end_logits[span[1]] = 10.0
            windows_with_answer.add(example_id)
        # Padding past the feature's length must be ignored by the decoder.
        starts.append(np.concatenate([start_logits, np.full(5, 100.0, np.float32)]))
        ends.append(np.concatenate([end_logits, np.full(5, 100.0, np.float32)]))
    assert len(windows_with_answer) == len(examples)

    t_decode = time.perf_counter()
    predictions = postprocess_qa_predictions(examples, features, starts, ends, Decoding(n_best_size=20, max_answer_length=30))
    t_decode = time.perf_counter() - t_decode
    scores = squad_v1_score(examples, predictions)
    elapsed = time.perf_counter() - t0
    print(f"oracle on SQuAD dev: EM {scores['exact_match']:.2f} F1 {scores['f1']:.2f} "
          f"({len(features)} features, decoding {t_decode:.1f} s, all {elapsed:.1f} s)")
    assert scores["total"] == 10570 and scores["missing"] == 0
    assert scores["exact_match"] >= 99.5
    assert scores["f1"] >= 99.6
