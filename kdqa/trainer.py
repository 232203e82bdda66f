"""The training loop: fine-tuning and distillation of extractive QA models, top to bottom.

One function, `train(args)`, does what Hugging Face's Trainer does for this job and nothing hidden:
data -> features -> models -> optimizer and schedule -> (resume) -> the loop (AMP, gradient
accumulation, clipping, the fused loss, logging, evaluation, checkpoints) -> the saved model.
Fine-tuning is distillation without a teacher: both go through `qa_distillation_loss`.
`evaluate(args)` scores a saved model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kdqa import checkpoint as ckpt
from kdqa import run_dir
from kdqa.data import fix_answer_starts, load_squad
from kdqa.distributed import DistState, all_reduce_mean, barrier, broadcast_object, cleanup, init_distributed
from kdqa.evaluation import evaluate_model
from kdqa.features import QACollator, prepare_eval_features, prepare_train_features
from kdqa.loss import qa_distillation_loss
from kdqa.modeling import (build_student_from_layers, check_same_vocab, forward_qa, load_qa_model,
                           load_tokenizer, parse_layers)
from kdqa.reporting import MetricsLog, peak_memory_mb, plot_curves, write_json
from kdqa.resume_settings import check_resume_settings, run_settings
from kdqa.samplers import TrainBatchSampler

logger = logging.getLogger("kdqa")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: training stops instead of burning GPU-hours on garbage."""


# ----------------------------------------------------------------------------- set-up helpers

def quiet_progress_bars(quiet: bool) -> None:
    """--disable_tqdm (and ranks other than 0) silence the tokenisation bars of `datasets` too."""
    import datasets

    if quiet:
        datasets.disable_progress_bars()
    else:
        datasets.enable_progress_bars()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether fp16's gradient scaler is on)."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision bf16: this GPU does not support bfloat16; use --precision fp16")
        return torch.bfloat16, False
    if device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA GPU; on the CPU use --precision fp32 or bf16")
    return torch.float16, True


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorm weights (as BERT was trained)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or id(param) in no_decay_ids else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, **fused)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then linear decay to 0 at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_output_dir(args, dist: DistState) -> str | None:
    """Lock the output dir, refuse or clear a previous run's results (kdqa.run_dir); returns the run id."""
    run_id = None
    if dist.is_main:
        run_id = run_dir.prepare(args.output_dir, resume=bool(args.resume_from_checkpoint),
                                 overwrite=args.overwrite_output_dir)
    barrier(dist)
    return run_id


def load_datasets(args, tokenizer, need_train: bool = True):
    """Raw examples and their features: (train_examples, train_features, eval_examples, eval_features)."""
    splits = ("train", "validation") if need_train else ("validation",)
    raw = load_squad(train_file=args.train_file, validation_file=args.validation_file,
                     dataset_name=args.dataset_name, splits=splits)
    lengths = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                   max_query_length=args.max_query_length)
    train_examples = train_features = None
    if need_train:
        train_examples = raw["train"]
        if args.max_train_samples is not None:
            train_examples = train_examples.select(range(min(args.max_train_samples, len(train_examples))))
        train_examples = fix_answer_starts(train_examples, log=logger.info)
        train_features = prepare_train_features(train_examples, tokenizer, num_proc=args.preprocessing_num_workers,
                                                **lengths)
        train_features = train_features.add_column("feature_index", list(range(len(train_features))))
    eval_examples = raw["validation"]
    if args.max_eval_samples is not None:
        eval_examples = eval_examples.select(range(min(args.max_eval_samples, len(eval_examples))))
    eval_features = prepare_eval_features(eval_examples, tokenizer, num_proc=args.preprocessing_num_workers, **lengths)
    return train_examples, train_features, eval_examples, eval_features


def load_student_and_teacher(args, dist: DistState):
    """The student (from --model_name_or_path, or --student_layers of it / of the teacher) and the teacher."""
    distill = getattr(args, "teacher_model_name_or_path", None) is not None and args.command != "finetune"
    attn = args.attn_implementation
    # The student is built first, right after seeding, so its fresh QA head (if any) is the same
    # whether or not a teacher follows: fine-tuned and distilled students start identical.
    source = args.model_name_or_path or args.teacher_model_name_or_path
    student = load_qa_model(source, attn_implementation=attn)
    tokenizer = load_tokenizer(source)
    if args.student_layers:
        student = build_student_from_layers(student, parse_layers(args.student_layers))
        logger.info("student: layers %s of %s (%d layers)", args.student_layers, source,
                    student.config.num_hidden_layers)
    teacher = None
    if distill:
        teacher = load_qa_model(args.teacher_model_name_or_path, attn_implementation=attn)
        teacher_tokenizer = load_tokenizer(args.teacher_model_name_or_path)
        check_same_vocab(teacher_tokenizer, tokenizer, args.teacher_model_name_or_path, source)
        teacher.eval().requires_grad_(False)
    return student, teacher, tokenizer


def teacher_logits_from_cache(args, teacher, tokenizer, train_features, collator, dist, autocast_dtype):
    """Compute the teacher's logits once (rank 0), then every rank memory-maps them."""
    from kdqa.teacher_cache import TeacherLogitsCache, fingerprint

    storage = torch.bfloat16 if autocast_dtype == torch.bfloat16 else torch.float16
    data_files = [args.train_file] if args.train_file else None
    key = fingerprint(data_files=data_files,
                      dataset_fingerprint=None if data_files else f"{args.dataset_name}:{args.max_train_samples}",
                      tokenizer=tokenizer, teacher=teacher, max_seq_length=args.max_seq_length,
                      doc_stride=args.doc_stride, max_query_length=args.max_query_length,
                      num_features=len(train_features), storage_dtype=storage)
    key = broadcast_object(key, dist)
    if dist.is_main:
        TeacherLogitsCache.load_or_build(args.teacher_logits_cache, key, train_features, teacher, collator,
                                         batch_size=args.per_device_eval_batch_size, device=dist.device,
                                         autocast_dtype=autocast_dtype, storage_dtype=storage,
                                         progress=not args.disable_tqdm)
    barrier(dist)
    cache = TeacherLogitsCache.load(args.teacher_logits_cache, key)
    if cache is None:
        raise RuntimeError(f"teacher logits cache {args.teacher_logits_cache}/{key} could not be read after building")
    return cache


# ----------------------------------------------------------------------------- training

def train(args: argparse.Namespace, _interrupt_at_step: int | None = None) -> dict:
    """Fine-tune (no teacher) or distil (teacher given) a QA model; returns the final metrics.

    `_interrupt_at_step` stops the loop right after that step's checkpoint, as a crash would (tests).
    """
    dist = init_distributed(args.device)
    try:
        return _train(args, dist, _interrupt_at_step)
    finally:
        run_dir.release(args.output_dir)
        cleanup(dist)


def _train(args, dist: DistState, _interrupt_at_step: int | None) -> dict:
    device = dist.device
    main = dist.is_main
    show = main and not args.disable_tqdm
    quiet_progress_bars(not show)
    run_id = prepare_output_dir(args, dist)
    autocast_dtype, use_scaler = resolve_precision(args.precision, device)
    set_seed(args.seed)

    # --- models and data
    student, teacher, tokenizer = load_student_and_teacher(args, dist)
    distill = teacher is not None
    train_examples, train_features, eval_examples, eval_features = load_datasets(args, tokenizer)
    if len(train_features) == 0:
        raise ValueError("no training features: the training set is empty after filtering")
    collator = QACollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    student.to(device)
    cache = None
    if distill:
        if args.teacher_logits_cache:
            cache = teacher_logits_from_cache(args, teacher.to(device), tokenizer, train_features, collator, dist,
                                              autocast_dtype)
            teacher = None  # distillation now runs no teacher at all
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            teacher.to(device)
            if args.torch_compile:
                teacher = torch.compile(teacher)

    lengths = [len(ids) for ids in train_features["input_ids"]]
    sampler = TrainBatchSampler(len(train_features), args.per_device_train_batch_size, lengths=lengths,
                                shuffle=True, group_by_length=args.group_by_length, seed=args.seed,
                                num_replicas=dist.world_size, rank=dist.rank)
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions",
                        "feature_index") if c in train_features.column_names]
    loader = DataLoader(train_features.select_columns(keep), batch_sampler=sampler, collate_fn=collator,
                        num_workers=args.dataloader_num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # own generator: iterating never draws from the global RNG

    # --- optimisation schedule
    accum = args.gradient_accumulation_steps
    batches_per_epoch = len(sampler)
    updates_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * updates_per_epoch)
    num_epochs = math.ceil(total_steps / updates_per_epoch)
    optimizer = build_optimizer(student, args)
    scheduler = linear_schedule(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # --- resume
    global_step, start_epoch, start_batch = 0, 0, 0
    resume_path = None
    if args.resume_from_checkpoint:
        resume_path = ckpt.resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        state = ckpt.load_checkpoint(resume_path, model=student, optimizer=optimizer, scheduler=scheduler,
                                     scaler=scaler, map_location=device)
        if state["world_size"] != dist.world_size:
            raise ckpt.CheckpointError(
                f"{resume_path} was written by a run with {state['world_size']} process(es), this run has "
                f"{dist.world_size}: the data order depends on it. Resume with torchrun --nproc_per_node "
                f"{state['world_size']}, or start a new run without --resume_from_checkpoint"
            )
        check_resume_settings(state["settings"], args, device.type, resume_path)
        if state["total_steps"] != total_steps or state["batches_per_epoch"] != batches_per_epoch:
            raise ckpt.CheckpointError(
                f"{resume_path} belongs to a run with {state['total_steps']} steps of {state['batches_per_epoch']} "
                f"batches per epoch, this one has {total_steps} and {batches_per_epoch}: resume with the same "
                "data, batch size, accumulation and epochs"
            )
        global_step, start_epoch, start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        run_id = state["run_id"]
        if main:
            run_dir.adopt_run_id(args.output_dir, run_id, resume_path)
            ckpt.remove_newer_checkpoints(args.output_dir, global_step)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, global_step, start_epoch,
                    start_batch)

    model = student
    if args.torch_compile:
        model = torch.compile(model)
    if dist.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_log = MetricsLog(os.path.join(args.output_dir, "metrics.jsonl"), enabled=main,
                             resume=resume_path is not None)
    metrics_log.truncate_after(global_step)
    loss_kwargs = dict(temperature=getattr(args, "temperature", 2.0), impl=args.loss_impl)
    if distill:
        loss_kwargs.update(alpha_ce=args.alpha_ce, alpha_kd=args.alpha_kd)
    else:
        loss_kwargs.update(alpha_ce=1.0, alpha_kd=0.0)
    if main:
        logger.info("%s: %d examples -> %d features, %d epochs, %d steps (%d micro-batches of %d x %d ranks, "
                    "accumulation %d), precision %s, loss impl %s%s",
                    "distill" if distill else "finetune", len(train_examples), len(train_features), num_epochs,
                    total_steps, batches_per_epoch, args.per_device_train_batch_size, dist.world_size, accum,
                    {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype],
                    args.loss_impl, ", teacher logits from cache" if cache is not None else "")

    def run_eval(epoch_float: float, record: bool = True) -> dict | None:
        if main:
            metrics, predictions = evaluate_model(
                student, eval_examples, eval_features, collator, batch_size=args.per_device_eval_batch_size,
                device=device, n_best_size=args.n_best_size, max_answer_length=args.max_answer_length,
                autocast_dtype=autocast_dtype, progress=show)
            student.train()
            if record:
                metrics_log.write({"step": global_step, "epoch": round(epoch_float, 4),
                                   **{f"eval_{k}": v for k, v in metrics.items()}})
            logger.info("eval at step %d (epoch %.2f): exact_match %.2f f1 %.2f on %d questions (%.1f s)",
                        global_step, epoch_float, metrics["exact_match"], metrics["f1"], metrics["total"],
                        metrics["runtime_s"])
            result = {"metrics": metrics, "predictions": predictions}
        else:
            result = None
        barrier(dist)
        return result

    def check_finite() -> None:
        bad = int(first_bad_step.item())
        if bad >= 0:
            raise NonFiniteLossError(
                f"the training loss became non-finite (NaN or inf) at optimizer step {bad}; training stopped "
                f"and wrote nothing after it. Last good checkpoint: {ckpt.last_good_checkpoint(args.output_dir)}. "
                "Lower --learning_rate, try --precision bf16 or fp32, or check the data for broken features."
            )

    def save(epoch: int, batch_in_epoch: int) -> None:
        check_finite()
        ckpt.check_parameters_finite(student, global_step, args.output_dir)  # every rank: same decision
        log_window = all_reduce_mean(running, dist).tolist()  # collective: before the rank-0 branch
        if main:
            ckpt.save_checkpoint(args.output_dir, global_step, model=student, optimizer=optimizer,
                                 scheduler=scheduler, scaler=scaler, save_total_limit=args.save_total_limit,
                                 trainer_state={"epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                                "world_size": dist.world_size, "total_steps": total_steps,
                                                "batches_per_epoch": batches_per_epoch,
                                                "skipped_steps": skipped_steps, "run_id": run_id,
                                                "settings": run_settings(args, device.type),
                                                "last_eval_step": last_eval_step,
                                                "log_window": {"running": log_window, "steps": steps_since_log}})
        barrier(dist)

    # --- the loop
    student.train()
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    running = torch.zeros(3, device=device)  # loss, ce, kd summed over optimizer steps since the last log
    steps_since_log, features_since_log, skipped_steps = 0, 0, 0
    grad_norm = torch.zeros((), device=device)
    last_eval, last_eval_step = None, -1
    if resume_path is not None:  # evaluations up to the checkpoint are in metrics.jsonl; the log window goes on
        last_eval_step = state["last_eval_step"]
        running = torch.tensor(state["log_window"]["running"], dtype=running.dtype, device=device)
        steps_since_log = state["log_window"]["steps"]
    epoch = start_epoch
    log_time = time.perf_counter()
    progress = tqdm(total=total_steps, initial=global_step, desc="training", disable=not show, dynamic_ncols=True)
    done = global_step >= total_steps
    start_step = global_step
    for epoch in range(start_epoch, num_epochs):
        if done:
            break
        sampler.set_epoch(epoch, start_batch=start_batch if epoch == start_epoch else 0)
        batch_idx = start_batch if epoch == start_epoch else 0
        window_loss = torch.zeros(3, device=device)
        for batch in loader:
            window_start = batch_idx - batch_idx % accum
            window_size = min(accum, batches_per_epoch - window_start)
            is_update = batch_idx + 1 == window_start + window_size
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = contextlib.nullcontext() if is_update or not dist.enabled else model.no_sync()
            with sync:
                with autocast(device, autocast_dtype):
                    s_start, s_end = forward_qa(model, batch)
                t_start = t_end = None
                if cache is not None:
                    t_start, t_end = cache.lookup(batch["feature_index"].cpu(), s_start.shape[1])
                    t_start, t_end = t_start.to(device, non_blocking=True), t_end.to(device, non_blocking=True)
                elif teacher is not None:
                    with torch.no_grad(), autocast(device, autocast_dtype):
                        t_start, t_end = forward_qa(teacher, batch)
                out = qa_distillation_loss(s_start, s_end, batch["start_positions"], batch["end_positions"],
                                           t_start, t_end, mask=batch["attention_mask"].bool(), **loss_kwargs)
                scaler.scale(out.loss / window_size).backward()
            window_loss += torch.stack([out.loss.detach(), out.ce.detach(), out.kd.detach()]) / window_size
            features_since_log += batch["input_ids"].shape[0] * dist.world_size
            batch_idx += 1
            if not is_update:
                continue

            # one optimizer step
            if args.max_grad_norm and args.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            scale_before = scaler.get_scale() if use_scaler else None
            scaler.step(optimizer)
            scaler.update()
            if use_scaler and scaler.get_scale() < scale_before:
                skipped_steps += 1  # fp16 overflow: the scaler skipped this step and lowered its scale
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            first_bad_step = torch.where((~torch.isfinite(window_loss[0])) & (first_bad_step < 0),
                                         torch.full_like(first_bad_step, global_step), first_bad_step)
            running += window_loss
            window_loss = torch.zeros(3, device=device)
            steps_since_log += 1
            epoch_float = epoch + batch_idx / batches_per_epoch

            if global_step % args.logging_steps == 0 or global_step == total_steps:
                check_finite()
                mean = all_reduce_mean(running / steps_since_log, dist).tolist()
                elapsed = time.perf_counter() - log_time
                record = {"step": global_step, "epoch": round(epoch_float, 4), "loss": mean[0], "ce": mean[1],
                          "kd": mean[2], "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "features_per_second": features_since_log / max(elapsed, 1e-9),
                          "peak_memory_mb": peak_memory_mb(device), "skipped_steps": skipped_steps}
                metrics_log.write(record)
                progress.set_postfix(loss=f"{mean[0]:.4f}", lr=f"{record['lr']:.2e}")
                running.zero_()
                steps_since_log, features_since_log, log_time = 0, 0, time.perf_counter()
            epoch_done = batch_idx == batches_per_epoch
            # Every evaluation of a step runs before that step's checkpoint, so a resume from it never
            # repeats or skips one (the checkpoint records last_eval_step).
            if (args.eval_strategy == "steps" and global_step % args.eval_steps == 0) or \
                    (args.eval_strategy == "epoch" and epoch_done) or \
                    (args.eval_strategy != "no" and global_step == total_steps):
                last_eval = run_eval(epoch_float) or last_eval
                last_eval_step = global_step
            if (args.save_steps and global_step % args.save_steps == 0) or epoch_done or global_step == total_steps:
                save(epoch + 1 if epoch_done else epoch, 0 if epoch_done else batch_idx)
                if _interrupt_at_step is not None and global_step >= _interrupt_at_step:
                    progress.close()
                    return {"interrupted_at_step": global_step}
            if global_step >= total_steps:
                done = True
                break
    progress.close()
    check_finite()

    # --- final evaluation and outputs
    ckpt.check_parameters_finite(student, global_step, args.output_dir)
    if args.eval_strategy != "no" and global_step == start_step:  # same decision on every rank
        # Resumed at the final checkpoint: its evaluation is logged already; score again for the outputs.
        last_eval = run_eval(num_epochs, record=last_eval_step != global_step)
    results = {"global_step": global_step, "skipped_steps": skipped_steps}
    if dist.enabled:
        results["rank_param_checksums"] = check_ranks_in_sync(student, dist)
    if main:
        save_model(student, tokenizer, args)
        if last_eval is not None:
            results.update(last_eval["metrics"])
            write_json(os.path.join(args.output_dir, "eval_results.json"), last_eval["metrics"])
            write_json(os.path.join(args.output_dir, "predictions.json"), last_eval["predictions"])
        plot_curves(metrics_log.records, os.path.join(args.output_dir, "training_curves.png"),
                    title=f"{args.command}: {os.path.basename(os.path.normpath(args.output_dir))}")
        write_json(os.path.join(args.output_dir, "train_results.json"), results)
    barrier(dist)
    return results


def check_ranks_in_sync(model, dist: DistState) -> list[float]:
    """Every rank must end with the same parameters; a silent divergence would corrupt the run."""
    checksum = torch.stack([p.detach().double().pow(2).sum() + p.detach().double().sum()
                            for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, checksum)
    values = [float(g) for g in gathered]
    if len(set(values)) != 1:
        raise RuntimeError(f"data-parallel ranks ended with different parameters (checksums {values})")
    return values


def save_model(model, tokenizer, args) -> None:
    """The final model and tokenizer with save_pretrained, plus the resolved configuration."""
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    write_json(os.path.join(args.output_dir, "training_args.json"), {k: v for k, v in vars(args).items()})


# ----------------------------------------------------------------------------- evaluation only

def evaluate(args: argparse.Namespace) -> dict:
    """Score a saved model on the dev set: eval_results.json and predictions.json in --output_dir."""
    device = init_distributed(args.device).device
    quiet_progress_bars(args.disable_tqdm)
    autocast_dtype, _ = resolve_precision(args.precision, device)
    model = load_qa_model(args.model_name_or_path, attn_implementation=args.attn_implementation).to(device)
    tokenizer = load_tokenizer(args.model_name_or_path)
    _, _, eval_examples, eval_features = load_datasets(args, tokenizer, need_train=False)
    collator = QACollator(tokenizer.pad_token_id, pad_to_multiple_of=8)
    metrics, predictions = evaluate_model(model, eval_examples, eval_features, collator,
                                          batch_size=args.per_device_eval_batch_size, device=device,
                                          n_best_size=args.n_best_size, max_answer_length=args.max_answer_length,
                                          autocast_dtype=autocast_dtype, progress=not args.disable_tqdm)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "eval_results.json"), metrics)
    write_json(os.path.join(args.output_dir, "predictions.json"), predictions)
    logger.info("%s: exact_match %.2f f1 %.2f on %d questions", args.model_name_or_path, metrics["exact_match"],
                metrics["f1"], metrics["total"])
    print(json.dumps({"exact_match": metrics["exact_match"], "f1": metrics["f1"]}))
    return metrics
