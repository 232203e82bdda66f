"""What a run shows people: metrics.jsonl, eval_results.json, predictions.json, the curves PNG, and
which progress bars are on."""

from __future__ import annotations

import io
import json
import logging
import os
import resource

import torch

from kdqa.atomic_io import open_own, write_bytes_atomic, write_text_atomic

logger = logging.getLogger("kdqa")


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and keeps them for the plot.

    A kill mid-write can leave a torn last line: on resume it is dropped (it belongs to a step after
    the checkpoint, which the resumed run logs again); a damaged line elsewhere is an error naming
    the file and line. Rewrites go through a temporary file, so a kill never loses the log. A symlink
    named metrics.jsonl is replaced, never written through (atomic_io.open_own).
    """

    def __init__(self, path: str, enabled: bool = True, resume: bool = False):
        self.path = path
        self.enabled = enabled
        self.sink = None  # called with every record written (--report_to tensorboard: kdqa.tensorboard_log)
        self.records: list[dict] = []
        if enabled and resume and os.path.isfile(path):
            self.records = read_metrics_records(path)
        elif enabled:
            os.close(open_own(path, os.O_WRONLY | os.O_TRUNC))

    def truncate_after(self, step: int) -> None:
        """On resume, forget what an interrupted run logged after its checkpoint."""
        if not self.enabled:
            return
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with os.fdopen(open_own(self.path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.sink is not None:
            self.sink(record)


def read_metrics_records(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a kill mid-write) is dropped with a warning."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if position == len(numbered) - 1:
                logger.warning("%s: dropped a torn last line %d (a write cut short by an interruption)", path,
                               number)
                break
            raise ValueError(f"{path} line {number} is not a JSON record ({err}); the file was damaged or "
                             "edited: repair or delete that line, then resume again") from None
        records.append(record)
    return records


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_curves(records: list[dict], path: str, title: str = "", loss_terms: list[str] = ()) -> str | None:
    """Training loss (and each named term that is ever nonzero) and dev F1/EM against the step, as a PNG.

    loss_terms: the names of the loss's terms as the trainer logs them (e.g. ["ce", "kd"]).
    """
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_f1" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], label="loss")
        shown = [name for name in loss_terms if any(r.get(name, 0) for r in train)]
        if len(shown) > 1:  # one term alone is the loss itself
            for name in shown:
                ax_loss.plot(steps, [r.get(name, float("nan")) for r in train], label=name, alpha=0.7)
        ax_loss.set_xlabel("optimizer step")
        ax_loss.set_ylabel("training loss")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
    if evals:
        steps = [r["step"] for r in evals]
        ax_f1.plot(steps, [r["eval_f1"] for r in evals], marker="o", label="F1")
        ax_f1.plot(steps, [r["eval_exact_match"] for r in evals], marker="s", label="EM")
        ax_f1.set_xlabel("optimizer step")
        ax_f1.set_ylabel("dev score (%)")
        ax_f1.legend()
        ax_f1.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return path


def save_figure(fig, path: str, dpi: int) -> None:
    """A matplotlib figure as a PNG, written atomically (never through a symlink at path), then closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def quiet_progress_bars(quiet: bool) -> None:
    """--disable_tqdm (and ranks other than 0) silence every bar: ours, datasets' (tokenisation) and
    transformers' (loading weights)."""
    import datasets
    import transformers

    if quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    else:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
