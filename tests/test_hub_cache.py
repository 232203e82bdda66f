"""The recipe's hub names without internet (issue 25): models and the `squad` dataset read from a
pre-filled Hugging Face cache, a name given explicitly never replaced, the embedded defaults only
where a default name is neither on the hub nor in the cache.

The caches are built here, offline: tiny random models saved under the hub names in the hub cache
layout (models--NAME/snapshots/REV/ and refs/main), and a tiny `squad` written by datasets' own
builder where `load_dataset("squad")` leaves it (squad/plain_text/0.0.0/HASH/)."""

import json
import logging
import os
import subprocess
import sys

import pytest

import kdqa.recipe as recipe
from kdqa.config import parse_args
from kdqa.data import SquadDataError, load_squad
from kdqa.modeling import ModelLoadError
from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REVISION = "0123456789abcdef0123456789abcdef01234567"
N_TRAIN, N_DEV = 24, 10
TINY = ["--max_train_samples", str(N_TRAIN), "--max_seq_length", "64", "--doc_stride", "32",
        "--max_eval_samples", "12", "--speed_test_questions", "2", "--teacher_num_train_epochs", "1",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--loss_impl", "torch", "--disable_tqdm"]


def cache_hub_model(hub: str, name: str, kind: str) -> str:
    """A tiny random model saved as `hf download NAME` leaves it in the hub cache."""
    repo = os.path.join(hub, "models--" + name.replace("/", "--"))
    config = tiny_bert_config() if kind == "bert" else None
    make_model_folder(os.path.join(repo, "snapshots", REVISION), config, seed=5, kind=kind)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(REVISION)
    return repo


def cache_squad(datasets_cache: str, n_train: int = N_TRAIN, n_dev: int = N_DEV) -> None:
    """A tiny `squad` where load_dataset('squad') leaves the hub's: datasets' own builder writes it."""
    import datasets
    import pyarrow as pa

    from kdqa.data import SQUAD_FEATURES

    class Squad(datasets.ArrowBasedBuilder):
        BUILDER_CONFIGS = [datasets.BuilderConfig(name="plain_text", version=datasets.Version("0.0.0"))]

        def _info(self):
            return datasets.DatasetInfo(features=SQUAD_FEATURES)

        def _split_generators(self, dl_manager):
            return [datasets.SplitGenerator(name="train", gen_kwargs={"n": n_train, "seed": 1, "prefix": "t"}),
                    datasets.SplitGenerator(name="validation", gen_kwargs={"n": n_dev, "seed": 2, "prefix": "d"})]

        def _generate_tables(self, n, seed, prefix):
            rows = make_name_task(n, seed=seed, prefix=prefix)
            columns = {key: [row[key] for row in rows] for key in rows[0]}
            yield 0, pa.Table.from_pydict(columns, schema=SQUAD_FEATURES.arrow_schema)

    Squad(cache_dir=datasets_cache, dataset_name="squad", hash="0123456789abcdef").download_and_prepare()


@pytest.fixture()
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face cache, no hub (HF_HUB_OFFLINE=1), no data folder: this process looks only there."""
    import datasets
    import huggingface_hub

    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    (home / "datasets").mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KDQA_DATA_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))  # both read at import
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    checkout = tmp_path / "work" / "repo"
    checkout.mkdir(parents=True)
    monkeypatch.setattr("kdqa.datafiles.REPO_ROOT", checkout)
    return home


def _env(home) -> dict:
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("KDQA_DATA_DIR", None)
    for key in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_recipe_trains_the_cached_seed_models_on_the_cached_squad_offline(hf_home, tmp_path):
    """The user's run on a compute node: the seed's names in a pre-filled cache, HF_HUB_OFFLINE=1, no flags."""
    cache_hub_model(str(hf_home / "hub"), "bert-base-uncased", "bert")
    cache_hub_model(str(hf_home / "hub"), "distilbert-base-uncased", "distilbert")
    cache_squad(str(hf_home / "datasets"))
    out = tmp_path / "recipe"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--output_dir", str(out)] + TINY,
                          cwd=tmp_path, capture_output=True, text=True, env=_env(hf_home), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert f"teacher: bert-base-uncased from the local hub cache ({hf_home / 'hub'})" in log
    assert "student: distilbert-base-uncased from the local hub cache" in log
    assert f"data: the hub dataset 'squad' from the datasets cache ({hf_home / 'datasets'})" in log
    assert "all-MiniLM" not in log + proc.stdout and "layers 0,2,4" not in log
    assert "couldn't be found on the Hugging Face Hub" not in log  # datasets' four lines a load: kdqa says one

    table = (out / "recipe_results.md").read_text()
    assert "| teacher (bert-base-uncased, 1 epoch) |" in table
    assert "| student (distilbert-base-uncased, fine-tuned 1 epoch) |" in table
    assert "| distilled student (distilbert-base-uncased, distilled 1 epoch) |" in table
    teacher_args = json.loads((out / "teacher" / "training_args.json").read_text())
    assert teacher_args["model_name_or_path"] == "bert-base-uncased" and teacher_args["train_file"] is None
    assert json.loads((out / "student" / "config.json").read_text())["model_type"] == "distilbert"
    assert json.loads((out / "teacher" / "eval_results.json").read_text())["total"] == N_DEV  # the cached dev set
    assert "given_flags" not in teacher_args


def test_an_explicit_hub_name_found_nowhere_is_one_error_not_a_fallback(hf_home, tmp_path, caplog):
    cache_hub_model(str(hf_home / "hub"), "distilbert-base-uncased", "distilbert")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"teacher_model_name_or_path": "bert-base-uncased"}))
    for argv in (["--teacher_model_name_or_path", "bert-base-uncased"], ["--config", str(config)]):
        args = parse_args(argv + ["--output_dir", str(tmp_path / "r")])
        with caplog.at_level(logging.INFO, logger="kdqa"), pytest.raises(ModelLoadError) as err:
            recipe.run_recipe(args)
        message = str(err.value)
        assert "\n" not in message
        assert "the teacher 'bert-base-uncased' (--teacher_model_name_or_path)" in message
        assert "hf download bert-base-uncased" in message and "--teacher_model_name_or_path DIR" in message
        assert str(hf_home / "hub") in message
        assert "distilbert" not in message  # the cached student is not what is missing
        assert "all-MiniLM" not in caplog.text
        assert args.teacher_model_name_or_path == "bert-base-uncased"


def test_a_default_name_not_cached_falls_back_and_the_banner_says_why(hf_home, tmp_path, monkeypatch):
    """The teacher is cached, the student and the dataset are not: only those two fall back."""
    cache_hub_model(str(hf_home / "hub"), "bert-base-uncased", "bert")
    data = tmp_path / "work" / "repo" / "data" / "squad"
    data.mkdir(parents=True)
    write_squad(str(data / "train-v1.1.json"), make_name_task(8, seed=1))
    write_squad(str(data / "dev-v1.1.json"), make_name_task(4, seed=2))
    args = parse_args(["--output_dir", str(tmp_path / "r")])
    banner = []
    recipe.choose_models_and_data(args, banner, recipe.recipe_defaults(), set(args.given_flags))
    text = "\n".join(banner)
    assert args.teacher_model_name_or_path == "bert-base-uncased"
    assert f"teacher: bert-base-uncased from the local hub cache ({hf_home / 'hub'})" in text
    assert args.student_layers == "0,2,4"
    assert ("student: layers 0,2,4 of the teacher (as DistilBERT was built), because the hub is unreachable for "
            f"distilbert-base-uncased and the local hub cache ({hf_home / 'hub'}) does not hold it") in text
    assert args.train_file == str(data / "train-v1.1.json")
    assert ("because the hub is unreachable for the dataset 'squad' and the datasets cache "
            f"({hf_home / 'datasets'}) does not hold it") in text


def test_an_explicit_dataset_name_not_cached_is_an_error_not_local_files(hf_home, tmp_path):
    cache_hub_model(str(hf_home / "hub"), "bert-base-uncased", "bert")
    cache_hub_model(str(hf_home / "hub"), "distilbert-base-uncased", "distilbert")
    data = tmp_path / "work" / "repo" / "data" / "squad"
    data.mkdir(parents=True)
    write_squad(str(data / "train-v1.1.json"), make_name_task(8, seed=1))
    write_squad(str(data / "dev-v1.1.json"), make_name_task(4, seed=2))
    args = parse_args(["--dataset_name", "squad", "--output_dir", str(tmp_path / "r")])
    with pytest.raises(ModelLoadError, match=r"the dataset 'squad' \(--train_file and --validation_file\).*"
                                             r"datasets\.load_dataset\('squad'\)"):
        recipe.choose_models_and_data(args, [], recipe.recipe_defaults(), set(args.given_flags))
    assert args.train_file is None


def test_hub_dataset_is_read_from_the_datasets_cache_without_asking_the_hub(hf_home, monkeypatch):
    """Hub unreachable but HF_HUB_OFFLINE not set for datasets: it must read its cache, not try the hub."""
    import datasets
    import datasets.load

    import kdqa.modeling

    with pytest.raises(SquadDataError, match=r"nor does the datasets cache .* hold it.*load_dataset\('squad'\)"):
        load_squad()
    cache_squad(str(hf_home / "datasets"), n_train=6, n_dev=3)
    monkeypatch.setattr(kdqa.modeling, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    asked = []

    class NoHub(datasets.load.HfApi):  # records every question to the hub, and fails it as no network would
        def hf_hub_download(self, *args, **kwargs):
            asked.append(kwargs)
            raise ConnectionError("the hub was asked")

        dataset_info = hf_hub_download

    monkeypatch.setattr(datasets.load, "HfApi", NoHub)
    loaded = load_squad()
    assert (len(loaded["train"]), len(loaded["validation"])) == (6, 3)
    assert loaded["validation"][0]["id"] == "d0" and asked == []
    assert datasets.config.HF_HUB_OFFLINE is False  # offline mode was set for that load only


@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_cached_model_without_tokenizer_files_is_refused_as_a_folder_is(hf_home, tmp_path, capsys, command):
    """Issue 34 §5: a folder without tokenizer files was refused, the same model in the hub cache answered
    (with transformers' 5-token [UNK] tokenizer). One rule: the cached name is checked as its snapshot folder."""
    import train as train_py

    snapshot = os.path.join(cache_hub_model(str(hf_home / "hub"), "org/tiny-qa", "bert"), "snapshots", REVISION)
    argv = {"predict": ["predict", "--question", "who is here", "--context", "n1 w2 ."],
            "export": ["export", "--output_dir", str(tmp_path / "onnx")]}[command]
    argv = argv[:1] + ["--model_name_or_path", "org/tiny-qa", "--max_seq_length", "48", "--doc_stride", "16"] + argv[1:]
    if command == "predict":
        assert train_py.main(argv) == 0, capsys.readouterr().err  # the whole cached model answers
        assert "answer:" in capsys.readouterr().out
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(snapshot, name))
    assert train_py.main(argv) == 1
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("[kdqa]") and "%|" not in line]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "org/tiny-qa in the local hub cache" in err[0] and snapshot in err[0]
    assert "holds only special tokens" in err[0] and "hf download org/tiny-qa" in err[0]
    assert "answer:" not in captured.out and not (tmp_path / "onnx" / "model.onnx").exists()


def test_a_cached_snapshot_is_named_by_its_hub_name(hf_home):
    from kdqa.modeling import cached_snapshot, short_model_name

    assert cached_snapshot("org/tiny-qa") is None
    snapshot = os.path.join(cache_hub_model(str(hf_home / "hub"), "org/tiny-qa", "bert"), "snapshots", REVISION)
    assert cached_snapshot("org/tiny-qa") == snapshot and short_model_name(snapshot) == "org/tiny-qa"
    os.remove(os.path.join(snapshot, "model.safetensors"))  # a cache without the weights does not hold the model
    assert cached_snapshot("org/tiny-qa") is None


def test_a_truncated_cached_model_says_fetch_it_again(hf_home, tmp_path, capsys):
    import train as train_py

    snapshot = os.path.join(cache_hub_model(str(hf_home / "hub"), "org/tiny-qa", "bert"), "snapshots", REVISION)
    weights = os.path.join(snapshot, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[:len(data) // 2])
    assert train_py.main(["predict", "--model_name_or_path", "org/tiny-qa", "--question", "who", "--context", "n1 ."]) == 1
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not line.startswith("[kdqa]") and "%|" not in line]
    assert len(err) == 1 and f"{weights} is damaged or truncated" in err[0]
    assert "hf download org/tiny-qa --force-download" in err[0]
