"""--report_to tensorboard: every metrics.jsonl record also as TensorBoard scalars (issue 24 §3).

Tags follow Hugging Face's TensorBoardCallback: `eval_f1` -> `eval/f1`, every other key -> `train/KEY`
(`train/loss`, `train/ce`, `train/kd`, `train/lr`, `train/grad_norm`, ...), at the record's step. The
run's flags go in as the text `args`. Only the main process writes. A resumed run writes into the
same folder with SummaryWriter(purge_step=checkpoint step + 1), so TensorBoard drops what the
interrupted run logged after its checkpoint, as metrics.jsonl does: one value per tag and step.
"""

from __future__ import annotations

import glob
import json
import logging
import os

logger = logging.getLogger("kdqa")

EVENT_FILE_PATTERN = "events.out.tfevents.*"


def log_dir_for(output_dir: str) -> str:
    """$TENSORBOARD_LOGGING_DIR (as transformers reads it), else OUTPUT_DIR/runs."""
    return os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(output_dir, "runs")


def tag_for(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key, as HF's rewrite_logs names it."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


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


def open_tensorboard(args, *, start_step: int, resumed: bool, is_main: bool) -> TensorBoardLog | None:
    """The writer when --report_to resolved to tensorboard, on the main process; else None."""
    if not is_main or "tensorboard" not in (getattr(args, "report_to", None) or []):
        return None
    log_dir = getattr(args, "logging_dir", None) or log_dir_for(args.output_dir)  # --logging_dir first
    return TensorBoardLog(log_dir, start_step=start_step, resumed=resumed, flags=vars(args),
                          clear_old=log_dir == os.path.join(args.output_dir, "runs"))
