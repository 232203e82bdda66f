"""Which dev questions a cut evaluation scores (--max_eval_samples N, the CPU preset, the speed test).

SQuAD's dev file is ordered by article, so its first N questions are a handful of topics (the first
500 of v1.1 all ask about one article, the first 1,000 about two): scores on them describe those topics, not the dev set. The default
sample is N questions spread evenly over the whole file (question floor(i * total / N) for
i = 0..N-1): every article contributes in proportion to its size, and the same N picks the same
questions for every model and every run, with no seed to keep. A smaller spread sample of the same
file lies inside a larger one whenever the larger N is a multiple of the smaller (the speed test's
100 are among the scored 500). `first` keeps run_qa.py's behaviour: the first N questions.
"""

from __future__ import annotations

from dataclasses import dataclass

EVAL_SAMPLES = ("spread", "first")
DEFAULT_EVAL_SAMPLE = "spread"
EVAL_SAMPLE_HELP = {
    "spread": "N questions spread evenly over the whole file (the default)",
    "first": "the first N questions, as run_qa.py takes them",
}
EVAL_SAMPLE_WORDS = {"spread": "spread over the dev set", "first": "the first ones"}


def sample_indices(total: int, n: int | None, how: str = DEFAULT_EVAL_SAMPLE) -> list[int]:
    """The positions of the sampled questions among `total`, in file order; all of them where n is
    None or not below total."""
    if how not in EVAL_SAMPLES:
        raise ValueError(f"unknown evaluation sample {how!r}: choose one of {', '.join(EVAL_SAMPLES)}")
    if n is None or n >= total:
        return list(range(total))
    if how == "first":
        return list(range(n))
    return [i * total // n for i in range(n)]


@dataclass(frozen=True)
class DevSample:
    """What a scored set of questions is, for the log, report.md and the model card."""

    questions: int
    of: int
    how: str  # "all", "spread" or "first"
    articles: int | None = None
    of_articles: int | None = None

    def text(self) -> str:
        """"500 of 10,570 dev questions, spread evenly over the file (48 of 48 articles)"."""
        if self.how == "all":
            what = f"all {self.of:,} dev questions"
        elif self.how == "first":
            what = f"the first {self.questions:,} of {self.of:,} dev questions"
        else:
            what = f"{self.questions:,} of {self.of:,} dev questions, spread evenly over the file"
        if self.articles is not None and self.of_articles is not None:
            what += f" ({self.articles} of {self.of_articles} articles)"
        return what

    def split(self) -> str:
        """The model-index split: `validation`, or `validation[:N]` for the first N (the hub's slice
        notation; a spread sample has none, the card's dataset name and text say which it is)."""
        return f"validation[:{self.questions}]" if self.how == "first" else "validation"

    def as_dict(self) -> dict:
        return {"questions": self.questions, "of": self.of, "how": self.how, "articles": self.articles,
                "of_articles": self.of_articles, "split": self.split(), "text": self.text()}


def _titles(examples) -> list | None:
    if isinstance(examples, list):
        return [row.get("title") for row in examples] if examples and "title" in examples[0] else None
    return list(examples["title"]) if "title" in getattr(examples, "column_names", ()) else None


def take_sample(examples, n: int | None, how: str = DEFAULT_EVAL_SAMPLE):
    """(the sampled examples, their DevSample): `examples` is a datasets.Dataset or a list of rows."""
    total = len(examples)
    indices = sample_indices(total, n, how)
    titles = _titles(examples)
    picked = examples.select(indices) if hasattr(examples, "select") else [examples[i] for i in indices]
    sample = DevSample(questions=len(indices), of=total, how="all" if len(indices) == total else how,
                       articles=None if titles is None else len({titles[i] for i in indices}),
                       of_articles=None if titles is None else len(set(titles)))
    return picked, sample
