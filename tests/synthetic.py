"""Synthetic SQuAD v1.1 data and a tiny offline tokenizer for tests.

All text is made up here (random words from a made-up word list), so tests need neither the real
dataset nor the hub. Other test files may import this module:

- make_examples(n, ...)           flat examples (id, title, context, question, answers)
- to_squad_json(examples)         the official nested JSON layout of flat examples
- write_squad_json(path, examples, gz=False)
- make_tokenizer()                a fast BERT-style WordPiece tokenizer over the made-up words
"""

from __future__ import annotations

import gzip
import json
import random
import string

# Made-up words. Those in WHOLE_WORDS are single vocabulary entries; the others are split by
# WordPiece into pieces, so answers often start or end inside multi-piece words.
WORDS = [
    "zorbal", "quinta", "mervick", "plantok", "sulva", "drimmet", "orvane", "keltish", "bramwyn", "tuvalo",
    "fennix", "gorrum", "hestral", "ivory", "jaspen", "kolvar", "lumet", "narwick", "opaline", "pellor",
    "rastin", "sorrel", "tamber", "umbrel", "vastow", "wexley", "yarrow", "zephyr", "cobalt", "delvin",
    "erskine", "farrow", "glimmer", "harlow", "ingram", "juniper", "kestrel", "larkin", "mosswood", "nettle",
    "the", "a", "an", "of", "in", "and", "to", "was", "by", "for",
]
WHOLE_WORDS = set(WORDS[::2]) | {"the", "a", "an", "of", "in", "and", "to", "was", "by", "for"}
NUMBERS = ["1204", "17", "3rd", "1999", "42", "8"]
PUNCTUATION = list(",.;:!?'\"()-")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) if rng.random() > 0.1 else rng.choice(NUMBERS) for _ in range(n_words)]
    words[0] = words[0].capitalize()
    if n_words > 4 and rng.random() < 0.5:
        words[rng.randrange(1, n_words - 1)] += ","
    return " ".join(words) + rng.choice([".", ".", ".", "!", "?"])


def make_context(rng: random.Random, n_words: int) -> str:
    sentences, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(4, 12))
        sentences.append(_sentence(rng, k))
        left -= k
    return " ".join(sentences)


def _answer_span(rng: random.Random, context: str, max_words: int) -> tuple[str, int]:
    """A run of 1..max_words whole words of the context, without surrounding punctuation."""
    positions = []  # (start, end) of each whitespace-separated word, punctuation trimmed
    start = None
    for i, ch in enumerate(context + " "):
        if ch != " " and start is None:
            start = i
        elif ch == " " and start is not None:
            s, e = start, i
            while s < e and context[s] in string.punctuation:
                s += 1
            while e > s and context[e - 1] in string.punctuation:
                e -= 1
            if e > s:
                positions.append((s, e))
            start = None
    first = rng.randrange(len(positions))
    last = min(len(positions) - 1, first + rng.randrange(max_words))
    s, e = positions[first][0], positions[last][1]
    return context[s:e], s


def make_examples(
    n: int = 20,
    seed: int = 0,
    min_context_words: int = 10,
    max_context_words: int = 60,
    max_answer_words: int = 4,
    n_answers: int = 1,
    question_words: tuple[int, int] = (3, 10),
    title: str = "Synthetic_article",
    id_prefix: str = "syn",
) -> list[dict]:
    """n flat SQuAD examples with made-up text; every answer_start points at its text.

    n_answers > 1 gives further gold answers (other spans of the same context), as dev has.
    """
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        context = make_context(rng, rng.randint(min_context_words, max_context_words))
        texts, starts = [], []
        for _ in range(n_answers):
            text, start = _answer_span(rng, context, max_answer_words)
            texts.append(text)
            starts.append(start)
        question = "What " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*question_words))) + "?"
        examples.append(
            {
                "id": f"{id_prefix}-{i:05d}",
                "title": title if i % 7 else f"{title}_{i // 7}",
                "context": context,
                "question": question,
                "answers": {"text": texts, "answer_start": starts},
            }
        )
    return examples


def to_squad_json(examples: list[dict], version: str = "1.1") -> dict:
    """The official nested layout; consecutive examples with the same title and context share a
    paragraph, as in the real files."""
    data = []
    for ex in examples:
        if not data or data[-1]["title"] != ex["title"]:
            data.append({"title": ex["title"], "paragraphs": []})
        paragraphs = data[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != ex["context"]:
            paragraphs.append({"context": ex["context"], "qas": []})
        answers = [{"text": t, "answer_start": s} for t, s in zip(ex["answers"]["text"], ex["answers"]["answer_start"])]
        paragraphs[-1]["qas"].append({"id": ex["id"], "question": ex["question"], "answers": answers})
    return {"version": version, "data": data}


def write_squad_json(path, examples, gz: bool = False) -> str:
    """Write flat examples (or an already nested dict) as SQuAD JSON; gzip when gz=True."""
    payload = examples if isinstance(examples, dict) else to_squad_json(examples)
    raw = json.dumps(payload).encode("utf-8")
    path = str(path)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(raw) if gz else raw)
    return path


def tokenizer_vocab() -> list[str]:
    pieces = set(string.ascii_lowercase) | set(string.digits) | set(PUNCTUATION)
    vocab = list(SPECIALS)
    vocab += sorted(pieces)
    vocab += ["##" + c for c in sorted(set(string.ascii_lowercase) | set(string.digits))]
    vocab += sorted(WHOLE_WORDS | {"what", "##rd"})
    vocab += ["zor", "##bal", "mer", "##vick", "##ow", "##el"]  # a few multi-letter pieces
    return list(dict.fromkeys(vocab))


def make_tokenizer(with_token_type_ids: bool = True):
    """A fast, lower-casing BERT-style WordPiece tokenizer over the made-up words (offline)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tokenizer_vocab())}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    names = ["input_ids", "token_type_ids", "attention_mask"] if with_token_type_ids else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=names,
    )
