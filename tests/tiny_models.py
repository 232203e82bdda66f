"""Tiny models, a tiny tokenizer and a learnable synthetic QA task for CPU tests of the loop.

The task: a context of filler words holds exactly one "name" word; the question asks for the name.
A 2-layer BERT with hidden size 32 learns it in a few hundred steps, so F1 rises far above chance.
"""

from __future__ import annotations

import gzip
import json
import os
import random

FILLER = [f"w{i}" for i in range(60)]
NAMES = [f"n{i}" for i in range(20)]
QUESTION_WORDS = ["who", "is", "named", "here", "what", "name"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + ["."] + QUESTION_WORDS + FILLER + NAMES


def make_tokenizer(folder: str | None = None):
    """A fast WordPiece tokenizer over VOCAB, with BERT's [CLS] q [SEP] c [SEP] template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {t: i for i, t in enumerate(VOCAB)}
    backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
    )
    if folder:
        tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_bert_config(layers: int = 2, dropout: float = 0.1, **overrides):
    from transformers import BertConfig

    values = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout)
    values.update(overrides)
    return BertConfig(**values)


def make_model_folder(folder: str, config=None, seed: int = 0, kind: str = "bert") -> str:
    """Save a randomly initialised QA model (BERT or DistilBERT) and the tiny tokenizer to `folder`."""
    import torch
    from transformers import (BertForQuestionAnswering, DistilBertConfig, DistilBertForQuestionAnswering)

    torch.manual_seed(seed)
    if kind == "distilbert":
        config = config or DistilBertConfig(vocab_size=len(VOCAB), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=128, dropout=0.0, attention_dropout=0.0)
        model = DistilBertForQuestionAnswering(config)
    else:
        model = BertForQuestionAnswering(config or tiny_bert_config())
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def make_name_task(n: int, seed: int = 0, prefix: str = "q") -> list[dict]:
    """n examples of the learnable task, flat SQuAD schema, answer_start correct."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(8, 30))]
        name = rng.choice(NAMES)
        pos = rng.randint(0, len(words))
        words.insert(pos, name)
        context = " ".join(words) + " ."
        start = len(" ".join(words[:pos])) + (1 if pos else 0)
        assert context[start:start + len(name)] == name
        question = rng.choice(["who is named here", "what name is here", "who is here"])
        examples.append({"id": f"{prefix}{i}", "title": "names", "context": context, "question": question,
                         "answers": {"text": [name], "answer_start": [start]}})
    return examples


def write_squad(path: str, examples: list[dict]) -> str:
    """Write flat examples in SQuAD v1.1's official JSON layout (.json or .json.gz)."""
    paragraphs = []
    for ex in examples:
        answers = [{"text": t, "answer_start": s} for t, s in zip(ex["answers"]["text"], ex["answers"]["answer_start"])]
        paragraphs.append({"context": ex["context"],
                           "qas": [{"id": ex["id"], "question": ex["question"], "answers": answers}]})
    payload = {"version": "1.1", "data": [{"title": "names", "paragraphs": paragraphs}]}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        json.dump(payload, f)
    return path


# Tiny QA models of each family kdqa.model_adapter names, built from configs (no folder, no weights file).
TINY_FAMILY_CONFIGS = {
    "bert": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, pad_token_id=1),
    "xlm-roberta": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, pad_token_id=1),
    "electra": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, embedding_size=16),  # projected
    "distilbert": dict(dim=32, n_heads=2, hidden_dim=64),
}


def tiny_qa_model(model_type: str, layers: int = 2, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """A randomly initialised QA model of `model_type` (a key of TINY_FAMILY_CONFIGS), no dropout."""
    import torch
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    values = dict(TINY_FAMILY_CONFIGS[model_type], vocab_size=len(VOCAB), max_position_embeddings=130)
    if model_type == "distilbert":
        values.update(n_layers=layers, dropout=0.0, attention_dropout=0.0)
    else:
        values.update(num_hidden_layers=layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    values.update(overrides)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **values)
    return AutoModelForQuestionAnswering.from_config(config, attn_implementation=attn_implementation)
