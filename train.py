"""kdqa's entry point: fine-tune, distil, evaluate, query or export extractive QA models (SQuAD v1.1).

    python train.py finetune --model_name_or_path M --output_dir D
    python train.py distill --teacher_model_name_or_path T --model_name_or_path S --output_dir D
    python train.py evaluate --model_name_or_path M --validation_file F --output_dir D
    python train.py predict --model_name_or_path M --question Q --context C   # or --test_file F --output_dir D
    python train.py export --model_name_or_path M --output_dir E [--quantize int8]   # ONNX (+ int8)
    python train.py            # the seed recipe: teacher, student, distilled student, and their table
    python train.py --model_name_or_path M --train_file T --validation_file V --do_train --do_eval --output_dir D
                               # run_qa.py's command line: any --do_* (or args.json) without a sub-command = finetune

Several GPUs: torchrun --nproc_per_node N train.py distill ...
`python train.py <command> --help` lists every flag with its default.
"""

import copy
import logging
import os
import signal
import sys
import threading


def run_command(args) -> None:
    """Run the sub-command; finetune/distill run the phases --do_train/--do_eval/--do_predict chose.

    Each command's module is imported here, when it is chosen: they import torch and transformers
    (seconds), which `train.py --help` and a bad flag's one line never need."""
    if args.command == "recipe":
        from kdqa.recipe import run_recipe
        run_recipe(args)
        return
    if args.command == "evaluate":
        from kdqa.inference import evaluate_command
        evaluate_command(args)
        return
    if args.command == "predict":
        from kdqa.inference import predict_command
        predict_command(args)
        return
    if args.command == "export":
        from kdqa.export import export_command
        export_command(args)
        return
    if args.do_train:
        from kdqa.trainer import train
        train(args)  # evaluates unless --do_train came without --do_eval (then eval_strategy is "no")
    elif args.do_eval and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one rank writes the files
        from kdqa.inference import evaluate_command
        evaluate_command(args)  # --do_eval alone: the model as it is
    if args.do_predict and int(os.environ.get("RANK", "0")) == 0:
        from kdqa.inference import predict_command

        # After training, the trained model in --output_dir answers; without it, --model_name_or_path.
        predict_command(_with_model(args, args.output_dir) if args.do_train else args)


def _with_model(args, model_name_or_path: str):
    """A copy of args (its class kept: args.window and args.decoding) naming another model."""
    other = copy.copy(args)
    other.model_name_or_path = model_name_or_path
    return other


class Terminated(BaseException):
    """SIGTERM outside the training loop (loading, tokenising, the cache build, the final evaluation):
    it stops the command with one line instead of silently. Inside the loop StopRequest takes it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def report_stop(args, stop: BaseException, argv) -> int:
    """One line for a run stopped by a signal (or a second Ctrl-C), with the command that continues it;
    exit 128 + the signal's number."""
    from kdqa.checkpoint import list_checkpoints
    from kdqa.interrupt import TrainingInterrupted, continue_command

    command = continue_command(sys.argv[1:] if argv is None else list(argv), sys.argv[0] if argv is None else
                               "train.py", int(os.environ.get("WORLD_SIZE", "1")))
    name, code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)
    if isinstance(stop, TrainingInterrupted):
        line, code = f"{stop}; continue with: {command}", stop.exit_code
    elif args.command == "recipe" or (args.command in ("finetune", "distill") and
                                      list_checkpoints(getattr(args, "output_dir", None))):
        line = f"interrupted ({name}); continue from the last checkpoint with: {command}"
    else:
        line = f"interrupted ({name})"
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train.py {args.command}: {line}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """Run train.py's command line; SIGTERM is taken from the first line on, before the imports of torch
    and transformers (seconds), so a scheduler's pre-emption right after start is one line and 143."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return _main(argv)
    except (KeyboardInterrupt, Terminated) as stop:  # while parsing and importing, before the command ran
        if os.environ.get("KDQA_TRACEBACK"):
            raise
        name, code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)
        print(f"train.py: interrupted ({name}) while starting", file=sys.stderr)
        return code
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _main(argv) -> int:
    from kdqa.config import ConfigError, parse_args

    try:
        args = parse_args(argv)
    except ConfigError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[kdqa] %(asctime)s %(message)s", datefmt="%H:%M:%S")
    from kdqa.checkpoint import CheckpointError
    from kdqa.data import SquadDataError
    from kdqa.modeling import ModelLoadError
    from kdqa.interrupt import TrainingInterrupted
    from kdqa.trainer import NonFiniteLossError

    user_errors = (ConfigError, SquadDataError, ModelLoadError, CheckpointError, NonFiniteLossError,
                   FileExistsError, FileNotFoundError, ValueError)
    try:
        run_command(args)
    except (TrainingInterrupted, KeyboardInterrupt, Terminated) as stop:
        if os.environ.get("KDQA_TRACEBACK"):
            raise
        return report_stop(args, stop, argv)
    except user_errors as err:
        # Bad input or a stopped run: one clear line, not a traceback from deep inside a library
        # (KDQA_TRACEBACK=1 shows the traceback too).
        if os.environ.get("KDQA_TRACEBACK"):
            raise
        print(f"train.py {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
