"""train.py's sub-commands and their flags: each flag group declared once, with its defaults and
help, and COMMANDS giving each sub-command the groups it reads, so its --help lists only those.
Torch-free: building the parser (and `train.py --help`) imports no torch.
"""

from __future__ import annotations

import argparse

from kdqa.argv_config import Parser, actions, add_config_flag
from kdqa.choices import EXPORT_QUANTIZE, LOSS_IMPLS, PREDICT_QUANTIZE, RUNTIMES
from kdqa.dev_sample import DEFAULT_EVAL_SAMPLE, EVAL_SAMPLE_HELP, EVAL_SAMPLES
from kdqa.export_rules import (DEFAULT_CALIBRATION_QUESTIONS, DEFAULT_MAX_INT8_DROP, DEFAULT_OPSET, DEFAULT_TOLERANCE,
                               MAX_INT8_DROP_HELP)
from kdqa.run_qa_compat import add_run_qa_args, add_training_arguments_args, note_run_qa_differences, steps_or_ratio


RECIPE_DEFAULTS = {
    "teacher_model_name_or_path": "bert-base-uncased",
    "model_name_or_path": "distilbert-base-uncased",
    "teacher_num_train_epochs": 2.0,
    "num_train_epochs": 3.0,
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ----------------------------------------------------------------------------- the flag groups
# Each group is declared once, here; COMMANDS (below) gives each command the groups it reads.

MODEL_HELP = {
    "finetune": "the model to fine-tune (folder or hub name)",
    "distill": "the student's starting weights (folder or hub name); see --student_layers",
    "evaluate": "the model to evaluate (folder or hub name)",
    "predict": "a model folder (train.py output), or an exported one / a .onnx file (ONNX Runtime)",
    "export": "the model folder to export",
    "recipe": "the student's base model (ignored where --student_layers builds it from the teacher)",
}


OUTPUT_DIR_HELP = {
    "evaluate": "where eval_predictions.json, eval_nbest_predictions.json and eval_results.json go",
    "predict": "where predict_predictions.json goes (with --test_file)",
    "export": "where model.onnx and the tokenizer go (may be the model folder)",
}


def _add_model_args(p: argparse.ArgumentParser, command: str) -> None:
    """The model a command starts from and the folder its outputs go to."""
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=RECIPE_DEFAULTS["model_name_or_path"] if command == "recipe"
                   else None, help=MODEL_HELP[command])
    g.add_argument("--output_dir", default="runs/recipe" if command == "recipe" else None,
                   help=OUTPUT_DIR_HELP.get(command, "where the model, metrics and checkpoints go"))


def _add_data_args(p: argparse.ArgumentParser, training: bool = True) -> None:
    """The dev set (every command that scores one) and, where a command trains, the training set."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default="squad", help="hub dataset used when no local files are given")
    if training:
        g.add_argument("--train_file", default=None, help="local SQuAD v1.1 train JSON (.json or .json.gz)")
    g.add_argument("--validation_file", default=None, help="local SQuAD v1.1 dev JSON (.json or .json.gz)")
    if training:
        g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training questions")
    g.add_argument("--max_eval_samples", type=int, default=None,
                   help="score only N evaluation questions, chosen by --eval_sample")
    g.add_argument("--eval_sample", choices=EVAL_SAMPLES, default=DEFAULT_EVAL_SAMPLE,
                   help="which N questions --max_eval_samples (and the recipe's preset and speed test) takes: "
                        + "; ".join(f"{k}: {v}" for k, v in EVAL_SAMPLE_HELP.items()))
    if training:
        g.add_argument("--preprocessing_num_workers", type=int, default=None, help="processes for tokenisation")
        g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes")


def _add_window_args(p: argparse.ArgumentParser) -> None:
    """How a question + context is cut into features (kdqa.features.Window: `args.window`)."""
    g = p.add_argument_group("windows")
    g.add_argument("--max_seq_length", type=int, default=384, help="tokens per feature (question + context window)")
    g.add_argument("--doc_stride", type=int, default=128, help="overlap in tokens between context windows")
    g.add_argument("--max_query_length", type=int, default=64, help="questions are cut to this many tokens")


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    """How start/end logits become an answer (kdqa.postprocess.Decoding: `args.decoding`)."""
    g = p.add_argument_group("decoding")
    g.add_argument("--n_best_size", type=int, default=20, help="start/end candidates per window when decoding")
    g.add_argument("--max_answer_length", type=int, default=30, help="longest answer in tokens when decoding")


def _add_runtime_args(p: argparse.ArgumentParser, with_precision: bool = True) -> None:
    """Where and how the models run. predict has no --precision: it runs fp32 (or --quantize int8)."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    if with_precision:
        g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                       help="auto: bf16 on GPUs that support it, else fp16 with a gradient scaler; fp32 on the CPU")
        g.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"],
                       help="attention kernel of the models (sdpa: torch scaled_dot_product_attention)")
    g.add_argument("--per_device_eval_batch_size", type=int, default=64, help="features per evaluation batch")
    g.add_argument("--disable_tqdm", action="store_true", help="no progress bars")
    g.add_argument("--use_cpu", "--no_cuda", action="store_true", default=argparse.SUPPRESS,
                   help="same as --device cpu (TrainingArguments' names)")


# What --loss_impl picks (kdqa.loss.resolve_loss_impl); said here so --help needs no torch.
LOSS_IMPL_HELP = ("fused Triton loss or its PyTorch reference (auto: Triton on CUDA tensors, and on the CPU when "
                  "TRITON_INTERPRET=1 was set before start-up, which runs the kernel in Triton's interpreter: "
                  "exact but slow, for tests; otherwise the reference)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--per_device_train_batch_size", type=int, default=16, help="features per step per GPU")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=2e-5, help="peak learning rate of AdamW")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases/LayerNorm)")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of steps of linear warm-up")
    g.add_argument("--num_train_epochs", type=float, default=3.0, help="epochs (a fraction stops mid-epoch)")
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; > 0 overrides --num_train_epochs")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    g.add_argument("--loss_impl", choices=LOSS_IMPLS, default="auto", help=LOSS_IMPL_HELP)
    g.add_argument("--seed", type=int, default=42, help="seed of weights init, dropout and data order")
    g.add_argument("--group_by_length", action="store_true", help="batch features of similar length together")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the student (and online teacher)")
    g.add_argument("--student_layers", default=None,
                   help="build the student from these encoder layers (e.g. 0,2,4) of --model_name_or_path, "
                        "or of the teacher when no --model_name_or_path is given, plus its embeddings")
    _add_run_args(p)
    add_training_arguments_args(p)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """A training run's logging, evaluation and checkpoints."""
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow a non-empty output dir without resuming")
    g.add_argument("--logging_steps", type=steps_or_ratio, default=50,
                   help="log to metrics.jsonl every N optimizer steps (a value below 1: that fraction of all steps, "
                        "rounded up, as transformers)")
    g.add_argument("--eval_strategy", "--evaluation_strategy", choices=["epoch", "steps", "end", "no"], default="epoch",
                   help="when to score the dev set: every epoch, every --eval_steps, once after the last step (end), "
                        "or never; epoch and steps also score after the last step")
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (eval_strategy steps)")
    g.add_argument("--save_steps", type=int, default=500, help="checkpoint every N optimizer steps (0: only at epoch ends)")
    g.add_argument("--save_total_limit", type=int, default=2, help="keep only the last N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output_dir")


def _add_distill_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation", "used in distill mode (the distill command, the recipe's last stage); "
                                             "finetune has these keys too (one config file serves both modes) "
                                             "and ignores them")
    g.add_argument("--teacher_model_name_or_path", default=None, help="the fine-tuned teacher (folder or hub name)")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of the KD term")
    g.add_argument("--alpha_ce", type=float, default=0.5, help="weight of the cross-entropy on gold spans")
    g.add_argument("--alpha_kd", type=float, default=0.5, help="weight of T^2 * KL(teacher || student)")
    g.add_argument("--teacher_logits_cache", default=None,
                   help="folder caching the teacher's logits of every training feature, computed once")
    g.add_argument("--alpha_hidden", type=float, default=0.0,
                   help="weight of the hidden-state term: student layers learn the teacher's hidden states "
                        "(0: off, logits only); needs the online teacher, not --teacher_logits_cache")
    g.add_argument("--hidden_loss", choices=["mse", "cosine"], default="mse",
                   help="the hidden-state distance over real tokens: mse (TinyBERT) or cosine (DistilBERT's L_cos)")
    g.add_argument("--hidden_layer_map", default=None,
                   help="STUDENT:TEACHER layer pairs, 0 = embeddings, e.g. 1:2,2:4,3:6 (default: the layers "
                        "--student_layers copied, else a uniform map)")
    g.add_argument("--alpha_attention", type=float, default=0.0,
                   help="weight of the attention term: KL between the mapped layers' attention distributions, per "
                        "head (0: off); runs eager attention, needs the online teacher")
    g.add_argument("--attention_layer_map", default=None,
                   help="STUDENT:TEACHER layer pairs of the attention term, layers from 1, e.g. 1:2,2:4,3:6 "
                        "(default: as --hidden_layer_map's)")
    g.add_argument("--alpha_relation", type=float, default=0.0,
                   help="weight of MiniLMv2's relation term: KL between the mapped layers' query-query, key-key and "
                        "value-value relations (0: off); any widths and head counts, needs the online teacher")
    g.add_argument("--relation_layer_map", default=None,
                   help="STUDENT:TEACHER layer pairs of the relation term, layers from 1 (default: as --hidden_layer_map's)")
    g.add_argument("--relation_heads", type=int, default=None,
                   help="relation heads the queries, keys and values are split into (default: the teacher's "
                        "attention heads); must divide both models' widths")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The recipe's own flags, and its defaults where they differ from a single run's."""
    p.set_defaults(teacher_model_name_or_path=RECIPE_DEFAULTS["teacher_model_name_or_path"],
                   num_train_epochs=RECIPE_DEFAULTS["num_train_epochs"])
    g = p.add_argument_group("recipe")
    g.add_argument("--teacher_num_train_epochs", type=float, default=RECIPE_DEFAULTS["teacher_num_train_epochs"],
                   help="epochs of the teacher's fine-tuning (students use --num_train_epochs)")
    g.add_argument("--teacher_learning_rate", type=float, default=None,
                   help="learning rate of the teacher's fine-tuning (default: --learning_rate)")
    g.add_argument("--data_dir", default=None,
                   help="folder holding SQuAD v1.1 under its official names (train-v1.1*.json[.gz], "
                        "dev-v1.1.json[.gz]); without it: $KDQA_DATA_DIR, data/squad/ in the repository, "
                        "../shared/data/squad/ beside it, or the hub")
    g.add_argument("--full", action="store_true",
                   help="all of the data on the CPU too (without it, a CPU-only machine runs a ~15-minute preset)")
    g.add_argument("--speed_test_questions", type=int, default=None,
                   help="dev questions of the speed test, chosen by --eval_sample (default: 1000, or the CPU preset's 100)")


def _add_predict_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("predict")
    g.add_argument("--question", default=None, help="one question (with --context)")
    g.add_argument("--context", default=None, help="the text that holds the answer to --question")
    g.add_argument("--test_file", default=None,
                   help="SQuAD v1.1 JSON (.json/.json.gz, official or flat layout) or JSON lines of "
                        "{id, question, context}")
    g.add_argument("--max_predict_samples", type=int, default=None, help="answer only the first N questions")
    g.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="auto: ONNX Runtime when the folder has model.onnx (or a .onnx file is given), else PyTorch")
    g.add_argument("--quantize", choices=PREDICT_QUANTIZE, default="none",
                   help="int8: PyTorch dynamic int8 Linear layers, or the folder's model_int8.onnx in ONNX Runtime")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("export")
    g.add_argument("--quantize", choices=EXPORT_QUANTIZE, default="none",
                   help="int8: also write model_int8.onnx, static int8 calibrated on --train_file (answers do not "
                        "depend on the batch); int8-dynamic: dynamic int8, no calibration, batch-dependent answers")
    g.add_argument("--train_file", default=None, help="SQuAD v1.1 JSON whose first questions calibrate --quantize int8")
    g.add_argument("--calibration_questions", type=int, default=DEFAULT_CALIBRATION_QUESTIONS,
                   help="training questions --quantize int8 calibrates on (cut into --max_seq_length windows)")
    g.add_argument("--validation_file", default=None,
                   help="SQuAD v1.1 JSON whose first 200 questions check the int8 model against the fp32 one "
                        "(default: --train_file's questions after the calibration ones)")
    g.add_argument("--max_int8_drop", type=float, default=DEFAULT_MAX_INT8_DROP, help=MAX_INT8_DROP_HELP)
    g.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest allowed |ONNX Runtime - PyTorch| difference of a start/end logit")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    g.add_argument("--disable_tqdm", action="store_true", help="no progress bars (loading, calibration)")


# ----------------------------------------------------------------------------- the commands

DESCRIPTION = (
    "Task-specific knowledge distillation for extractive QA (SQuAD v1.1).\n\n"
    "  python train.py finetune --model_name_or_path M --output_dir D\n"
    "  python train.py distill --teacher_model_name_or_path T --model_name_or_path S --output_dir D\n"
    "  python train.py evaluate --model_name_or_path M --validation_file F --output_dir D\n"
    "  python train.py predict --model_name_or_path M --question Q --context C\n"
    "  python train.py export --model_name_or_path M --output_dir E [--quantize int8]\n"
    "  python train.py [recipe flags]   # the seed recipe: teacher, student, distilled student\n\n"
    "run_qa.py users: --do_train/--do_eval/--do_predict, --fp16/--bf16, --pad_to_max_length and\n"
    "`python train.py finetune args.json` work; each command's --help marks the defaults that differ\n"
    "from run_qa.py's (batch size, learning rate, weight decay: the seed recipe's).\n"
    "Without a sub-command, a run_qa.py command line (any --do_* flag, or an args.json with do_* keys)\n"
    "runs finetune; anything else runs the recipe.\n"
)

# Each command: (its one-line help, its description or None, its flag groups in --help order).
_TRAINING_GROUPS = ("model", "data", "windows", "decoding", "runtime", "training", "distillation", "run_qa")
COMMANDS = {
    "finetune": ("plain fine-tuning (CE loss, no teacher)", None, _TRAINING_GROUPS),
    "distill": ("distil a student from a fine-tuned teacher", None, _TRAINING_GROUPS),
    "evaluate": ("EM/F1 of a model on a dev set", None,
                 ("model", "dev data", "windows", "decoding", "runtime", "run_qa")),
    "predict": ("answer questions with a model folder",
                "Answer one question (--question/--context: prints the answer and its score) or every question "
                "of --test_file (writes predict_predictions.json and predict_nbest_predictions.json into "
                "--output_dir). Gold answers are optional.",
                ("model", "windows", "decoding", "runtime without precision", "predict")),
    "export": ("export a model folder to ONNX (+ int8)",
               "Write model.onnx (dynamic batch and sequence axes) and the tokenizer into --output_dir, after "
               "checking that ONNX Runtime gives PyTorch's logits; --quantize int8 adds model_int8.onnx (ONNX "
               "Runtime static int8, calibrated on --train_file's first questions cut into these windows; the "
               "schemes worth trying are scored against the fp32 model on held-out questions, the best kept "
               "within --max_int8_drop).",
               ("model", "windows", "export")),
    "recipe": ("the seed recipe end to end (also what `python train.py` with no sub-command runs)",
               "Fine-tune the teacher, fine-tune the student (baseline), distil the student from the teacher, "
               "and print the table teacher / student / distilled student in EM/F1.",
               _TRAINING_GROUPS + ("recipe",)),
}
# The phases of the commands that have no --do_* flags.
FIXED_PHASES = {"evaluate": dict(do_train=False, do_eval=True), "recipe": dict(do_train=True, do_eval=True)}


def _add_group(p: argparse.ArgumentParser, command: str, group: str) -> None:
    """Add one flag group (a name of COMMANDS' lists) to command's parser."""
    adders = {
        "model": lambda: _add_model_args(p, command),
        "data": lambda: _add_data_args(p),
        "dev data": lambda: _add_data_args(p, training=False),
        "windows": lambda: _add_window_args(p),
        "decoding": lambda: _add_decoding_args(p),
        "runtime": lambda: _add_runtime_args(p),
        "runtime without precision": lambda: _add_runtime_args(p, with_precision=False),
        "training": lambda: _add_train_args(p),
        "distillation": lambda: _add_distill_args(p),
        "run_qa": lambda: add_run_qa_args(p, FIXED_PHASES.get(command)),
        "predict": lambda: _add_predict_args(p),
        "export": lambda: _add_export_args(p),
        "recipe": lambda: _add_recipe_args(p),
    }
    adders[group]()


def build_parser() -> argparse.ArgumentParser:
    """train.py's parser: each sub-command with the flag groups COMMANDS gives it."""
    parser = Parser(prog="train.py", formatter_class=_HelpFormatter, description=DESCRIPTION)
    add_config_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="{finetune,distill,evaluate,predict,export,recipe}")
    for command, (summary, description, groups) in COMMANDS.items():
        p = sub.add_parser(command, formatter_class=_HelpFormatter, help=summary, description=description)
        add_config_flag(p)
        for group in groups:
            _add_group(p, command, group)
        if "run_qa" in groups:
            note_run_qa_differences(actions(p))
    return parser
