"""What the benchmark scripts share: their command line's start, the environment record, the table writers.

Each script adds its own flags and its own table columns; the repeated parts live here once, so every
result file records its machine, date, versions and command the same way.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import sys


def parser(doc: str, out_help: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph, defaults shown, and `--out` (benchmarks/results)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help=out_help)
    return p


def device_name(device: str) -> str:
    """The CUDA device's name, or the CPU with the threads torch uses."""
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def utc_date() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The command as it was typed from the repository root, for the result file."""
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if sys.argv and sys.argv[0] else "-"


def fmt(x, digits: int = 3, thousands: bool = False) -> str:
    """A table cell: '-' for missing/NaN, `digits` significant digits, whole numbers from 1000 up."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        if abs(x) < 1000:
            return f"{x:.{digits}g}"
        return f"{x:,.0f}" if thousands else f"{x:.0f}"
    return str(x)


def environment_lines(env: dict, keys) -> list[str]:
    """The markdown bullet list of the environment record, in the given order."""
    return [f"- {k}: `{env[k]}`" for k in keys]


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    """One row per dict, the given columns, None written as an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
