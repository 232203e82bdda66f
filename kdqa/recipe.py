"""The seed recipe end to end: fine-tune the teacher, fine-tune the student (the baseline), distil
the student from the teacher, and print the table teacher / student / distilled student (EM/F1).

Defaults reproduce the seed notebook: bert-base-uncased 2 epochs, distilbert-base-uncased 3 epochs,
lr 2e-5, batch 16, weight decay 0.01, T = 2, alphas 0.5/0.5. Offline, give local models and data.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os

from kdqa.data import load_squad
from kdqa.modeling import ModelLoadError, OFFLINE_HELP, hub_reachable
from kdqa.reporting import write_json

logger = logging.getLogger("kdqa")


def _is_local(path: str | None) -> bool:
    return path is not None and os.path.isdir(path)


def preflight(args: argparse.Namespace) -> None:
    """Fail within seconds, naming the offline flags, when something would need the unreachable hub."""
    needs_hub = []
    if not _is_local(args.teacher_model_name_or_path):
        needs_hub.append(f"the teacher {args.teacher_model_name_or_path!r} (--teacher_model_name_or_path)")
    if not args.student_layers and not _is_local(args.model_name_or_path):
        needs_hub.append(f"the student {args.model_name_or_path!r} (--model_name_or_path, or --student_layers)")
    if not (args.train_file and args.validation_file):
        needs_hub.append(f"the dataset {args.dataset_name!r} (--train_file and --validation_file)")
    if needs_hub and not hub_reachable():
        raise ModelLoadError(
            "the recipe needs the Hugging Face hub for " + "; ".join(needs_hub)
            + ", and the hub cannot be reached. " + OFFLINE_HELP
        )


def run_recipe(args: argparse.Namespace) -> dict:
    from kdqa.trainer import train

    preflight(args)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    if args.train_file and args.validation_file:
        # Check both files before hours of training, not after.
        load_squad(train_file=args.train_file, validation_file=args.validation_file)

    base = copy.deepcopy(args)
    base.overwrite_output_dir = True
    base.resume_from_checkpoint = None

    teacher_args = copy.deepcopy(base)
    teacher_args.command = "finetune"
    teacher_args.mode = "finetune"
    teacher_args.model_name_or_path = args.teacher_model_name_or_path
    teacher_args.student_layers = None
    teacher_args.num_train_epochs = args.teacher_num_train_epochs
    teacher_args.learning_rate = args.teacher_learning_rate or args.learning_rate
    teacher_args.output_dir = os.path.join(out, "teacher")

    student_args = copy.deepcopy(base)
    student_args.command = "finetune"
    student_args.mode = "finetune"
    student_args.output_dir = os.path.join(out, "student")
    if args.student_layers:
        # The student is those layers of the teacher's *base* model, as DistilBERT was built from BERT.
        student_args.model_name_or_path = args.teacher_model_name_or_path

    distill_args = copy.deepcopy(student_args)
    distill_args.command = "distill"
    distill_args.mode = "distill"
    distill_args.teacher_model_name_or_path = teacher_args.output_dir
    distill_args.output_dir = os.path.join(out, "distilled")
    if distill_args.teacher_logits_cache is None:
        distill_args.teacher_logits_cache = os.path.join(out, "teacher_logits_cache")

    results = {}
    for name, run_args in (("teacher", teacher_args), ("student", student_args), ("distilled student", distill_args)):
        logger.info("=== recipe: %s -> %s", name, run_args.output_dir)
        results[name] = train(run_args)
    table = format_table(results, teacher_args, student_args)
    print(table)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    write_json(os.path.join(out, "results.json"), {k: {"exact_match": v.get("exact_match"), "f1": v.get("f1")}
                                                   for k, v in results.items()})
    return results


def format_table(results: dict, teacher_args, student_args) -> str:
    """The seed's table: model, EM, F1, as Markdown."""
    names = {
        "teacher": f"teacher ({teacher_args.model_name_or_path}, {teacher_args.num_train_epochs:g} epochs)",
        "student": f"student ({_student_name(student_args)}, fine-tuned {student_args.num_train_epochs:g} epochs)",
        "distilled student": f"distilled student ({_student_name(student_args)}, {student_args.num_train_epochs:g} "
                             "epochs)",
    }
    lines = ["| model | EM | F1 |", "| --- | ---: | ---: |"]
    for key, label in names.items():
        r = results.get(key, {})
        em, f1 = r.get("exact_match"), r.get("f1")
        lines.append(f"| {label} | {em:.2f} | {f1:.2f} |" if em is not None else f"| {label} | n/a | n/a |")
    return "\n".join(lines)


def _student_name(args) -> str:
    if args.student_layers:
        return f"layers {args.student_layers} of {os.path.basename(os.path.normpath(args.model_name_or_path))}"
    return os.path.basename(os.path.normpath(args.model_name_or_path))
