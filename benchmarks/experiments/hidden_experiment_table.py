"""Issue 15's table from the runs of benchmarks/experiments/hidden_experiment.sh: EM, F1, gap closed, time per epoch.

    python benchmarks/experiments/hidden_experiment_table.py runs/hidden-experiment   # writes hidden_experiment.md/.png there

Reads each run's metrics.jsonl (evaluations per epoch, training loss terms) and the driver's
start/done times (driver*.log). Time per epoch = (wall time - evaluations - time paused) / epochs,
so it includes loading, the teacher's forward passes (online-teacher runs) or building the teacher
cache (logits KD). A run stopped for another job has its stopped seconds in OUT/NAME.paused_s.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import sys

LABELS = {"finetuned": "fine-tuned (CE only)", "kd": "logits KD (T = 2, 0.5 CE + 0.5 KD)"}


def label(name: str) -> str:
    match = re.fullmatch(r"hidden-(mse|cosine)-(.+)", name)
    if match:
        return f"logits KD + hidden {match[1].upper() if match[1] == 'mse' else 'cosine'}, alpha_hidden {match[2]}"
    return LABELS.get(name, name)


def driver_times(out: str) -> dict[str, float]:
    """{run: wall seconds} from the driver logs' '<time> start NAME' / '<time> done NAME' lines."""
    starts, walls = {}, {}
    for path in sorted(glob.glob(os.path.join(out, "driver*.log"))):
        for line in open(path, encoding="utf-8"):
            parts = line.split()
            if len(parts) == 3 and parts[1] in ("start", "done"):
                when = datetime.datetime.strptime(parts[0], "%Y-%m-%dT%H:%M:%SZ").timestamp()
                if parts[1] == "start":
                    starts[parts[2]] = when
                elif parts[2] in starts:
                    walls[parts[2]] = when - starts[parts[2]]
    return walls


def read_run(folder: str) -> dict:
    records = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") if line.strip()]
    evals = [r for r in records if "eval_f1" in r]
    train = [r for r in records if "loss" in r]
    return {"evals": evals, "train": train}


def main(out: str) -> int:
    walls = driver_times(out)
    names = ["teacher", "finetuned", "kd"] + sorted(n for n in os.listdir(out) if n.startswith("hidden-mse-")) \
        + sorted(n for n in os.listdir(out) if n.startswith("hidden-cosine-"))
    runs = {n: read_run(os.path.join(out, n)) for n in names if os.path.isfile(os.path.join(out, n, "metrics.jsonl"))}
    finished = {n: r for n, r in runs.items()
                if r["evals"] and os.path.isfile(os.path.join(out, n, "all_results.json"))}  # a run that ended
    if "teacher" not in finished or "finetuned" not in finished:
        print(f"error: {out} needs a finished teacher and fine-tuned student", file=sys.stderr)
        return 2
    teacher_f1, base_f1 = finished["teacher"]["evals"][-1]["eval_f1"], finished["finetuned"]["evals"][-1]["eval_f1"]
    lines = ["| student | EM | F1 | F1 vs logits KD | gap closed | dev F1 per epoch | min/epoch |", "|---|---:|---:|---:|---:|---|---:|"]
    kd_f1 = finished.get("kd", {"evals": [{"eval_f1": float("nan")}]})["evals"][-1]["eval_f1"]
    for name, run in finished.items():
        last = run["evals"][-1]
        epochs = len(run["evals"])
        evals_s = sum(e.get("eval_runtime_s", 0.0) for e in run["evals"])
        paused_file = os.path.join(out, f"{name}.paused_s")  # seconds a run was stopped (SIGSTOP) for another job
        paused = float(open(paused_file).read()) if os.path.isfile(paused_file) else 0.0
        per_epoch = (walls[name] - evals_s - paused) / epochs / 60 if name in walls else float("nan")
        gap = "" if name == "teacher" else f"{100 * (last['eval_f1'] - base_f1) / (teacher_f1 - base_f1):.0f} %"
        versus = "" if name in ("teacher", "kd") else f"{last['eval_f1'] - kd_f1:+.2f}"
        curve = " / ".join(f"{e['eval_f1']:.1f}" for e in run["evals"])
        who = "teacher (all-MiniLM-L6-v2, 2 epochs)" if name == "teacher" else label(name)
        lines.append(f"| {who} | {last['eval_exact_match']:.2f} | {last['eval_f1']:.2f} | {versus} | {gap} | {curve} | {per_epoch:.1f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "hidden_experiment.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot(finished, os.path.join(out, "hidden_experiment.png"))
    return 0


def plot(runs: dict, path: str) -> None:
    """Dev F1 per epoch and the training loss terms (ce, kd, hidden) per logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, run in runs.items():
        if name == "teacher":
            continue
        axes[0].plot([e["epoch"] for e in run["evals"]], [e["eval_f1"] for e in run["evals"]], marker="o", label=label(name))
        steps = [r["step"] for r in run["train"]]
        axes[1].plot(steps, [r["ce"] for r in run["train"]], label=label(name))
        if any(r.get("hidden") for r in run["train"]):
            axes[2].plot(steps, [r["hidden"] for r in run["train"]], label=label(name))
    axes[0].axhline(runs["teacher"]["evals"][-1]["eval_f1"], color="grey", linestyle="--", label="teacher")
    axes[0].set(xlabel="epoch", ylabel="dev F1 (first 1,000 questions)", title="dev F1")
    axes[1].set(xlabel="step", ylabel="CE against the gold span", title="training CE")
    axes[2].set(xlabel="step", ylabel="hidden term (before alpha_hidden)", title="hidden-state term", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/hidden-experiment"))
