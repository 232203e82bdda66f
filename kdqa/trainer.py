"""The training loop: fine-tuning and distillation of extractive QA models, top to bottom.

`train(args)` does what Hugging Face's Trainer does for this job and nothing hidden, in phases
that read in order:

    set_up           data -> features -> models -> loader -> schedule -> optimizer: one `Run`
                     (the optimizer and the schedule: kdqa.optimization)
    resume           the checkpoint's weights, optimizer, schedule and position in the data
    train_loop       the loop itself (a screenful), calling per micro-batch and per step:
      forward_backward   student forward, teacher logits, named loss terms, backward
      optimizer_step     clip, step (fp16 scaler), schedule, zero grads
      log_eval_save      metrics.jsonl, dev evaluation, checkpoints
    finish           final evaluation, then the run's files (kdqa.run_outputs): the saved model,
                     train_results.json, the report card

The mode is stated by the caller (`args.mode`, set by kdqa.config): "finetune" uses no teacher,
"distill" uses the online teacher or its cached logits. Both go through `qa_distillation_loss`.
Evaluation goes through kdqa.inference (`QAPredictor.evaluate`), as `train.py evaluate` does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kdqa import checkpoint as ckpt
from kdqa import objective, run_dir
from kdqa.data import fix_answer_starts, load_squad
from kdqa.dev_sample import DEFAULT_EVAL_SAMPLE, take_sample
from kdqa.distributed import (DistState, all_gather_object, all_reduce_mean, all_reduce_min, barrier,
                              check_ranks_in_sync, cleanup, init_distributed, max_over_ranks)
from kdqa.features import QACollator, Window, prepare_eval_features, prepare_train_features
from kdqa.inference import QAPredictor, TorchRunner
from kdqa.interrupt import StopRequest, TrainingInterrupted, ignore_stop_signals
from kdqa.modeling import (QAOutputs, short_model_name, build_student_from_layers, check_same_vocab, forward_qa,
                           load_qa_model, load_tokenizer)
from kdqa.optimization import Schedule, build_optimizer, lr_schedule, plan_schedule, warmup_steps_for
from kdqa.postprocess import Decoding
from kdqa.precision import PRECISION_NAMES, autocast, resolve_precision
from kdqa.reporting import MetricsLog, peak_memory_mb, quiet_progress_bars
from kdqa.run_outputs import write_run_outputs
from kdqa.resume_settings import check_resume_settings, run_settings
from kdqa.samplers import TrainBatchSampler
from kdqa.teacher_cache import CacheSettings, teacher_logits_from_cache
from kdqa.tensorboard_log import check_log_dir, open_tensorboard, reports_to_tensorboard

logger = logging.getLogger("kdqa")

TRAIN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions",
                 "feature_index")

INTERRUPT_AFTER_STEP: int | None = None
"""Tests only: stop right after the first checkpoint at or after this step, as a crash would."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: training stops instead of burning GPU-hours on garbage."""


# ----------------------------------------------------------------------------- the run's pieces

@dataclass
class Progress:
    """Where the run is, and what it has summed since the last log line (device tensors: no sync)."""
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0       # micro-batches of `epoch` done
    skipped_steps: int = 0        # fp16 overflow steps the gradient scaler skipped
    skipped_on_device: torch.Tensor | None = None  # skips not yet added to skipped_steps (no sync)
    running: dict = field(default_factory=dict)  # name -> summed per-step term since the last log
    steps_since_log: int = 0
    features_since_log: int = 0
    log_time: float = field(default_factory=time.perf_counter)
    grad_norm: torch.Tensor | None = None
    first_bad_step: torch.Tensor | None = None  # first step with a non-finite loss, or -1
    last_eval: dict | None = None
    last_eval_step: int = -1
    start_step: int = 0           # where this process began (the resumed step, or 0)
    started: float = field(default_factory=time.perf_counter)  # train_runtime counts from here
    last_checkpoint_step: int = -1  # the step of the last checkpoint this process wrote
    best: dict | None = None      # the best scored checkpoint {"step", "metric", "value"} (rank 0; in checkpoints)


@dataclass
class TrainData:
    train_examples: object
    train_features: object
    eval_examples: object
    eval_features: object
    collator: QACollator
    sampler: TrainBatchSampler
    loader: DataLoader
    eval_sample: dict | None = None  # which dev questions are scored (kdqa.dev_sample.DevSample.as_dict)


@dataclass
class Run:
    """Everything one training run holds: built by `set_up` (or `make_run`), read by every phase.

    `student` is the raw model (saved, evaluated, checkpointed); `student_wrapped` is what the
    step calls (the student compiled and/or wrapped in DistributedDataParallel, or itself).
    """
    args: argparse.Namespace
    dist: DistState
    autocast_dtype: torch.dtype | None
    student: torch.nn.Module
    student_wrapped: torch.nn.Module
    teacher: torch.nn.Module | None  # online teacher; None when fine-tuning or reading cached logits
    objective: objective.Objective    # the loss: sum(weight * term), built once (kdqa.objective.build)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    tokenizer: object = None
    run_id: str | None = None         # stamped into every checkpoint: a resume never takes another run's
    data: TrainData | None = None
    schedule: Schedule | None = None
    metrics_log: MetricsLog | None = None
    progress: Progress = field(default_factory=Progress)
    stop_request: StopRequest | None = None  # SIGINT/SIGTERM seen during the loop (kdqa.interrupt)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def show_progress(self) -> bool:
        return self.dist.is_main and not self.args.disable_tqdm

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates and clipping sees: the student's, then the objective's."""
        return [p for p in trainable_modules(self.student, self.objective).parameters() if p.requires_grad]


def trainable_modules(student: torch.nn.Module, objective: torch.nn.Module) -> torch.nn.ModuleList:
    """The student, then the objective's trainable parts (e.g. a hidden-state projection): created
    before the optimizer so that it trains and clips them; not inside DDP's wrapper (their gradients
    are averaged across ranks in optimizer_step)."""
    return torch.nn.ModuleList([student, objective])


# ----------------------------------------------------------------------------- set-up helpers

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(args, dist: DistState) -> str | None:
    """Lock the output dir, refuse or clear a previous run's results (kdqa.run_dir); returns the run id."""
    run_id = None
    if dist.is_main:
        if reports_to_tensorboard(args):
            check_log_dir(args)  # one line, before anything is cleared or loaded
        run_id = run_dir.prepare(args.output_dir, resume=bool(args.resume_from_checkpoint),
                                 overwrite=args.overwrite_output_dir, keep=run_dir.input_paths(args))
    barrier(dist)
    return run_id


def load_datasets(args, tokenizer):
    """Raw examples and their features: (train_examples, train_features, eval_examples, eval_features,
    eval_sample: which dev questions, kdqa.dev_sample); no dev set where nothing is evaluated
    (--eval_strategy no, e.g. --do_train without --do_eval)."""
    evaluates = args.eval_strategy != "no"
    raw = load_squad(train_file=args.train_file, validation_file=args.validation_file,
                     dataset_name=args.dataset_name, splits=("train", "validation") if evaluates else ("train",))
    train_examples = raw["train"]
    if args.max_train_samples is not None:
        train_examples = train_examples.select(range(min(args.max_train_samples, len(train_examples))))
    train_examples = fix_answer_starts(train_examples, log=logger.info)
    train_features = prepare_train_features(train_examples, tokenizer, args.window,
                                            num_proc=args.preprocessing_num_workers)
    train_features = train_features.add_column("feature_index", list(range(len(train_features))))
    if not evaluates:
        return train_examples, train_features, None, None, None
    eval_examples, sample = take_sample(raw["validation"], args.max_eval_samples,
                                        getattr(args, "eval_sample", DEFAULT_EVAL_SAMPLE))
    logger.info("dev set: %s", sample.text())
    eval_features = prepare_eval_features(eval_examples, tokenizer, args.window, num_proc=args.preprocessing_num_workers)
    return train_examples, train_features, eval_examples, eval_features, sample.as_dict()


def load_student_and_teacher(args, dist: DistState):
    """The student (from --model_name_or_path, or --student_layers of it / of the teacher), and the
    teacher in distill mode (None in finetune mode, even where a teacher is named)."""
    attn = objective.attn_implementation(args)  # eager where a loss term reads attention probabilities
    # The student is built first, right after seeding, so its fresh QA head (if any) is the same
    # whether or not a teacher follows: fine-tuned and distilled students start identical.
    source = args.model_name_or_path or args.teacher_model_name_or_path
    student = load_qa_model(source, attn_implementation=attn)
    tokenizer = load_tokenizer(source)
    if args.student_layers:
        student = build_student_from_layers(student, objective.copied_layers(args))
        logger.info("student: layers %s of %s (%d layers)", args.student_layers, short_model_name(source),
                    student.config.num_hidden_layers)
    teacher = None
    if args.mode == "distill":
        teacher = load_qa_model(args.teacher_model_name_or_path, attn_implementation=attn)
        teacher_tokenizer = load_tokenizer(args.teacher_model_name_or_path)
        check_same_vocab(teacher_tokenizer, tokenizer, args.teacher_model_name_or_path, source)
        teacher.eval().requires_grad_(False)
    return student, teacher, tokenizer


def make_train_loader(features, collator: QACollator, *, batch_size: int, group_by_length: bool, seed: int,
                      dist: DistState, num_workers: int = 0) -> tuple[TrainBatchSampler, DataLoader]:
    """This rank's batches: shuffled (optionally length-grouped), collated in the workers, pinned on CUDA."""
    lengths = [len(ids) for ids in features["input_ids"]]
    sampler = TrainBatchSampler(len(features), batch_size, lengths=lengths, shuffle=True,
                                group_by_length=group_by_length, seed=seed, num_replicas=dist.world_size,
                                rank=dist.rank)
    keep = [c for c in TRAIN_COLUMNS if c in features.column_names]
    loader = DataLoader(features.select_columns(keep), batch_sampler=sampler, collate_fn=collator,
                        num_workers=num_workers, pin_memory=dist.device.type == "cuda",
                        worker_init_fn=ignore_stop_signals if num_workers else None,  # kdqa.interrupt
                        generator=torch.Generator())  # own generator: iterating never draws from the global RNG
    return sampler, loader


def checkpointed_model(run: "Run") -> torch.nn.Module:
    """The student alone, or, where loss terms have trainable parts, the student and those parts
    (state dict keys student.* and loss_modules.<term>.*); never part of the saved model."""
    if not run.objective.has_trainable_parts():
        return run.student
    return torch.nn.ModuleDict({"student": run.student, "loss_modules": run.objective.loss_modules})


def make_run(args, dist: DistState, student, teacher, *, autocast_dtype, use_scaler: bool, total_steps: int,
             tokenizer=None) -> Run:
    """The step's pieces around models already on the device: the objective, optimizer, schedule,
    scaler and the wrapped student. Also what bench_train.py times the step with."""
    run_objective = objective.build(args, student, teacher).to(dist.device)
    optimizer = build_optimizer(trainable_modules(student, run_objective), args)
    scheduler = lr_schedule(optimizer, getattr(args, "lr_scheduler_type", "linear"),
                            warmup_steps_for(args, total_steps), total_steps)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=use_scaler)
    return Run(args=args, dist=dist, autocast_dtype=autocast_dtype, student=student, student_wrapped=student,
               teacher=teacher, objective=run_objective, optimizer=optimizer,
               scheduler=scheduler, scaler=scaler, tokenizer=tokenizer)


def enable_gradient_checkpointing(student) -> None:
    """--gradient_checkpointing: transformers' own, non-reentrant (torch's recommended form; the RNG
    state is replayed, so dropout and the gradients are those of the plain backward). Transformers 5
    renamed gradient_checkpointing_enable to activation_checkpointing_enable."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient_checkpointing: {type(student).__name__} does not support it; leave it out")
    if hasattr(student, "activation_checkpointing_enable"):
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def wrap_student(run: Run) -> None:
    """torch.compile and/or DDP around the student; the raw `run.student` stays what is saved."""
    wrapped = run.student
    if run.args.torch_compile:
        wrapped = torch.compile(wrapped)
    if run.dist.enabled:
        device = run.device
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    run.student_wrapped = wrapped


# ----------------------------------------------------------------------------- phase 1: set-up

def set_up(args, dist: DistState) -> Run:
    """Output folder, precision, seed, models, data, teacher logits, loader, schedule, optimizer."""
    quiet_progress_bars(not (dist.is_main and not args.disable_tqdm))
    run_id = prepare_output_dir(args, dist)
    autocast_dtype, use_scaler = resolve_precision(args.precision, dist.device)
    set_seed(args.seed)
    student, teacher, tokenizer = load_student_and_teacher(args, dist)
    if getattr(args, "gradient_checkpointing", False):
        enable_gradient_checkpointing(student)
    train_examples, train_features, eval_examples, eval_features, eval_sample = load_datasets(args, tokenizer)
    if len(train_features) == 0:
        raise ValueError("no training features: the training set is empty after filtering")
    pad_to_length = args.max_seq_length if args.pad_to_max_length else None
    collator = QACollator(tokenizer.pad_token_id, pad_to_multiple_of=8, pad_to_length=pad_to_length)
    student.to(dist.device)
    train_collator = collator
    if teacher is not None and args.teacher_logits_cache:
        settings = CacheSettings(cache_dir=args.teacher_logits_cache, window=args.window,
                                 data_files=(args.train_file,) if args.train_file else (),
                                 dataset_fingerprint=f"{args.dataset_name}:{args.max_train_samples}",
                                 batch_size=args.per_device_eval_batch_size, progress=not args.disable_tqdm)
        cache = teacher_logits_from_cache(settings, teacher, tokenizer, train_features, collator, dist, autocast_dtype)
        train_collator = QACollator(tokenizer.pad_token_id, pad_to_multiple_of=8, teacher_logits=cache,
                                    pad_to_length=pad_to_length)
        teacher = None  # distillation now runs no teacher at all
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
    elif teacher is not None:
        teacher.to(dist.device)
        if args.torch_compile:
            teacher = torch.compile(teacher)
    sampler, loader = make_train_loader(train_features, train_collator, batch_size=args.per_device_train_batch_size,
                                        group_by_length=args.group_by_length, seed=args.seed, dist=dist,
                                        num_workers=args.dataloader_num_workers)
    schedule = plan_schedule(args, len(sampler))
    run = make_run(args, dist, student, teacher, autocast_dtype=autocast_dtype, use_scaler=use_scaler,
                   total_steps=schedule.total_steps, tokenizer=tokenizer)
    run.data = TrainData(train_examples, train_features, eval_examples, eval_features, collator, sampler, loader,
                         eval_sample)
    run.schedule = schedule
    run.run_id = run_id
    return run


# ----------------------------------------------------------------------------- phase 2: resume

def resume(run: Run) -> str | None:
    """Load --resume_from_checkpoint into the run (weights, optimizer, schedule, scaler, position)."""
    args, dist, schedule, p = run.args, run.dist, run.schedule, run.progress
    if not args.resume_from_checkpoint:
        return None
    path = ckpt.resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    state = ckpt.read_trainer_state(path)  # checked first: a changed flag is named, not a state-dict traceback
    if state["world_size"] != dist.world_size:
        raise ckpt.CheckpointError(
            f"{path} was written by a run with {state['world_size']} process(es), this run has "
            f"{dist.world_size}: the data order depends on it. Resume with torchrun --nproc_per_node "
            f"{state['world_size']}, or start a new run without --resume_from_checkpoint"
        )
    check_resume_settings(state["settings"], args, run.device.type, path)
    if state["total_steps"] != schedule.total_steps or state["batches_per_epoch"] != schedule.batches_per_epoch:
        raise ckpt.CheckpointError(
            f"{path} belongs to a run with {state['total_steps']} steps of {state['batches_per_epoch']} "
            f"batches per epoch, this one has {schedule.total_steps} and {schedule.batches_per_epoch}: resume "
            "with the same data, batch size, accumulation and epochs"
        )
    state = ckpt.load_checkpoint(path, model=checkpointed_model(run), optimizer=run.optimizer, scheduler=run.scheduler,
                                 scaler=run.scaler, map_location=run.device, rank=dist.rank,
                                 shape_flags=tuple(objective.term_flags()))
    p.step, p.epoch, p.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    p.skipped_steps, p.start_step = state["skipped_steps"], state["step"]
    # Evaluations up to the checkpoint are in metrics.jsonl already; the log window goes on.
    p.last_eval_step, p.best = state["last_eval_step"], state.get("best")  # no "best": an older kdqa's
    p.running = {name: torch.tensor(value, device=run.device)
                 for name, value in ckpt.restored_log_window(state["log_window"], dist.rank).items()}
    p.steps_since_log = state["log_window"]["steps"]
    run.run_id = state["run_id"]
    if dist.is_main:
        run_dir.adopt_run_id(args.output_dir, run.run_id, path)
        ckpt.remove_newer_checkpoints(args.output_dir, p.step)
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, p.step, p.epoch, p.batch_in_epoch)
    return path


def open_metrics_log(run: Run, resumed: bool) -> None:
    if run.dist.is_main:
        run_dir.record_outputs(run.args.output_dir, run_dir.METRICS_FILE)
    run.metrics_log = MetricsLog(os.path.join(run.args.output_dir, "metrics.jsonl"), enabled=run.dist.is_main,
                                 resume=resumed)
    run.metrics_log.truncate_after(run.progress.step)
    run.metrics_log.sink = open_tensorboard(run.args, start_step=run.progress.step, resumed=resumed,
                                            is_main=run.dist.is_main)


# ----------------------------------------------------------------------------- phase 3: the step

def teacher_outputs(run: Run, batch: dict, outputs: frozenset = frozenset()) -> QAOutputs:
    """The teacher's logits (and the `outputs` loss terms need): from the batch (the collator looked
    the logits up in the cache), from the online teacher, or None logits when fine-tuning."""
    if "teacher_start_logits" in batch:
        return QAOutputs(batch["teacher_start_logits"], batch["teacher_end_logits"])
    if run.teacher is None:
        return QAOutputs(None, None)
    with torch.no_grad(), autocast(run.device, run.autocast_dtype):
        return forward_qa(run.teacher, batch, outputs, capture=run.objective.teacher_capture)


def forward_backward(run: Run, batch: dict, *, loss_divisor: int = 1, sync: bool = True) -> dict:
    """One micro-batch on the device: forward, teacher logits, loss terms, backward of loss / divisor.

    Returns the named terms, detached: "loss" (the weighted total the gradient comes from) and each
    term by name, unweighted (run.objective.weights holds the weights). Nothing of kdqa's here waits for
    the device (cached teacher logits arrive in the batch; transformers' BERT forward itself still
    asks once whether the attention mask has padding). sync=False skips DDP's gradient all-reduce
    (inside an accumulation window).
    """
    no_sync = run.student_wrapped.no_sync() if run.dist.enabled and not sync else contextlib.nullcontext()
    outputs = run.objective.needs
    with no_sync:
        with autocast(run.device, run.autocast_dtype):
            student_out = forward_qa(run.student_wrapped, batch, outputs, capture=run.objective.student_capture)
        total, terms = run.objective(student_out, teacher_outputs(run, batch, outputs), batch)
        run.scaler.scale(total / loss_divisor).backward()
    return {"loss": total.detach(), **{name: value.detach() for name, value in terms.items()}}


def optimizer_step(run: Run) -> None:
    """Clip, step (the fp16 scaler skips a step whose gradients overflowed), schedule, zero grads."""
    if run.dist.enabled:
        average_loss_module_grads(run)
    if run.args.max_grad_norm and run.args.max_grad_norm > 0:
        run.scaler.unscale_(run.optimizer)
        run.progress.grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable_parameters(), run.args.max_grad_norm)
    if not run.scaler.is_enabled():
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        # The scale tensor (updated in place) is compared on the device: an overflow halves it.
        # No host read here; settle_skipped_steps adds the count up when logging or saving.
        scale_before = run.scaler._scale.clone()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        skipped = (run.scaler._scale < scale_before).to(torch.long).reshape(())
        p = run.progress
        p.skipped_on_device = skipped if p.skipped_on_device is None else p.skipped_on_device + skipped
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def settle_skipped_steps(run: Run) -> None:
    """Add the device-side count of scaler-skipped steps to progress.skipped_steps (one read)."""
    p = run.progress
    if p.skipped_on_device is not None:
        p.skipped_steps += int(p.skipped_on_device.item())
        p.skipped_on_device = None


def average_loss_module_grads(run: Run) -> None:
    """DDP averages the student's gradients; the objective's trainable parts sit outside it, so average theirs here."""
    for param in run.objective.parameters():
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad /= run.dist.world_size


def add_terms(total: dict, terms: dict, divisor: int = 1) -> dict:
    """total[name] += terms[name] / divisor, for every name (device tensors: no sync)."""
    for name, value in terms.items():
        total[name] = total[name] + value / divisor if name in total else value / divisor
    return total


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------- phase 4: the loop

def train_loop(run: Run) -> bool:
    """Micro-batches accumulate into windows; each window ends in one optimizer step, then
    log/eval/save. Returns False when a test interruption stopped it; raises TrainingInterrupted after
    SIGINT/SIGTERM (stop_if_signalled)."""
    p, s = run.progress, run.schedule
    run.student.train()
    p.first_bad_step = torch.full((), -1, dtype=torch.long, device=run.device)
    with tqdm(total=s.total_steps, initial=p.step, desc="training", disable=not run.show_progress,
              dynamic_ncols=True) as bar:
        while p.epoch < s.num_epochs and p.step < s.total_steps:
            run.data.sampler.set_epoch(p.epoch, start_batch=p.batch_in_epoch)
            window = {}
            for batch in run.data.loader:
                window_size, is_update = accumulation_window(p.batch_in_epoch, s)
                terms = forward_backward(run, to_device(batch, run.device), loss_divisor=window_size, sync=is_update)
                add_terms(window, terms, window_size)
                p.batch_in_epoch += 1
                p.features_since_log += batch["input_ids"].shape[0] * run.dist.world_size
                if not is_update:
                    continue
                optimizer_step(run)
                record_step(run, window)
                bar.update(1)
                window = {}
                if not log_eval_save(run, bar):
                    return False
                stop_if_signalled(run)
                if p.step >= s.total_steps:
                    break
            end_of_epoch(run)
    return True


def stop_if_signalled(run: Run) -> None:
    """At a step boundary, after SIGINT/SIGTERM on any rank: checkpoint this step (unless just done)
    and raise TrainingInterrupted. The decision is taken over ranks, so every rank stops at this step;
    alone it is one Python attribute read, under DDP one small all-reduce on the host."""
    signum = run.stop_request.signum if run.stop_request is not None else None
    if run.dist.enabled:
        signum = max_over_ranks(signum or 0, run.dist)
    if not signum:
        return
    p = run.progress
    if p.last_checkpoint_step != p.step:
        save_checkpoint(run, p.epoch, p.batch_in_epoch)  # mid-epoch: an epoch's end has its checkpoint already
    raise TrainingInterrupted(signum, p.step, os.path.join(run.args.output_dir, f"{ckpt.CHECKPOINT_PREFIX}{p.step}"))


def accumulation_window(batch_in_epoch: int, s: Schedule) -> tuple[int, bool]:
    """(micro-batches in this batch's window, whether it is the window's last); an epoch's last
    window may be short."""
    window_start = batch_in_epoch - batch_in_epoch % s.accumulation
    window_size = min(s.accumulation, s.batches_per_epoch - window_start)
    return window_size, batch_in_epoch + 1 == window_start + window_size


def record_step(run: Run, window: dict) -> None:
    """Count the step, remember the first non-finite loss (on the device), sum the terms for the log."""
    p = run.progress
    p.step += 1
    bad = (~torch.isfinite(window["loss"])) & (p.first_bad_step < 0)
    p.first_bad_step = torch.where(bad, torch.full_like(p.first_bad_step, p.step), p.first_bad_step)
    add_terms(p.running, window)
    p.steps_since_log += 1


def epoch_float(run: Run) -> float:
    return run.progress.epoch + run.progress.batch_in_epoch / run.schedule.batches_per_epoch


def end_of_epoch(run: Run) -> None:
    p = run.progress
    if p.batch_in_epoch == run.schedule.batches_per_epoch:
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0


# ----------------------------------------------------------------------------- phase 5: log, eval, save

def log_eval_save(run: Run, bar) -> bool:
    """After an optimizer step: log, evaluate and checkpoint as the flags say. False: stop (tests)."""
    args, p, s = run.args, run.progress, run.schedule
    epoch_done = p.batch_in_epoch == s.batches_per_epoch
    if logs_now(args, p.step, epoch_done, s.total_steps):
        log_training(run, bar)
    # Every evaluation of a step runs before that step's checkpoint, so a resume from it never
    # repeats or skips one (the checkpoint records last_eval_step).
    if (args.eval_strategy == "steps" and p.step % args.eval_steps == 0) or \
            (args.eval_strategy == "epoch" and epoch_done) or \
            (args.eval_strategy != "no" and p.step == s.total_steps):
        check_finite(run)  # a diverged model is neither scored nor logged
        score_on_dev(run, epoch_float(run))
    if saves_now(args, p.step, epoch_done, s.total_steps, beats_best(run)):
        save_checkpoint(run, p.epoch + 1 if epoch_done else p.epoch, 0 if epoch_done else p.batch_in_epoch)
        if INTERRUPT_AFTER_STEP is not None and p.step >= INTERRUPT_AFTER_STEP:
            return False
    return True


def logs_now(args, step: int, epoch_done: bool, total_steps: int) -> bool:
    """--logging_strategy: steps (every --logging_steps), epoch, no; the last step always logs."""
    strategy = getattr(args, "logging_strategy", "steps")
    every = args.logging_steps if args.logging_steps >= 1 else math.ceil(args.logging_steps * total_steps)  # a ratio
    return step == total_steps or (strategy == "steps" and step % every == 0) or \
        (strategy == "epoch" and epoch_done)


def saves_now(args, step: int, epoch_done: bool, total_steps: int, new_best: bool = False) -> bool:
    """--save_strategy: steps (every --save_steps, epoch ends, the last step), epoch (epoch ends, the
    last step), best (where this step's dev score beats the best checkpoint's), no (never)."""
    strategy = getattr(args, "save_strategy", "steps")
    if strategy in ("no", "best"):
        return strategy == "best" and new_best
    return epoch_done or step == total_steps or (strategy == "steps" and bool(args.save_steps)
                                                 and step % args.save_steps == 0)


def tracks_best(args) -> bool:
    return bool(getattr(args, "load_best_model_at_end", False)) or getattr(args, "save_strategy", None) == "best"


def beats_best(run: Run) -> bool:
    """This step was scored and beats the best checkpoint's --metric_for_best_model (higher is better).
    Rank 0 scores and decides; every rank gets its answer (every rank calls this, at the same steps)."""
    p = run.progress
    if not tracks_best(run.args) or p.last_eval_step != p.step:
        return False
    metric = run.args.metric_for_best_model
    better = run.dist.is_main and (p.best is None or p.last_eval["metrics"][metric] > p.best["value"])
    return bool(max_over_ranks(int(better), run.dist))


def load_best_model(run: Run) -> str:
    """--load_best_model_at_end: the best checkpoint's weights become the final model, scored again so the
    eval files and the card describe it (every rank loads them: every rank scores). Returns its folder."""
    path = os.path.join(run.args.output_dir, f"{ckpt.CHECKPOINT_PREFIX}{run.progress.best['step']}")
    problem = ckpt.verify_checkpoint(path, run.run_id)
    if problem is not None:
        raise ckpt.CheckpointError(f"--load_best_model_at_end: the best checkpoint {path} cannot be used ({problem}); "
                                   f"the last step's model is in {ckpt.last_good_checkpoint(run.args.output_dir)}")
    weights = load_file(os.path.join(path, "model.safetensors"), device=str(run.device))
    checkpointed_model(run).load_state_dict(weights)
    best = run.progress.best
    logger.info("final model: %s, the best %s (%s) of the scored checkpoints", path, best["metric"],
                "?" if best["value"] is None else f"{best['value']:.2f}")
    score_on_dev(run, run.schedule.num_epochs, record=False)
    return os.path.basename(path)


def log_training(run: Run, bar) -> None:
    """One metrics.jsonl record: the mean of every named term since the last record, lr, speed."""
    check_finite(run)
    p = run.progress
    names = list(p.running)
    means = all_reduce_mean(torch.stack([p.running[n] for n in names]) / p.steps_since_log, run.dist).tolist()
    elapsed = time.perf_counter() - p.log_time
    record = {"step": p.step, "epoch": round(epoch_float(run), 4), **dict(zip(names, means)),
              "lr": run.scheduler.get_last_lr()[0],
              "grad_norm": float(p.grad_norm) if p.grad_norm is not None else 0.0,
              "features_per_second": p.features_since_log / max(elapsed, 1e-9),
              "peak_memory_mb": peak_memory_mb(run.device), "skipped_steps": p.skipped_steps}
    run.metrics_log.write(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    p.running, p.steps_since_log, p.features_since_log, p.log_time = {}, 0, 0, time.perf_counter()


def score_on_dev(run: Run, epoch: float, record: bool = True) -> None:
    """EM/F1 of the student on the dev set (rank 0), logged to metrics.jsonl (when `record`); every rank waits."""
    p, data, args = run.progress, run.data, run.args
    if run.dist.is_main:
        predictor = QAPredictor(TorchRunner(run.student, run.device, run.autocast_dtype), run.tokenizer,
                                Window.from_args(args), Decoding.from_args(args),
                                batch_size=args.per_device_eval_batch_size, collate=data.collator)
        metrics, predictions, nbest = predictor.evaluate(data.eval_examples, features=data.eval_features,
                                                         progress=run.show_progress)
        run.student.train()
        if record:
            run.metrics_log.write({"step": p.step, "epoch": round(epoch, 4),
                                   **{f"eval_{k}": v for k, v in metrics.items()}})
        logger.info("eval at step %d (epoch %.2f): exact_match %.2f f1 %.2f on %d questions (%.1f s)",
                    p.step, epoch, metrics["exact_match"], metrics["f1"], metrics["total"], metrics["runtime_s"])
        p.last_eval = {"metrics": metrics, "predictions": predictions, "nbest": nbest}
    p.last_eval_step = p.step
    barrier(run.dist)


def check_finite(run: Run) -> None:
    """Stop with the first step whose loss was NaN or inf (one device read, only when logging/saving).

    Decided over all ranks: a NaN on one rank stops every rank, none is left waiting in a collective.
    Every log, checkpoint and finish passes here first: the skipped-step count is settled too."""
    settle_skipped_steps(run)
    step = run.progress.first_bad_step
    never = torch.iinfo(step.dtype).max
    bad = int(all_reduce_min(torch.where(step < 0, torch.full_like(step, never), step), run.dist).item())
    bad = -1 if bad == never else bad
    if bad >= 0:
        raise NonFiniteLossError(
            f"the training loss became non-finite (NaN or inf) at optimizer step {bad}; training stopped "
            f"and wrote nothing after it. Last good checkpoint: {ckpt.last_good_checkpoint(run.args.output_dir)}. "
            "Lower --learning_rate, try --precision bf16 or fp32, or check the data for broken features."
        )


def save_checkpoint(run: Run, epoch: int, batch_in_epoch: int) -> None:
    """A resumable checkpoint (rank 0) of a run whose loss and parameters are finite; every rank waits.

    It holds what a resume needs to go on as if never stopped: the run's identity and settings,
    the last evaluated step and the unlogged loss sums of the current log window.
    """
    check_finite(run)
    args, s, p = run.args, run.schedule, run.progress
    if beats_best(run):  # rank 0 alone knows the score; every rank the step
        p.best = {"step": p.step, "metric": args.metric_for_best_model,
                  "value": p.last_eval["metrics"][args.metric_for_best_model] if run.dist.is_main else None}
    ckpt.check_parameters_finite(run.student, p.step, args.output_dir)  # every rank: same decision
    # Each rank's own RNG states and unlogged sums: a resume restores them as they were, so the next
    # log record's mean over ranks is the uninterrupted run's to the last bit (a mean saved here and
    # summed into again would round differently).
    names = list(p.running)
    window = dict(zip(names, torch.stack([p.running[n] for n in names]).tolist() if names else []))
    rng_by_rank, window_by_rank = zip(*all_gather_object((ckpt.rng_state(), window), run.dist))
    if run.dist.is_main:
        ckpt.save_checkpoint(args.output_dir, p.step, model=checkpointed_model(run), optimizer=run.optimizer,
                             scheduler=run.scheduler, scaler=run.scaler, save_total_limit=args.save_total_limit,
                             rng_by_rank=list(rng_by_rank), keep_step=p.best["step"] if p.best else None,
                             trainer_state={"epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                            "world_size": run.dist.world_size, "total_steps": s.total_steps,
                                            "batches_per_epoch": s.batches_per_epoch,
                                            "skipped_steps": p.skipped_steps, "run_id": run.run_id,
                                            "settings": run_settings(args, run.device.type),
                                            "last_eval_step": p.last_eval_step, "best": p.best,
                                            "log_window": ckpt.log_window_state(window_by_rank, p.steps_since_log)})
    p.last_checkpoint_step = p.step
    barrier(run.dist)


# ----------------------------------------------------------------------------- phase 6: finish

def finish(run: Run) -> dict:
    """The model and the result files (plus a final evaluation when resumed from the last checkpoint)."""
    args, p, s = run.args, run.progress, run.schedule
    if p.first_bad_step is not None:
        check_finite(run)
    ckpt.check_parameters_finite(run.student, p.step, args.output_dir)
    if args.eval_strategy != "no" and p.step == p.start_step:  # same decision on every rank
        # Resumed at the final checkpoint: its evaluation is logged already; score again for the outputs.
        score_on_dev(run, s.num_epochs, record=p.last_eval_step != p.step)
    results = {"global_step": p.step, "skipped_steps": p.skipped_steps}
    if getattr(args, "load_best_model_at_end", False) and p.best is not None:
        results["best_model_checkpoint"] = load_best_model(run) if p.best["step"] != p.step else \
            f"{ckpt.CHECKPOINT_PREFIX}{p.step}"
    if run.dist.enabled:
        results["rank_param_checksums"] = check_ranks_in_sync(run.student, run.dist)
    if run.dist.is_main:
        write_run_outputs(run, results, epoch=round(epoch_float(run), 4))
    barrier(run.dist)
    return results


# ----------------------------------------------------------------------------- training, start to end

def train(args: argparse.Namespace) -> dict:
    """Fine-tune (args.mode "finetune") or distil ("distill") a QA model; returns the final metrics."""
    dist = init_distributed(args.device)
    try:
        run = set_up(args, dist)
        resumed = resume(run)
        wrap_student(run)
        open_metrics_log(run, resumed is not None)
        log_plan(run)
        with StopRequest() as run.stop_request:  # SIGINT/SIGTERM: stop at the step's end (stop_if_signalled)
            finished = train_loop(run)
        if not finished:
            return {"interrupted_at_step": run.progress.step}
        return finish(run)
    finally:
        run_dir.release(args.output_dir)
        cleanup(dist)


def log_plan(run: Run) -> None:
    if not run.dist.is_main:
        return
    args, s, data = run.args, run.schedule, run.data
    logger.info("%s: %d examples -> %d features, %d epochs, %d steps (%d micro-batches of %d x %d ranks, "
                "accumulation %d), precision %s, loss impl %s%s", args.mode, len(data.train_examples),
                len(data.train_features), s.num_epochs, s.total_steps, s.batches_per_epoch,
                args.per_device_train_batch_size, run.dist.world_size, s.accumulation,
                PRECISION_NAMES[run.autocast_dtype], args.loss_impl,
                ", teacher logits from cache" if data.loader.collate_fn.teacher_logits is not None else "")
    for line in objective.plan_lines(run.objective.describe()):
        logger.info(line)
