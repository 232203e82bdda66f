"""The training loop on the CPU: learning, distillation, accumulation, exact resume, outputs, errors.

Tiny BERT models and a synthetic task (tests/tiny_models.py); each run takes a few seconds.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from kdqa.config import parse_args
from tiny_models import make_model_folder, make_name_task, make_tokenizer, tiny_bert_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(str(tmp_path_factory.mktemp("bert")), tiny_bert_config(dropout=0.1))


@pytest.fixture(scope="module")
def model_dir_nodrop(tmp_path_factory):
    return make_model_folder(str(tmp_path_factory.mktemp("bert0")), tiny_bert_config(dropout=0.0))


def run(command, name_task, out, *extra, interrupt=None):
    """Parse flags exactly as train.py does, then train in-process; `interrupt` stops the run right
    after its first checkpoint at or after that step, as a crash would."""
    import kdqa.trainer as trainer

    argv = [command, "--train_file", name_task["train"], "--validation_file", name_task["dev"], "--output_dir", str(out),
            "--max_seq_length", "64", "--doc_stride", "32", "--loss_impl", "torch", "--disable_tqdm",
            "--per_device_eval_batch_size", "32", *map(str, extra)]
    trainer.INTERRUPT_AFTER_STEP = interrupt
    try:
        return trainer.train(parse_args(argv))
    finally:
        trainer.INTERRUPT_AFTER_STEP = None


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "eval_f1" in r]


def final_params(out):
    return load_file(os.path.join(out, "model.safetensors"))


def test_finetune_learns_the_synthetic_task_and_writes_outputs(name_task, model_dir, tmp_path):
    out = tmp_path / "ft"
    results = run("finetune", name_task, out, "--model_name_or_path", model_dir, "--learning_rate", "2e-3",
                  "--per_device_train_batch_size", "16", "--num_train_epochs", "10", "--logging_steps", "5",
                  "--warmup_ratio", "0.1", "--save_steps", "0")
    train_log, eval_log = read_metrics(out)
    assert results["global_step"] == 250
    first, last = train_log[0]["loss"], train_log[-1]["loss"]
    assert last < 0.25 * first, (first, last)
    # Chance: a random in-context span; the answer is one word among ~20, so F1 well under 20.
    assert results["f1"] > 80 and results["exact_match"] > 70, results
    assert len(eval_log) == 10  # one evaluation per epoch
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "eval_results.json",
                 "eval_predictions.json", "eval_nbest_predictions.json", "all_results.json", "training_args.json", "training_curves.png"):
        assert (out / name).is_file(), name
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert {"exact_match", "f1", "total", "missing", "runtime_s"} <= set(eval_results)
    assert eval_results["total"] == 60 and eval_results["missing"] == 0
    predictions = json.loads((out / "eval_predictions.json").read_text())
    assert set(predictions) == {f"d{i}" for i in range(60)} and all(isinstance(v, str) for v in predictions.values())
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = train_log[-1]
    assert {"step", "epoch", "loss", "ce", "kd", "lr", "grad_norm", "features_per_second", "peak_memory_mb"} <= set(record)
    assert record["kd"] == 0.0 and record["lr"] == pytest.approx(0.0, abs=1e-9)

    # The saved model reloads with plain transformers and answers.
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model = AutoModelForQuestionAnswering.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    example = make_name_task(1, seed=99)[0]
    enc = tokenizer(example["question"], example["context"], return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")[0]
    with torch.no_grad():
        logits = model(**enc)
    start, end = int(logits.start_logits.argmax()), int(logits.end_logits.argmax())
    answer = example["context"][int(offsets[start][0]):int(offsets[end][1])]
    assert answer == example["answers"]["text"][0]
    trained_dirs["finetuned"] = str(out)


trained_dirs = {}


def test_saved_model_answers_through_the_transformers_pipeline(name_task, model_dir, tmp_path):
    from transformers import pipeline

    out = trained_dirs.get("finetuned")
    if out is None:
        pytest.skip("needs the model trained by test_finetune_learns_the_synthetic_task_and_writes_outputs")
    try:
        qa = pipeline("question-answering", model=out, tokenizer=out, device="cpu")
    except KeyError as err:
        import transformers

        pytest.skip(f"transformers {transformers.__version__} has no question-answering pipeline ({err})")
    example = make_name_task(1, seed=99)[0]
    answer = qa(question=example["question"], context=example["context"])
    assert answer["answer"].strip() == example["answers"]["text"][0]


def test_distill_calls_fused_loss_with_nonzero_kd(name_task, model_dir, tmp_path, monkeypatch):
    import kdqa.objective as objective  # the span term of the trainer's loss

    calls = []
    real = objective.qa_distillation_loss

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs["impl"], args[4] is not None, float(out.kd)))
        return out

    monkeypatch.setattr(objective, "qa_distillation_loss", spy)
    teacher = tmp_path / "teacher"
    make_model_folder(str(teacher), tiny_bert_config(), seed=3)
    out = tmp_path / "kd"
    run("distill", name_task, out, "--teacher_model_name_or_path", teacher, "--model_name_or_path", model_dir,
        "--max_steps", "4", "--max_train_samples", "64", "--loss_impl", "triton", "--logging_steps", "1",
        "--eval_strategy", "no")
    assert len(calls) == 4 and all(impl == "triton" and has_teacher for impl, has_teacher, _ in calls)
    assert all(kd > 0 for _, _, kd in calls)
    train_log, _ = read_metrics(out)
    assert all(r["kd"] > 0 for r in train_log)


def test_distill_with_alpha_kd_zero_matches_finetune_step_for_step(name_task, model_dir, tmp_path):
    teacher = tmp_path / "teacher"
    make_model_folder(str(teacher), tiny_bert_config(), seed=4)
    common = ["--model_name_or_path", model_dir, "--max_steps", "6", "--max_train_samples", "64",
              "--logging_steps", "1", "--eval_strategy", "no", "--per_device_train_batch_size", "8"]
    run("finetune", name_task, tmp_path / "ft", *common)
    run("distill", name_task, tmp_path / "kd", *common, "--teacher_model_name_or_path", teacher, "--alpha_ce", "1.0",
        "--alpha_kd", "0.0")
    ft, _ = read_metrics(tmp_path / "ft")
    kd, _ = read_metrics(tmp_path / "kd")
    assert [r["loss"] for r in ft] == pytest.approx([r["loss"] for r in kd], rel=1e-6, abs=1e-7)
    a, b = final_params(tmp_path / "ft"), final_params(tmp_path / "kd")
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_gradient_accumulation_4x8_matches_1x32(name_task, model_dir_nodrop, tmp_path):
    # Adam turns float-rounding noise in near-zero gradients into full-size updates (m / sqrt(v) ~ 1);
    # a larger epsilon keeps the comparison about the gradients, which is what accumulation changes.
    common = ["--adam_epsilon", "1e-4", "--model_name_or_path", model_dir_nodrop, "--max_steps", "4", "--max_train_samples", "200",
              "--logging_steps", "1", "--eval_strategy", "no", "--learning_rate", "1e-3", "--save_steps", "0"]
    run("finetune", name_task, tmp_path / "acc", *common, "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "4")
    run("finetune", name_task, tmp_path / "big", *common, "--per_device_train_batch_size", "32")
    acc, _ = read_metrics(tmp_path / "acc")
    big, _ = read_metrics(tmp_path / "big")
    assert [r["loss"] for r in acc] == pytest.approx([r["loss"] for r in big], rel=1e-5)
    a, b = final_params(tmp_path / "acc"), final_params(tmp_path / "big")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    # And it is not trivially equal: a different batch size gives different parameters.
    run("finetune", name_task, tmp_path / "small", *common, "--per_device_train_batch_size", "8")
    c = final_params(tmp_path / "small")
    assert max((c[k] - b[k]).abs().max().item() for k in c) > 1e-4


def test_interrupted_and_resumed_run_ends_bit_for_bit_identical(name_task, model_dir, tmp_path):
    # 40 examples, batch 8, accumulation 2: 3 optimizer steps an epoch (windows of 2, 2 and 1
    # micro-batches), so checkpoints land mid-epoch and at epoch ends; dropout is on.
    common = ["--model_name_or_path", model_dir, "--max_train_samples", "40", "--per_device_train_batch_size", "8",
              "--gradient_accumulation_steps", "2", "--num_train_epochs", "4", "--save_steps", "2",
              "--logging_steps", "1", "--eval_strategy", "no", "--learning_rate", "1e-3", "--warmup_ratio", "0.2"]
    full = tmp_path / "full"
    run("finetune", name_task, full, *common)
    part = tmp_path / "part"
    first = run("finetune", name_task, part, *common, interrupt=4)
    assert first == {"interrupted_at_step": 4}
    assert "checkpoint-4" in os.listdir(part)
    assert not (part / "model.safetensors").exists()
    run("finetune", name_task, part, *common, "--resume_from_checkpoint", "latest")
    a, b = final_params(full), final_params(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_log, _ = read_metrics(full)
    part_log, _ = read_metrics(part)
    assert [r["step"] for r in part_log] == list(range(1, 13))
    assert [r["loss"] for r in part_log] == [r["loss"] for r in full_log]
    # Only the last --save_total_limit (2) checkpoints are kept, never a *.tmp one.
    names = sorted(n for n in os.listdir(part) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-10", "checkpoint-12"]


def test_resume_refuses_a_checkpoint_of_another_run_shape(name_task, model_dir, tmp_path):
    from kdqa.checkpoint import CheckpointError

    common = ["--model_name_or_path", model_dir, "--max_train_samples", "40", "--per_device_train_batch_size", "8",
              "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no"]
    run("finetune", name_task, tmp_path / "a", *common, interrupt=2)
    with pytest.raises(CheckpointError, match="--max_steps: now 6, in the checkpoint 4"):
        run("finetune", name_task, tmp_path / "a", *common[:-6], "--max_steps", "6", "--save_steps", "2",
            "--eval_strategy", "no", "--resume_from_checkpoint", "latest")
    with pytest.raises(FileExistsError, match="resume_from_checkpoint latest"):
        run("finetune", name_task, tmp_path / "a", *common)


def test_non_finite_loss_stops_naming_the_step(name_task, model_dir, tmp_path, monkeypatch):
    import kdqa.objective as objective  # the span term of the trainer's loss
    import kdqa.trainer as trainer
    from kdqa.loss import QALoss

    real = objective.qa_distillation_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return QALoss(out.loss * float("nan"), out.ce, out.kd)
        return out

    monkeypatch.setattr(objective, "qa_distillation_loss", poisoned)
    with pytest.raises(trainer.NonFiniteLossError, match="at optimizer step 3"):
        run("finetune", name_task, tmp_path / "nan", "--model_name_or_path", model_dir, "--max_train_samples", "64",
            "--per_device_train_batch_size", "8", "--max_steps", "6", "--logging_steps", "1",
            "--eval_strategy", "no")
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_student_layers_carry_the_teacher_weights(name_task, tmp_path):
    from kdqa.trainer import load_student_and_teacher

    teacher = make_model_folder(str(tmp_path / "t"), tiny_bert_config(layers=4), seed=5)
    args = parse_args(["distill", "--teacher_model_name_or_path", teacher, "--student_layers", "0,2,3",
                       "--output_dir", str(tmp_path / "o"), "--train_file", name_task["train"],
                       "--validation_file", name_task["dev"]])
    student, teacher_model, _ = load_student_and_teacher(args, None)
    assert student.config.num_hidden_layers == 3
    t_state, s_state = teacher_model.state_dict(), student.state_dict()
    for s_index, t_index in enumerate((0, 2, 3)):
        prefix_s, prefix_t = f"bert.encoder.layer.{s_index}.", f"bert.encoder.layer.{t_index}."
        keys = [k for k in s_state if k.startswith(prefix_s)]
        assert keys
        for k in keys:
            assert torch.equal(s_state[k], t_state[prefix_t + k[len(prefix_s):]])
    assert torch.equal(s_state["bert.embeddings.word_embeddings.weight"], t_state["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(s_state["qa_outputs.weight"], t_state["qa_outputs.weight"])


def test_teacher_and_student_must_share_a_vocabulary(name_task, model_dir, tmp_path):
    from transformers import BertConfig

    other = tmp_path / "other"
    make_model_folder(str(other), tiny_bert_config(), seed=6)
    tok = make_tokenizer()
    tok.add_tokens(["zzz"])
    tok.save_pretrained(str(other))
    with pytest.raises(ValueError, match="do not share a tokenizer vocabulary"):
        run("distill", name_task, tmp_path / "o", "--teacher_model_name_or_path", other, "--model_name_or_path",
            model_dir, "--max_steps", "1")
    assert BertConfig  # imported for the config class the folder uses


def test_distill_from_teacher_cache_gives_the_online_losses(name_task, model_dir, tmp_path):
    teacher = tmp_path / "teacher"
    make_model_folder(str(teacher), tiny_bert_config(), seed=7)
    common = ["--teacher_model_name_or_path", teacher, "--model_name_or_path", model_dir, "--max_steps", "5",
              "--max_train_samples", "64", "--logging_steps", "1", "--eval_strategy", "no",
              "--per_device_train_batch_size", "8"]
    run("distill", name_task, tmp_path / "online", *common)
    cache_dir = tmp_path / "cache"
    run("distill", name_task, tmp_path / "cached", *common, "--teacher_logits_cache", cache_dir)
    online, _ = read_metrics(tmp_path / "online")
    cached, _ = read_metrics(tmp_path / "cached")
    assert [r["kd"] for r in cached] == pytest.approx([r["kd"] for r in online], rel=2e-3, abs=1e-5)
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in online], rel=2e-3)
    assert len(os.listdir(cache_dir)) == 1
    # A second run reuses the cache (same fingerprint) and gives the same losses again.
    run("distill", name_task, tmp_path / "cached2", *common, "--teacher_logits_cache", cache_dir)
    again, _ = read_metrics(tmp_path / "cached2")
    assert [r["loss"] for r in again] == [r["loss"] for r in cached]
    assert len(os.listdir(cache_dir)) == 1


def test_group_by_length_trains(name_task, model_dir, tmp_path):
    results = run("finetune", name_task, tmp_path / "g", "--model_name_or_path", model_dir, "--max_train_samples", "64",
                  "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--group_by_length")
    assert results["global_step"] == 8 and "f1" in results


def test_evaluate_command_writes_results(name_task, model_dir, tmp_path, capsys):
    from kdqa.inference import evaluate_command as evaluate

    args = parse_args(["evaluate", "--model_name_or_path", model_dir, "--validation_file", name_task["dev"],
                       "--output_dir", str(tmp_path / "ev"), "--max_seq_length", "64", "--doc_stride", "32",
                       "--disable_tqdm"])
    metrics = evaluate(args)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"exact_match": metrics["exact_match"], "f1": metrics["f1"]}
    assert (tmp_path / "ev" / "eval_predictions.json").is_file() and metrics["total"] == 60


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts what makes the host wait for the device: copies to the CPU from another device, and
    scalar reads (.item(), bool()). The step runs on the meta device, where both would fail, so
    they are answered here (zeros, True) and recorded with the innermost frame outside torch."""

    def __init__(self):
        super().__init__()
        self.copies_to_cpu, self.scalar_reads = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import traceback

        kwargs = kwargs or {}
        aten = torch.ops.aten
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is aten._to_copy.default:
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cpu" and source.device.type != "cpu":
                self.copies_to_cpu.append((str(func), self._where(traceback)))
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
        elif func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.copies_to_cpu.append((str(func), self._where(traceback)))
            return args[0]
        elif func is aten._local_scalar_dense.default and source.device.type != "cpu":
            self.scalar_reads.append(self._where(traceback))
            return True if source.dtype == torch.bool else 0
        return func(*args, **kwargs)

    @staticmethod
    def _where(traceback) -> str:
        frames = reversed(traceback.extract_stack()[:-2])  # not _where and __torch_dispatch__
        return next((f"{f.filename}:{f.lineno}" for f in frames if f"{os.sep}torch{os.sep}" not in f.filename), "?")


def test_distillation_step_from_the_cache_never_waits_for_the_device(name_task, model_dir, tmp_path):
    """Issue 13.3: with cached teacher logits, the collator hands them over with the batch, so the
    step (forward, loss, backward, optimizer step) copies nothing back to the host."""
    import kdqa.trainer as trainer
    from kdqa.distributed import DistState

    teacher = make_model_folder(str(tmp_path / "teacher"), tiny_bert_config(), seed=9)
    common = ["--teacher_model_name_or_path", teacher, "--model_name_or_path", model_dir, "--max_steps", "1",
              "--max_train_samples", "16", "--eval_strategy", "no", "--per_device_train_batch_size", "4",
              "--teacher_logits_cache", str(tmp_path / "cache")]
    run("distill", name_task, tmp_path / "build", *common)  # builds the cache on the CPU
    argv = ["distill", "--train_file", name_task["train"], "--validation_file", name_task["dev"], "--output_dir",
            str(tmp_path / "meta"), "--max_seq_length", "64", "--doc_stride", "32", "--loss_impl", "torch",
            "--disable_tqdm", *map(str, common)]
    args = parse_args(argv)
    args.device = "meta"  # not a --device users may choose; the run itself is told by DistState
    the_run = trainer.set_up(args, DistState(device=torch.device("meta")))
    assert the_run.teacher is None  # no online teacher: the logits come from the cache
    batch = next(iter(the_run.data.loader))
    assert batch["teacher_start_logits"].shape == batch["input_ids"].shape
    batch = trainer.to_device(batch, the_run.device)
    reads = _HostReads()
    with reads:
        terms = trainer.forward_backward(the_run, batch)
        trainer.optimizer_step(the_run)
    assert terms["loss"].device.type == "meta" and set(terms) == {"loss", "ce", "kd"}
    assert reads.copies_to_cpu == []
    # transformers' BERT asks whether the attention mask has padding (sdpa mask skip); kdqa asks nothing.
    assert all(f"{os.sep}transformers{os.sep}" in where for where in reads.scalar_reads), reads.scalar_reads


def test_loss_modules_are_trained_with_the_student(model_dir, tmp_path, monkeypatch):
    """The door for extra loss terms: a trainable module a term owns is optimised and clipped."""
    import kdqa.trainer as trainer
    from kdqa.distributed import DistState
    from kdqa.modeling import load_qa_model

    projection = torch.nn.Linear(4, 4)
    extra = trainer.objective.Term("extra", "alpha_extra", "hidden_states", lambda args, student, teacher: projection)
    monkeypatch.setattr(trainer.objective, "EXTRA_TERMS", (extra,))
    args = parse_args(["distill", "--teacher_model_name_or_path", model_dir, "--model_name_or_path", model_dir,
                       "--output_dir", str(tmp_path)])
    args.alpha_extra = 1.0
    student = load_qa_model(model_dir)
    the_run = trainer.make_run(args, DistState(), student, None, autocast_dtype=None, use_scaler=False, total_steps=3)
    optimised = {id(p) for group in the_run.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in projection.parameters()} <= optimised
    assert {id(p) for p in student.parameters()} <= optimised
    assert len(the_run.trainable_parameters()) == len(optimised)
    assert the_run.objective.weights == {"ce": args.alpha_ce, "kd": args.alpha_kd, "extra": 1.0}
    assert "loss_modules.extra.weight" in trainer.checkpointed_model(the_run).state_dict()
    finetune = trainer.make_run(parse_args(["finetune", "--model_name_or_path", model_dir, "--output_dir",
                                            str(tmp_path), "--teacher_model_name_or_path", model_dir]),
                                DistState(), student, None, autocast_dtype=None, use_scaler=False, total_steps=3)
    assert finetune.objective.weights == {"ce": 1.0, "kd": 0.0}  # finetune mode: no KD even with a teacher named


def test_do_train_without_do_eval_needs_no_dev_set(name_task, model_dir, tmp_path):
    """run_qa.py's --do_train alone: no --validation_file, no evaluation, the model is still saved."""
    import kdqa.trainer as trainer

    out = tmp_path / "train_only"
    args = parse_args(["finetune", "--do_train", "--train_file", name_task["train"], "--model_name_or_path", model_dir,
                       "--output_dir", str(out), "--max_seq_length", "64", "--doc_stride", "32", "--loss_impl",
                       "torch", "--disable_tqdm", "--max_steps", "2"])
    assert args.validation_file is None and args.eval_strategy == "no"
    results = trainer.train(args)
    assert results["global_step"] == 2 and "f1" not in results
    assert os.path.exists(out / "model.safetensors") and not os.path.exists(out / "eval_predictions.json")


def test_eval_strategy_end_scores_once_after_the_last_step(name_task, model_dir, tmp_path):
    out = tmp_path / "end"
    results = run("finetune", name_task, out, "--model_name_or_path", model_dir, "--num_train_epochs", "2",
                  "--eval_strategy", "end", "--logging_steps", "5")
    _, evals = read_metrics(out)
    assert [r["step"] for r in evals] == [results["global_step"]] and "f1" in results


def test_segment_ids_are_seen_through_compile_and_ddp_style_wrappers():
    """A compiled BERT's forward is (*args, **kwargs): the check must look inside, or training drops
    the segment ids that evaluation (the raw model) uses."""
    from kdqa.modeling import takes_token_type_ids, unwrapped
    from tiny_models import tiny_bert_config
    from transformers import BertForQuestionAnswering

    bert = BertForQuestionAnswering(tiny_bert_config())
    compiled = torch.compile(bert)

    class DDPLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    assert takes_token_type_ids(bert)
    assert unwrapped(compiled) is bert and unwrapped(DDPLike(compiled)) is bert
    assert takes_token_type_ids(compiled) and takes_token_type_ids(DDPLike(compiled))
