"""Which run an output dir belongs to: the run id in its run.json.

Its own module because two owners need it: run_dir writes it when a run starts (and on resume),
checkpoint reads it to keep `--resume_from_checkpoint latest` to the folder's own run.
"""

from __future__ import annotations

import json
import os
import time

from kdqa.atomic_io import write_json_atomic

RUN_FILE = "run.json"


def read_run_id(output_dir: str | None) -> str | None:
    """The run id recorded in output_dir/run.json, or None where there is none."""
    try:
        with open(os.path.join(output_dir, RUN_FILE), encoding="utf-8") as f:
            return json.load(f)["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_file(output_dir: str, run_id: str) -> None:
    """Record run_id (and when it started) in output_dir/run.json, atomically and durably."""
    write_json_atomic(os.path.join(output_dir, RUN_FILE),
                      {"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                      indent=None, ensure_ascii=True, end="")
