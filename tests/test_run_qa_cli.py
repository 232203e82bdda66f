"""Issue 24 §2: run_qa.py's command line unchanged, TrainingArguments' flag forms, HF's output shapes."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import train
from kdqa import checkpoint as ckpt
from kdqa.argv_config import subparsers as _subparsers
from kdqa.config import ConfigError, build_parser, parse_args
from kdqa.resume_settings import check_resume_settings, run_settings
from test_reliability import comparable_log, tiny_run_inputs
from log_capture import root_log


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("runqa"), 16, 4)


def hf_argv(setup, out, *extra):
    """HF's question-answering README command, with local files (16 questions, batch 4: 4 steps an epoch)."""
    return ["--model_name_or_path", setup["student"], "--train_file", setup["train"], "--validation_file",
            setup["dev"], "--do_train", "--do_eval", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--num_train_epochs", "1", "--max_seq_length", "48", "--doc_stride", "16", "--output_dir", str(out),
            "--loss_impl", "torch", "--disable_tqdm", "--logging_steps", "1", "--report_to", "none", *map(str, extra)]


def main(capsys, argv):
    code = train.main(list(argv))
    return code, capsys.readouterr().err


def one_error_line(err):
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def read_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------- which command a run_qa.py line runs

def test_a_run_qa_command_without_sub_command_runs_finetune_and_the_recipe_stays_the_default(setup, tmp_path):
    args = parse_args(hf_argv(setup, tmp_path / "o"))
    assert args.command == args.mode == "finetune" and args.do_train and args.do_eval
    assert parse_args(["--model_name_or_path", setup["student"], "--do_eval", "--validation_file", setup["dev"],
                       "--output_dir", str(tmp_path / "e")]).command == "finetune"
    assert parse_args(["--learning_rate", "1e-4"]).command == "recipe"
    hf_json = tmp_path / "args.json"
    hf_json.write_text(json.dumps({"model_name_or_path": setup["student"], "output_dir": str(tmp_path / "j"),
                                   "do_train": True, "do_eval": True, "fp16": False, "pad_to_max_length": True,
                                   "report_to": ["none"]}))
    args = parse_args([str(hf_json)])
    assert args.command == "finetune" and args.pad_to_max_length and args.report_to == []
    recipe_json = tmp_path / "recipe.json"
    recipe_json.write_text(json.dumps({"learning_rate": 1e-4}))
    assert parse_args([str(recipe_json)]).command == "recipe"


# --------------------------------------------------------------- TrainingArguments' flag forms

@pytest.mark.parametrize("flags, expected", [
    (["--pad_to_max_length"], True), (["--pad_to_max_length", "True"], True),
    (["--pad_to_max_length", "False"], False), (["--pad_to_max_length=false"], False),
    (["--pad_to_max_length", "yes"], True), ([], False),
])
def test_booleans_take_hfargumentparser_values(tmp_path, flags, expected):
    args = parse_args(["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path), *flags])
    assert args.pad_to_max_length is expected


def test_fp16_true_and_false_and_do_flags_with_values(tmp_path):
    base = ["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    assert parse_args(base + ["--bf16", "True"]).precision == "bf16"
    assert parse_args(base + ["--fp16", "False"]).precision == "auto"
    args = parse_args(base + ["--do_train", "True", "--do_eval", "False"])
    assert args.do_train and not args.do_eval and args.eval_strategy == "no"
    with pytest.raises(ConfigError, match="--fp16: expected true or false, got 'maybe'"):
        parse_args(base + ["--fp16", "maybe"])


@pytest.mark.parametrize("flag", ["--push_to_hub", "--per_gpu_train_batch_size=8", "--half_precision_backend=auto",
                                  "--fp16_opt_level=O1", "--use_mps_device", "--deepspeed=ds.json", "--tf32"])
def test_an_unsupported_training_arguments_flag_is_named_in_one_line(tmp_path, capsys, flag):
    code, err = main(capsys, ["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path), flag])
    line = one_error_line(err)
    name = flag.split("=")[0]
    assert code == 2 and f"{name}: a run_qa.py / TrainingArguments flag that kdqa does not support" in line
    assert "unrecognized" not in line
    code, err = main(capsys, ["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path), "--bogus"])
    assert code == 2 and "unrecognized arguments: --bogus" in one_error_line(err)


def test_an_unsupported_key_of_an_args_json_is_named(tmp_path):
    cfg = tmp_path / "args.json"
    cfg.write_text(json.dumps({"model_name_or_path": "m", "output_dir": str(tmp_path / "o"), "do_train": True,
                               "push_to_hub": False}))
    with pytest.raises(ConfigError, match="--push_to_hub: a run_qa.py / TrainingArguments flag"):
        parse_args([str(cfg)])


def test_report_to_resolves_all_to_what_is_installed(tmp_path, monkeypatch):
    import importlib.util

    base = ["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    installed = importlib.util.find_spec("tensorboard") is not None
    assert parse_args(base).report_to == (["tensorboard"] if installed else [])
    assert parse_args(base + ["--report_to", "none"]).report_to == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert parse_args(base + ["--report_to", "all"]).report_to == []
    with pytest.raises(ConfigError, match=r"needs the tensorboard package: pip install 'kdqa\[tensorboard\]'"):
        parse_args(base + ["--report_to", "tensorboard"])
    with pytest.raises(ConfigError, match="--report_to wandb is not supported"):
        parse_args(base + ["--report_to", "tensorboard", "wandb"])


@pytest.mark.parametrize("flags, message", [
    (["--warmup_steps", "10", "--warmup_ratio", "0.1"], "give one of them"),
    (["--warmup_steps", "2.5"], "whole number of steps"),
    (["--warmup_steps", "-1"], "whole number of steps"),
    (["--lr_scheduler_type", "constant", "--warmup_steps", "3"], "constant_with_warmup"),
    (["--lr_scheduler_type", "polynomial"], "invalid choice"),
    (["--save_strategy", "bestest"], "invalid choice"),
    (["--optim", "adafactor"], "kdqa trains with AdamW; choose adamw_torch or adamw_torch_fused"),
    (["--save_safetensors", "False"], "kdqa writes model.safetensors only"),
    (["--logging_steps", "2.5"], "a whole number at least 1, or a fraction of all steps"),
    (["--use_cpu", "--device", "cuda"], "contradicts --device cuda"),
    (["--metric_for_best_model", "loss"], "invalid choice"),
    (["--load_best_model_at_end"], "--save_strategy steps needs --eval_strategy steps"),
    (["--save_strategy", "best", "--do_train", "True"], "give --do_eval with --eval_strategy epoch or steps"),
    (["--load_best_model_at_end", "--save_strategy", "epoch", "--eval_strategy", "end"], "--eval_strategy epoch or"),
])
def test_schedule_and_strategy_flags_are_checked(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path), *flags])


def test_local_rank_is_accepted_in_both_spellings_and_ignored_on_resume(tmp_path):
    base = ["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    assert parse_args(base + ["--local_rank", "3"]).local_rank == 3
    assert parse_args(base + ["--local-rank=1"]).local_rank == 1
    saved = run_settings(parse_args(base + ["--local_rank", "0", "--save_strategy", "epoch", "--report_to",
                                            "none", "--logging_strategy", "epoch"]), "cpu")
    check_resume_settings(saved, parse_args(base + ["--local_rank", "1"]), "cpu", "ckpt")  # no error
    for flags, name in ((["--lr_scheduler_type", "cosine"], "--lr_scheduler_type"),
                        (["--warmup_steps", "2"], "--warmup_steps"),
                        (["--gradient_checkpointing"], "--gradient_checkpointing")):
        with pytest.raises(ckpt.CheckpointError, match=f"{name}: now"):
            check_resume_settings(saved, parse_args(base + flags), "cpu", "ckpt")


def test_help_says_where_run_qa_means_something_else():
    finetune = _subparsers(build_parser())["finetune"]
    text = " ".join(finetune.format_help().split())
    assert "kdqa cuts questions (all windows of the first N); run_qa.py cuts features" in text
    assert "run_qa.py once at the end, which --eval_strategy end does" in text


# --------------------------------------------------------------- the learning-rate schedules

@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_lr_schedules_follow_transformers_get_scheduler(kind):
    from transformers import get_scheduler

    from kdqa.optimization import linear_schedule, lr_schedule

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(20):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    warmup = 0 if kind == "constant" else 4
    ours = lrs(lambda opt: lr_schedule(opt, kind, warmup, 20))
    theirs = lrs(lambda opt: get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=20))
    assert ours == pytest.approx(theirs, abs=1e-12)
    if kind == "linear":  # bit for bit the schedule kdqa always had
        assert ours == lrs(lambda opt: linear_schedule(opt, warmup, 20))
    assert len(set(ours)) > 1 or kind == "constant"


def test_warmup_steps_and_ratio():
    from argparse import Namespace

    from kdqa.optimization import warmup_steps_for

    assert warmup_steps_for(Namespace(warmup_steps=0, warmup_ratio=0.25), 10) == 2  # int(), as before
    assert warmup_steps_for(Namespace(warmup_steps=7.0, warmup_ratio=0.0), 10) == 7
    assert warmup_steps_for(Namespace(warmup_steps=0.25, warmup_ratio=0.0), 10) == 3  # ceil, as transformers 5


# --------------------------------------------------------------- a run: HF's file names and shapes

def test_hf_command_line_runs_and_writes_run_qa_shapes(setup, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = main(capsys, hf_argv(setup, out))
    assert code == 0, err[-3000:]
    train_results = json.loads((out / "train_results.json").read_text())
    all_results = json.loads((out / "all_results.json").read_text())
    hf_train_keys = {"train_loss", "train_runtime", "train_samples", "train_samples_per_second",
                     "train_steps_per_second", "epoch"}
    assert hf_train_keys <= set(train_results) and hf_train_keys <= set(all_results)
    records = read_records(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and train_results["train_loss"] == pytest.approx(sum(losses) / 4, rel=1e-12)
    assert train_results["epoch"] == 1.0 and train_results["global_step"] == 4  # kdqa's keys beside HF's
    assert train_results["train_samples"] >= 16  # features: at least one window per question
    assert train_results["train_steps_per_second"] == pytest.approx(4 / train_results["train_runtime"], rel=0.01)
    evals = [r for r in records if "eval_f1" in r]
    assert all_results["eval_f1"] == evals[-1]["eval_f1"] and all_results["eval_samples"] >= 4
    assert all_results["eval_exact_match"] == evals[-1]["eval_exact_match"]
    for name in ("eval_predictions.json", "eval_results.json", "model.safetensors"):
        assert (out / name).exists()
    state_files = {name for c in out.glob("checkpoint-*") for name in os.listdir(c) if name.endswith("state.json")}
    assert state_files == {"kdqa_state.json"}


def test_train_loss_weights_each_record_by_its_steps():
    from kdqa.run_outputs import train_figures

    records = [{"step": 1, "loss": 4.0}, {"step": 2, "eval_f1": 1.0}, {"step": 4, "loss": 1.0}]
    figures = train_figures(records, runtime=2.0, samples=10, steps_run=4, samples_run=16, epoch=1.0)
    assert figures["train_loss"] == (4.0 * 1 + 1.0 * 3) / 4
    assert figures["train_samples_per_second"] == 8.0 and figures["train_steps_per_second"] == 2.0


def test_save_and_logging_strategies(setup, tmp_path, capsys):
    out = tmp_path / "epoch"
    # 2 epochs of 4 steps; --save_steps 1 would checkpoint every step under the steps strategy.
    code, err = main(capsys, hf_argv(setup, out, "--num_train_epochs", "2", "--save_strategy", "epoch",
                                     "--save_steps", "1", "--save_total_limit", "5", "--logging_strategy", "no"))
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    training = [r for r in read_records(out) if "loss" in r]
    assert [r["step"] for r in training] == [8]  # logging no: one record, the whole run's mean
    assert json.loads((out / "train_results.json").read_text())["train_loss"] == training[0]["loss"]
    out = tmp_path / "none"
    code, err = main(capsys, hf_argv(setup, out, "--save_strategy", "no", "--logging_strategy", "epoch",
                                     "--num_train_epochs", "2"))
    assert code == 0, err[-3000:]
    assert not list(out.glob("checkpoint-*"))
    assert [r["step"] for r in read_records(out) if "loss" in r] == [4, 8]


def _rename_state_file_to_the_old_name(checkpoint):
    os.rename(checkpoint / ckpt.STATE_FILE, checkpoint / ckpt.LEGACY_STATE_FILE)
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.LEGACY_STATE_FILE] = manifest["files"].pop(ckpt.STATE_FILE)
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_of_an_older_kdqa_with_trainer_state_json_still_resumes(setup, tmp_path, capsys):
    import kdqa.trainer

    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--save_steps", "2", "--eval_strategy", "no", "--do_eval", "False"]
    assert main(capsys, hf_argv(setup, full, *common))[0] == 0
    kdqa.trainer.INTERRUPT_AFTER_STEP = 2
    try:
        assert main(capsys, hf_argv(setup, part, *common))[0] == 0
    finally:
        kdqa.trainer.INTERRUPT_AFTER_STEP = None
    _rename_state_file_to_the_old_name(part / "checkpoint-2")
    assert ckpt.verify_checkpoint(str(part / "checkpoint-2")) is None
    assert ckpt.read_trainer_state(str(part / "checkpoint-2"))["step"] == 2
    code, err = main(capsys, hf_argv(setup, part, *common, "--resume_from_checkpoint", "latest"))
    assert code == 0, err[-3000:]
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_is_really_on_and_gives_the_same_training(setup, tmp_path, capsys, monkeypatch):
    from transformers.models.bert.modeling_bert import BertIntermediate as Inside  # a part of each layer

    calls = {"n": 0}
    real = Inside.forward

    def counting(self, *a, **k):
        calls["n"] += self.training  # evaluation forwards are not recomputed
        return real(self, *a, **k)

    monkeypatch.setattr(Inside, "forward", counting)
    common = ["--max_steps", "3", "--eval_strategy", "no", "--do_eval", "False", "--save_strategy", "no"]
    assert main(capsys, hf_argv(setup, tmp_path / "plain", *common))[0] == 0
    plain_calls, calls["n"] = calls["n"], 0
    code, err = main(capsys, hf_argv(setup, tmp_path / "gc", *common, "--gradient_checkpointing"))
    assert code == 0, err[-3000:]
    assert plain_calls == 3 * 2 and calls["n"] == 2 * plain_calls  # each layer's forward recomputed in backward
    plain = [r["loss"] for r in read_records(tmp_path / "plain") if "loss" in r]
    gc = [r["loss"] for r in read_records(tmp_path / "gc") if "loss" in r]
    assert len(plain) == 3 and gc == pytest.approx(plain, rel=1e-5)
    assert not math.isnan(gc[-1])


@pytest.mark.slow  # one ONNX export with int8
def test_export_logs_one_line_and_the_libraries_passes_only_at_debug(setup, tmp_path):
    import logging

    from kdqa.export import _OtherLibrariesAtDebug
    from kdqa.int8 import static_schemes

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with root_log("[kdqa] %(levelname)s %(name)s %(message)s") as stream:
        train.run_command(parse_args(["export", "--model_name_or_path", setup["student"], "--output_dir",
                                      str(tmp_path / "onnx"), "--quantize", "int8", "--train_file", setup["train"],
                                      "--max_seq_length", "64", "--doc_stride", "32"]))
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("[kdqa]")]
    # kdqa's own lines only: the calibration pass of static int8, each scheme's scores, the export's result.
    assert all(line.split()[2] == "kdqa" for line in lines), [line for line in lines if " kdqa " not in line][:5]
    # Its 16 training questions all calibrate: the check runs on them, and says so.
    assert "no training questions are left after the 16 calibration ones" in lines[0], lines[:5]
    assert "calibrating activation scales" in lines[1] and "exported" in lines[-1], lines[:5]
    assert len(lines) == 3 + len(static_schemes()) and all("int8 candidate" in line for line in lines[2:-1])
    assert "on 16 calibration questions" in lines[-1]
    # What was hidden is still there at DEBUG, for whoever sets logging to DEBUG.
    record = logging.LogRecord("onnx_ir.passes", logging.INFO, "f", 1, "Removed 15 unused nodes", None, None)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        assert _OtherLibrariesAtDebug().filter(record) and record.levelname == "DEBUG"
    finally:
        root.setLevel(level)
    warning = logging.LogRecord("onnx_ir.passes", logging.WARNING, "f", 1, "careful", None, None)
    assert _OtherLibrariesAtDebug().filter(warning) and warning.levelname == "WARNING"


# --------------------------------------------------------------- issue 34: the forms run_qa.py users rely on

def test_aliases_and_flags_with_nothing_to_do_here_are_accepted(tmp_path, capsys):
    base = ["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    args = parse_args(base + ["--evaluation_strategy", "steps", "--eval_steps", "3", "--no_cuda", "--logging_dir",
                              str(tmp_path / "tb"), "--save_safetensors", "--run_name", "r", "--log_level", "info",
                              "--overwrite_cache", "--cache_dir", str(tmp_path / "c"), "--dataloader_pin_memory",
                              "False", "--skip_memory_metrics", "True", "--logging_steps", "0.25"])
    assert (args.eval_strategy, args.device, args.logging_dir, args.logging_steps) == (
        "steps", "cpu", str(tmp_path / "tb"), 0.25)
    for name in ("run_name", "log_level", "overwrite_cache", "cache_dir", "dataloader_pin_memory",
                 "skip_memory_metrics", "save_safetensors", "use_cpu", "no_cuda"):
        assert not hasattr(args, name), name  # accepted, stored nowhere (resume settings, training_args.json)
    assert parse_args(base + ["--use_cpu", "True"]).device == "cpu"
    assert parse_args(base + ["--no_cuda", "False"]).device == "auto"


@pytest.mark.parametrize("form", ["--per_gpu_train_batch_size", "--per_gpu_eval_batch_size", "--evaluation_strategy",
                                  "--logging_dir", "--save_safetensors", "--no_cuda", "--half_precision_backend"])
def test_the_forms_argparse_refused_bare_are_accepted_or_refused_by_name(tmp_path, capsys, form):
    """The 12 forms of the peer check that argparse refused as "unrecognized arguments"."""
    value = {"--evaluation_strategy": "epoch", "--logging_dir": str(tmp_path / "tb")}.get(form, "8")
    code, err = main(capsys, ["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), form,
                              value if form not in ("--save_safetensors", "--no_cuda") else "True", "--do_train",
                              "--max_steps", "0"])  # --max_steps 0 stops every accepted form at parsing
    line = one_error_line(err)
    assert code == 2 and "unrecognized" not in line, line
    assert "kdqa does not support" in line or "--max_steps must be at least 1" in line, line


def test_a_float_logging_steps_is_a_ratio_of_all_steps(setup, tmp_path, capsys):
    out = tmp_path / "ratio"
    code, err = main(capsys, hf_argv(setup, out, "--num_train_epochs", "2", "--logging_steps", "0.25",
                                     "--save_strategy", "no"))  # 8 steps: a record every 2
    assert code == 0, err[-3000:]
    assert [r["step"] for r in read_records(out) if "loss" in r] == [2, 4, 6, 8]


def test_logging_dir_holds_the_tensorboard_events(setup, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out, events = tmp_path / "run", tmp_path / "tb"
    code, err = main(capsys, hf_argv(setup, out, "--report_to", "tensorboard", "--logging_dir", events,
                                     "--max_steps", "2", "--save_strategy", "no"))
    assert code == 0, err[-3000:]
    assert list(events.glob("events.out.tfevents.*")) and not (out / "runs").exists()


def test_max_predict_samples_cuts_the_test_file(setup, tmp_path, capsys):
    out = tmp_path / "p"
    code, err = main(capsys, hf_argv(setup, out, "--do_predict", "--test_file", setup["dev"], "--max_predict_samples",
                                     "2", "--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
                                     "--do_eval", "False"))
    assert code == 0, err[-3000:]
    assert len(json.loads((out / "predict_predictions.json").read_text())) == 2


def test_optim_picks_the_adamw_kernel(tmp_path):
    from kdqa.optimization import build_optimizer

    base = ["finetune", "--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    model = torch.nn.Linear(2, 2)
    assert not build_optimizer(model, parse_args(base)).defaults["fused"]  # the CPU default, as always
    assert not build_optimizer(model, parse_args(base + ["--optim", "adamw_torch"])).defaults["fused"]
    assert build_optimizer(model, parse_args(base + ["--optim", "adamw_torch_fused"])).defaults["fused"]


SCRIPTED_F1 = {4: 10.0, 8: 50.0, 12: 20.0}  # by step: the best checkpoint is the middle one, not the last


@pytest.fixture
def scripted_f1(monkeypatch):
    """Each in-training evaluation's f1 as SCRIPTED_F1 says (what picks the best checkpoint); the final
    scoring of the loaded model is real."""
    import kdqa.trainer

    real = kdqa.trainer.score_on_dev

    def scored(run, epoch, record=True):
        real(run, epoch, record)
        if record and run.progress.last_eval is not None:
            run.progress.last_eval["metrics"]["f1"] = SCRIPTED_F1[run.progress.step]

    monkeypatch.setattr(kdqa.trainer, "score_on_dev", scored)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_load_best_model_at_end_keeps_the_best_checkpoint_and_resumes_exactly(setup, tmp_path, capsys, scripted_f1):
    import kdqa.trainer

    best = ["--num_train_epochs", "3", "--load_best_model_at_end", "--metric_for_best_model", "f1",
            "--save_strategy", "epoch", "--save_total_limit", "1"]  # 12 steps, checkpoints at 4, 8, 12
    full, part = tmp_path / "full", tmp_path / "part"
    code, err = main(capsys, hf_argv(setup, full, *best))
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]  # best survives
    final, chosen = _weights(full), _weights(full / "checkpoint-8")
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    assert not all(torch.equal(final[k], _weights(full / "checkpoint-12")[k]) for k in final)
    assert json.loads((full / "train_results.json").read_text())["best_model_checkpoint"] == "checkpoint-8"
    kdqa.trainer.INTERRUPT_AFTER_STEP = 8
    try:
        assert main(capsys, hf_argv(setup, part, *best))[0] == 0
    finally:
        kdqa.trainer.INTERRUPT_AFTER_STEP = None
    code, err = main(capsys, hf_argv(setup, part, *best, "--resume_from_checkpoint", "latest"))
    assert code == 0, err[-3000:]
    resumed = _weights(part)
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    scores = [{k: json.loads((d / "eval_results.json").read_text())[k] for k in ("exact_match", "f1")}
              for d in (part, full)]
    assert scores[0] == scores[1] and comparable_log(part) == comparable_log(full)


def test_save_strategy_best_checkpoints_only_improvements(setup, tmp_path, capsys, scripted_f1):
    out = tmp_path / "best"
    code, err = main(capsys, hf_argv(setup, out, "--num_train_epochs", "3", "--save_strategy", "best",
                                     "--save_total_limit", "5"))
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
