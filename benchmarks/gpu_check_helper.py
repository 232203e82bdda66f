"""Helpers of benchmarks/gpu_check.sh: the bf16 teacher folder, the tiny dry-run inputs, the summary.

    python benchmarks/gpu_check_helper.py convert SRC DST   all-MiniLM-L6-v2 as bf16 safetensors + tokenizer
    python benchmarks/gpu_check_helper.py tiny DIR          a tiny model and SQuAD files for --dry-run
    python benchmarks/gpu_check_helper.py summary OUT WORK  OUT/summary.md from the parts' status and tables
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
#: What comes back from the GPU machine: at most 8 files, each under 16 MiB, two folders deep.
MAX_FILES, MAX_BYTES = 8, 16 * 2**20


def convert(src: str, dst: str) -> None:
    """The teacher's weights in bfloat16 (half the bytes); config says float32, so kdqa loads and
    trains it in float32 as it would the original (bf16 rounding of the weights is the only change)."""
    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    weights = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
               for k, v in weights.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["torch_dtype"] = config["dtype"] = "float32"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def tiny(folder: str) -> None:
    """--dry-run's prepared folder: a 2-layer hidden-32 BERT as the teacher, SQuAD-shaped files."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from tiny_models import make_model_folder, make_name_task, tiny_bert_config, write_squad

    os.makedirs(os.path.join(folder, "squad"), exist_ok=True)
    make_model_folder(os.path.join(folder, "minilm"), tiny_bert_config(layers=2, dropout=0.0))
    write_squad(os.path.join(folder, "squad", "train-v1.1.json"), make_name_task(24, seed=1, prefix="t"))
    write_squad(os.path.join(folder, "squad", "dev-v1.1.json"), make_name_task(8, seed=2, prefix="d"))


def _versions() -> list[str]:
    lines = [f"python {platform.python_version()}"]
    for name in ("torch", "triton", "transformers", "datasets", "tokenizers", "onnxruntime", "liger_kernel"):
        try:
            module = __import__(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')} ({os.path.dirname(module.__file__)})")
        except Exception as exc:  # absent or broken: say so, it is part of the report
            lines.append(f"{name}: not importable ({type(exc).__name__})")
    return lines


def _device() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return (f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                    f"CUDA {torch.version.cuda}")
    except Exception as exc:
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    return f"no CUDA device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def summary(out: str, work: str) -> None:
    """OUT/summary.md: device, versions, each part's status (ok / failed / timed out / skipped and
    why, its time against its budget), and every table the parts wrote; then the size limits."""
    with open(os.path.join(work, "parts.tsv")) as f:
        parts = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    lines = ["# GPU check", "", f"- device: {_device()}", *[f"- {v}" for v in _versions()], "",
             "## Parts", "", "| part | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    for name, status, seconds, budget, note in parts:
        lines.append(f"| {name} | {status} | {seconds} | {budget} | {note} |")
    for title, path in (("Kernel tests (compiled)", "kernel_tests.tail"),
                        ("bench_loss", "loss/bench_loss.md"),
                        ("bench_train bf16", "train_bf16/bench_train.md"),
                        ("bench_train fp16", "train_fp16/bench_train.md"),
                        ("Recipe", "recipe/recipe_results.md")):
        full = os.path.join(work, path)
        lines += ["", f"## {title}", ""]
        if os.path.exists(full):
            with open(full) as f:
                text = f.read().strip()
            lines.append(text if not path.endswith(".tail") else "```\n" + text + "\n```")
        else:
            lines.append("(not written: see the part's status above)")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    check_out(out)


def check_out(out: str) -> None:
    """Refuse an OUT that would not come back whole (too many files, too large, too deep)."""
    files = []
    for root, _, names in os.walk(out):
        depth = os.path.relpath(root, out).count(os.sep) + (root != out)
        for name in names:
            files.append((os.path.join(root, name), depth))
    problems = [f"{len(files)} files (at most {MAX_FILES})"] if len(files) > MAX_FILES else []
    problems += [f"{p}: {os.path.getsize(p)} bytes" for p, _ in files if os.path.getsize(p) >= MAX_BYTES]
    problems += [f"{p}: more than two folders deep" for p, d in files if d > 2]
    if problems:
        raise SystemExit("gpu_check: OUT would not come back whole: " + "; ".join(problems))
    print(f"gpu_check: {len(files)} files in {out}, the largest {max((os.path.getsize(p) for p, _ in files), default=0)} bytes")


def main(argv: list[str]) -> None:
    commands = {"convert": convert, "tiny": tiny, "summary": summary, "check_out": check_out}
    if not argv or argv[0] not in commands:
        raise SystemExit(__doc__)
    commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
