"""What a run shows people: metrics.jsonl, eval_results.json, predictions.json, the curves PNG, the
recipe's table and plot (recipe_results.md/.json/.png), and which progress bars are on."""

from __future__ import annotations

import io
import json
import logging
import os
import resource

import torch

from kdqa.atomic_io import open_own, write_bytes_atomic, write_json_atomic, write_text_atomic

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


# ----------------------------------------------------------------------------- the recipe's table and plot

# The names of the recipe's rows that the plot shortens (kdqa.recipe names its stages with them).
HIDDEN_STAGE = "distilled student + hidden states"
SERVED = "served student"


def write_recipe_results(output_dir: str, rows: dict, table: str, *, speed_questions: int, dev_sample: dict,
                         banner: list[str], elapsed: float, estimate: float | None) -> None:
    """recipe_results.md (the table), recipe_results.json (its rows and how they were measured) and
    recipe_results.png (the plot) in the recipe's folder."""
    write_text_atomic(os.path.join(output_dir, "recipe_results.md"), table + "\n")
    write_json_atomic(os.path.join(output_dir, "recipe_results.json"), {
        "models": rows, "speed_test": {"questions": speed_questions, "device": "cpu",
                                       "threads": torch.get_num_threads()},
        "dev_sample": dev_sample,
        "settings": banner, "elapsed_s": round(elapsed, 1),
        "estimate_s": None if estimate is None else round(estimate, 1)})
    plot_results(rows, os.path.join(output_dir, "recipe_results.png"))


def format_table(rows: dict, speed_questions: int, dev_sample=None) -> str:
    """The seed's table as Markdown: model, EM, F1, parameters, CPU ms per question, speed-up; under it,
    which dev questions were scored and timed (a kdqa.dev_sample.DevSample) and on how many (speed_questions)."""
    lines = [f"| model | EM | F1 | parameters | CPU ms/question ({speed_questions} questions, one at a "
             "time) | speed-up |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows.values():
        em = "n/a" if row["exact_match"] is None else f"{row['exact_match']:.2f}"
        f1 = "n/a" if row["f1"] is None else f"{row['f1']:.2f}"
        lines.append(f"| {row['label']} | {em} | {f1} | {row['parameters'] / 1e6:.1f}M | "
                     f"{row['ms_per_question']:.1f} | {row['speedup']:.2f}x |")
    if dev_sample is not None:
        lines += ["", f"EM/F1 on {dev_sample.text()}; speed on {speed_questions} dev questions chosen "
                        "the same way."]
    return "\n".join(lines)


# The plot's tick labels: short enough that five sit side by side (the table's rows carry the long ones).
PLOT_LABELS = {"teacher": "teacher", "student": "fine-tuned\nstudent", "distilled student": "logits KD",
               HIDDEN_STAGE: "logits KD\n+ hidden states", SERVED: "served int8"}


def plot_results(rows: dict, path: str) -> None:
    """EM/F1 and CPU ms per question side by side."""
    save_figure(results_figure(rows), path, dpi=120)


def results_figure(rows: dict):
    """The plot's figure (apart so a test can measure its tick labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    ticks = [PLOT_LABELS.get(name, name.replace(" + ", "\n+ ")) for name in names]
    x = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for offset, key, label in ((-0.2, "exact_match", "EM"), (0.2, "f1", "F1")):
        left.bar([i + offset for i in x], [rows[n][key] or 0.0 for n in names], width=0.4, label=label)
    left.set_xticks(list(x), ticks)
    left.set_ylabel("score on the dev questions")
    left.set_title("accuracy")
    left.legend()
    bars = right.bar(list(x), [rows[n]["ms_per_question"] for n in names], color="tab:gray")
    for bar, name in zip(bars, names):
        right.annotate(f"{rows[name]['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                       ha="center", va="bottom")
    right.set_xticks(list(x), ticks)
    right.set_ylabel("CPU ms per question (one at a time)")
    right.set_title("speed (speed-up against the teacher)")
    fig.tight_layout()
    return fig
