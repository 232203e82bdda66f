"""--report_to tensorboard: every metrics.jsonl record also as TensorBoard scalars (issue 24 §3).

Tags are those Hugging Face's TensorBoardCallback writes for Trainer's logs (rewrite_logs):
`eval_f1` -> `eval/f1`, `loss` -> `train/loss`, the learning rate -> `train/learning_rate`, `epoch` ->
`train/epoch`; kdqa's own keys -> `train/KEY` (`train/ce`, `train/kd`, `train/grad_norm`, ...), at the
record's step. The run's flags go in as the text `args`. Only the main process writes. A resumed
run writes into the same folder with SummaryWriter(purge_step=checkpoint step + 1), so TensorBoard
drops what the interrupted run logged after its checkpoint, as metrics.jsonl does: one value per tag
and step.

Where: OUTPUT_DIR/runs, or $TENSORBOARD_LOGGING_DIR; a recipe stage (its `tensorboard_run`, e.g.
`teacher`) writes into <that folder>/<stage>, so one shared folder holds one TensorBoard run per
stage, side by side. The folder is checked before anything runs (check_log_dir): one line naming it
where it cannot be written, or where OUTPUT_DIR/runs is a symlink (kdqa writes only inside its output
folder).
"""

from __future__ import annotations

import glob
import json
import logging
import os

logger = logging.getLogger("kdqa")

EVENT_FILE_PATTERN = "events.out.tfevents.*"
ENV_VAR = "TENSORBOARD_LOGGING_DIR"
# metrics.jsonl keys named otherwise by Trainer's logs (the TensorBoard tag follows Trainer's name).
TRAINER_KEYS = {"lr": "learning_rate"}


class TensorBoardDirError(ValueError):
    """The TensorBoard folder cannot be used; the message names it and the fix."""


def log_dir_for(args) -> str:
    """--logging_dir, else $TENSORBOARD_LOGGING_DIR (as transformers reads them; <it>/<stage> for a recipe
    stage), else OUTPUT_DIR/runs."""
    shared = getattr(args, "logging_dir", None) or os.environ.get(ENV_VAR)
    if not shared:
        return os.path.join(args.output_dir, "runs")
    stage = getattr(args, "tensorboard_run", None)
    return os.path.join(shared, stage) if stage else shared


def tag_for(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key, as HF's rewrite_logs names Trainer's."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{TRAINER_KEYS.get(key, key)}"


def check_log_dir(args) -> str:
    """The run's TensorBoard folder, checked before anything runs (nothing is created): TensorBoardDirError,
    one line naming the folder and the fix, where it cannot be written (a path under a file, no write access)."""
    log_dir = log_dir_for(args)
    where = (f"--logging_dir ({log_dir})" if getattr(args, "logging_dir", None)
             else f"${ENV_VAR} ({log_dir})" if os.environ.get(ENV_VAR) else log_dir)
    own = os.path.join(args.output_dir, "runs")
    if log_dir == own and os.path.islink(own):
        raise TensorBoardDirError(
            f"{own} is a symlink (to {os.readlink(own)}): kdqa writes only inside its output folder; remove the "
            f"link, or set ${ENV_VAR} to the folder the events should go to")
    existing = os.path.abspath(log_dir)
    while not os.path.lexists(existing):  # the folders SummaryWriter will create hang from the first that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        why = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    else:
        return log_dir
    raise TensorBoardDirError(
        f"the TensorBoard folder {where} cannot be used ({why}): set ${ENV_VAR} to a folder you can write "
        "(or unset it for OUTPUT_DIR/runs), or drop --report_to tensorboard")


class TensorBoardLog:
    """A SummaryWriter fed one metrics.jsonl record at a time (MetricsLog's sink)."""

    def __init__(self, log_dir: str, *, start_step: int, resumed: bool, flags: dict, clear_old: bool = False):
        from torch.utils.tensorboard import SummaryWriter

        if clear_old and not resumed:
            # A fresh run in its own OUTPUT_DIR/runs (a folder --overwrite_output_dir keeps): the
            # previous run's events would mix with this one's. A shared $TENSORBOARD_LOGGING_DIR is left alone.
            for old in glob.glob(os.path.join(log_dir, EVENT_FILE_PATTERN)):
                os.remove(old)
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start_step + 1 if resumed else None)
        self.writer.add_text("args", "```\n" + json.dumps(flags, indent=2, sort_keys=True, default=str) + "\n```",
                             global_step=start_step)
        self.writer.flush()
        logger.info("TensorBoard event files: %s", log_dir)

    def __call__(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag_for(key), value, global_step=step)
        self.writer.flush()  # a kill loses nothing that metrics.jsonl holds

    def close(self) -> None:
        self.writer.close()


def reports_to_tensorboard(args) -> bool:
    return "tensorboard" in (getattr(args, "report_to", None) or [])


def open_tensorboard(args, *, start_step: int, resumed: bool, is_main: bool) -> TensorBoardLog | None:
    """The writer when --report_to resolved to tensorboard, on the main process; else None."""
    if not is_main or not reports_to_tensorboard(args):
        return None
    log_dir = check_log_dir(args)  # again: a resumed run's folder may have changed since the start
    return TensorBoardLog(log_dir, start_step=start_step, resumed=resumed, flags=vars(args),
                          clear_old=log_dir == os.path.join(args.output_dir, "runs"))
