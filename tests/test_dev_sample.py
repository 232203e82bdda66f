"""Which dev questions a cut evaluation scores (issue 33): N questions spread over the whole file by
default, the same ones for every model and run; the first N with --eval_sample first."""

import json
import os
import subprocess
import sys

import pytest

from kdqa.config import parse_args
from kdqa.data import load_squad
from kdqa.dev_sample import sample_indices, take_sample
from kdqa.speedtest import speed_test
from synthetic import make_examples, write_squad_json
from tiny_models import make_model_folder, make_name_task, make_tokenizer, tiny_bert_config, write_squad


def _articles(n_articles: int, per_article: int) -> list[dict]:
    """Flat rows ordered by article, as SQuAD's files are."""
    return [{"id": f"a{a}q{q}", "title": f"article {a}", "question": "?", "context": "."}
            for a in range(n_articles) for q in range(per_article)]


def test_spread_sample_covers_every_article_in_proportion_and_first_covers_the_first():
    rows = _articles(40, 25)  # 1,000 questions in 40 articles
    spread, sample = take_sample(rows, 200, "spread")
    assert sample.questions == 200 and sample.of == 1000 and sample.articles == 40 == sample.of_articles
    per_article = {}
    for row in spread:
        per_article[row["title"]] = per_article.get(row["title"], 0) + 1
    assert set(per_article.values()) == {5}  # 25 questions an article, one in five taken from each
    first, first_sample = take_sample(rows, 200, "first")
    assert [r["id"] for r in first] == [r["id"] for r in rows[:200]] and first_sample.articles == 8
    assert "spread evenly" in sample.text() and "(40 of 40 articles)" in sample.text()
    assert first_sample.text().startswith("the first 200 of 1,000") and first_sample.split() == "validation[:200]"


def test_sample_is_the_whole_file_when_n_is_absent_or_too_large():
    rows = _articles(3, 4)
    for n in (None, 12, 50):
        picked, sample = take_sample(rows, n, "spread")
        assert picked == rows and sample.how == "all" and sample.text() == "all 12 dev questions (3 of 3 articles)"
    with pytest.raises(ValueError, match="unknown evaluation sample 'random'"):
        sample_indices(10, 3, "random")


def test_a_smaller_spread_sample_lies_inside_a_larger_multiple():
    """The speed test's 100 questions are among the scored 500 (same file, 5 x 100)."""
    for total in (10570, 997, 1000):
        assert set(sample_indices(total, 100)) <= set(sample_indices(total, 500))
        assert len(set(sample_indices(total, 500))) == 500


def test_the_same_questions_in_another_process(tmp_path):
    path = write_squad_json(str(tmp_path / "dev.json"), make_examples(300, seed=5))
    code = ("import sys, json; from kdqa.data import load_squad; from kdqa.dev_sample import take_sample; "
            "dev = load_squad(validation_file=sys.argv[1], splits=('validation',))['validation']; "
            "print(json.dumps(list(take_sample(dev, 37)[0]['id'])))")
    runs = [json.loads(subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                                      check=True).stdout) for _ in range(2)]
    here = list(take_sample(load_squad(validation_file=path, splits=("validation",))["validation"], 37)[0]["id"])
    assert runs[0] == runs[1] == here and len(here) == 37


def test_real_dev_set_spread_sample_covers_all_48_articles(squad_dev_file):
    dev = load_squad(validation_file=squad_dev_file, splits=("validation",))["validation"]
    _, spread = take_sample(dev, 500, "spread")
    _, first = take_sample(dev, 500, "first")
    assert (spread.of, spread.articles, spread.of_articles) == (10570, 48, 48)
    assert first.articles == 1  # the first 500 questions all ask about one article


def test_speed_test_times_spread_questions(monkeypatch):
    import transformers

    import kdqa.speedtest as speedtest

    rows = _articles(10, 10)
    for row in rows:
        row.update(question="who is named here", context="alice met bob .")
    timed = {}

    def record(predictors, picked, **kwargs):
        timed["ids"] = [r["id"] for r in picked]
        return {name: {"wall_s": 1.0} for name in predictors}

    monkeypatch.setattr(speedtest, "answer_in_turns", record)
    model = transformers.AutoModelForQuestionAnswering.from_config(tiny_bert_config())
    speed_test({"m": (model, make_tokenizer())}, rows, 10, progress=False)
    assert timed["ids"] == [f"a{a}q0" for a in range(10)]  # one question of each article, not article 0's ten
    speed_test({"m": (model, make_tokenizer())}, rows, 10, sample="first", progress=False)
    assert timed["ids"] == [f"a0q{q}" for q in range(10)]


def test_help_names_the_default_sample():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["finetune", "--help"])
    assert "spread: N questions spread evenly over the whole file (the default)" in " ".join(out.getvalue().split())


def _finetune(task, out, *extra):
    import kdqa.trainer as trainer

    model = make_model_folder(str(out) + "-model", tiny_bert_config(dropout=0.0))
    argv = ["finetune", "--model_name_or_path", model, "--train_file", task["train"], "--validation_file",
            task["dev"], "--output_dir", str(out), "--max_seq_length", "64", "--doc_stride", "32", "--loss_impl",
            "torch", "--disable_tqdm", "--num_train_epochs", "1", "--max_train_samples", "32",
            "--per_device_train_batch_size", "16", "--max_eval_samples", "10", *extra]
    return trainer.train(parse_args(argv))


def test_training_scores_the_spread_sample_and_says_so(tmp_path):
    dev_rows = make_name_task(60, seed=2, prefix="d")
    task = {"train": write_squad(str(tmp_path / "train.json"), make_name_task(40, seed=1, prefix="t")),
            "dev": write_squad(str(tmp_path / "dev.json"), dev_rows)}
    _finetune(task, tmp_path / "spread")
    _finetune(task, tmp_path / "first", "--eval_sample", "first")
    with open(tmp_path / "spread" / "eval_predictions.json", encoding="utf-8") as f:
        assert sorted(json.load(f)) == sorted(f"d{i}" for i in range(0, 60, 6))
    with open(tmp_path / "first" / "eval_predictions.json", encoding="utf-8") as f:
        assert sorted(json.load(f)) == sorted(f"d{i}" for i in range(10))
    with open(tmp_path / "spread" / "report.md", encoding="utf-8") as f:
        assert "10 of 60 dev questions, spread evenly over the file" in f.read()
    with open(tmp_path / "first" / "README.md", encoding="utf-8") as f:
        card = f.read()
    assert "split: validation[:10]" in card and "the first 10 of 60 dev questions" in card
    assert os.path.isfile(tmp_path / "spread" / "README.md")
