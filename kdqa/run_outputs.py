"""What a finished training run leaves in its folder (rank 0 writes it, once, at the end): the
model, the dev predictions, the curves, train_results.json/all_results.json in run_qa.py's shapes,
and the report card. `run` is the trainer's Run (kdqa.trainer), read here and never changed."""

from __future__ import annotations

import os
import time

from kdqa import run_dir
from kdqa.atomic_io import write_json_atomic
from kdqa.inference import write_prediction_outputs
from kdqa.loss import resolve_loss_impl
from kdqa.precision import PRECISION_NAMES
from kdqa.report_card import MODEL_CARD_NAME, REPORT_NAMES, RunFacts, write_run_report_and_card
from kdqa.reporting import plot_curves


def write_run_outputs(run, results: dict, epoch: float) -> None:
    """Every file of the finished run: the model, then the eval files, the curves, the results files and
    the report card; results gains the last evaluation's metrics (what train() returns on rank 0)."""
    args, p = run.args, run.progress
    save_model(run.student, run.tokenizer, args)
    run_dir.record_outputs(args.output_dir, *run_dir.result_files(  # before they are written
        evaluated=p.last_eval is not None, predicts=bool(getattr(args, "do_predict", False))))
    all_results = dict(results)  # run_qa.py's all_results.json: train results + eval_-prefixed eval metrics
    if p.last_eval is not None:
        results.update(p.last_eval["metrics"])
        write_prediction_outputs(args.output_dir, "eval", p.last_eval["predictions"], p.last_eval["nbest"],
                                 p.last_eval["metrics"])
        all_results.update({f"eval_{k}": v for k, v in p.last_eval["metrics"].items()})
    plot_curves(run.metrics_log.records, os.path.join(args.output_dir, "training_curves.png"),
                title=f"{args.command}: {os.path.basename(os.path.normpath(args.output_dir))}",
                loss_terms=list(run.objective.weights))
    write_results_files(run, results, all_results, epoch)
    write_report_card(run)


def write_report_card(run) -> None:
    """report.md/report.json and the model card (README.md) of the finished run (rank 0)."""
    args, p, data = run.args, run.progress, run.data
    last = p.last_eval or {}
    run_dir.record_outputs(args.output_dir, *REPORT_NAMES, MODEL_CARD_NAME)  # kdqa's: overwrite may remove them
    write_run_report_and_card(
        run_facts(args), metrics=last.get("metrics"), predictions=last.get("predictions"),
        objective=run.objective.describe(resolve_loss_impl(args.loss_impl, run.device))
        | ({"teacher_logits": "from the cache " + args.teacher_logits_cache if data.collator.teacher_logits is not None
            else "online"} if args.mode == "distill" else {}),
        data={"train_questions": len(data.train_examples), "train_features": len(data.train_features),
              "dev_questions": None if data.eval_examples is None else len(data.eval_examples),
              "dev_sample": data.eval_sample,
              "max_seq_length": args.max_seq_length},
        training={"epochs": run.schedule.num_epochs, "optimizer_steps": p.step,
                  "wall_time_s": round(time.perf_counter() - p.started, 1),
                  "precision": PRECISION_NAMES[run.autocast_dtype], "seed": args.seed})


def run_facts(args) -> RunFacts:
    """The run's identity as the report card names it, read once from the command line."""
    return RunFacts(command=args.command, output_dir=args.output_dir, model_name_or_path=args.model_name_or_path,
                    teacher_model_name_or_path=args.teacher_model_name_or_path, student_layers=args.student_layers,
                    distilled=args.mode == "distill")


def write_results_files(run, results: dict, all_results: dict, epoch: float) -> None:
    """train_results.json and all_results.json in run_qa.py's shapes (Trainer's train_* figures, and in
    all_results eval_samples: the dev features), kdqa's own keys beside them."""
    args, p, s = run.args, run.progress, run.schedule
    steps_run = p.step - p.start_step
    figures = train_figures(run.metrics_log.records, runtime=time.perf_counter() - p.started,
                            samples=len(run.data.train_features), steps_run=steps_run,
                            samples_run=steps_run * args.per_device_train_batch_size * s.accumulation
                            * run.dist.world_size, epoch=epoch)
    write_json_atomic(os.path.join(args.output_dir, "train_results.json"), {**figures, **results})
    if run.data.eval_features is not None and "eval_f1" in all_results:
        all_results["eval_samples"] = len(run.data.eval_features)
    write_json_atomic(os.path.join(args.output_dir, "all_results.json"), {**figures, **all_results})
    if run.metrics_log.sink is not None:  # the last record is written: close the TensorBoard file
        run.metrics_log.sink.close()


def save_model(model, tokenizer, args, extra_writers=()) -> list[str]:
    """The final model folder: model and tokenizer (save_pretrained), the resolved configuration, and
    whatever each extra_writers(folder) adds (e.g. a model card). Written into a staging folder and
    moved into --output_dir (run_dir.publish_staged), so a kill leaves the previous state or the whole
    new one, never a model without its tokenizer. Returns the names written."""
    def write(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_json_atomic(os.path.join(folder, "training_args.json"), {k: v for k, v in vars(args).items()})
        for writer in extra_writers:
            writer(folder)
    return run_dir.publish_staged(args.output_dir, write)



def train_figures(records: list[dict], *, runtime: float, samples: int, steps_run: int, samples_run: int,
                  epoch: float) -> dict:
    """run_qa.py's train_results.json keys (Trainer's speed_metrics) from this run's metrics.jsonl records.

    train_loss is the mean loss over every optimizer step (each record is the mean of its steps, so
    it is weighted by how many steps it covers), as Trainer reports it; runtime, steps and samples
    per second are this process's (a resumed run: since the resume), as Trainer's are.
    """
    total, last_step = 0.0, 0
    for record in (r for r in records if "loss" in r):
        total += record["loss"] * (record["step"] - last_step)
        last_step = record["step"]
    return {"epoch": epoch, "train_loss": total / last_step if last_step else float("nan"),
            "train_runtime": round(runtime, 4), "train_samples": samples,
            "train_samples_per_second": round(samples_run / max(runtime, 1e-9), 3),
            "train_steps_per_second": round(steps_run / max(runtime, 1e-9), 3)}
