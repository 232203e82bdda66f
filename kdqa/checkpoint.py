"""Checkpoints that resume a run exactly and never leave a broken latest one.

A checkpoint folder holds the model (safetensors), the optimizer, scheduler and gradient-scaler
states (loaded with torch.load(weights_only=True): no arbitrary unpickling), and trainer_state.json
with the step, the data-order position and every RNG state. It is written under a temporary name
and renamed when complete, so a crash mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def rng_state() -> dict:
    """Every RNG the run draws from: Python, NumPy, torch CPU and each CUDA device."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_cpu": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = [torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _model_state(model) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights): save contiguous clones.
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(output_dir: str, step: int, *, model, optimizer, scheduler, scaler, trainer_state: dict,
                    save_total_limit: int = 2) -> str:
    """Write checkpoint-{step} atomically and delete the oldest beyond save_total_limit."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    save_file(_model_state(model), os.path.join(tmp, "model.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
    state = dict(trainer_state, rng=rng_state(), step=step)
    with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (never *.tmp) of output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str | None) -> str:
    """'latest' -> the newest complete checkpoint of output_dir; a folder -> itself, checked."""
    if spec == "latest":
        found = list_checkpoints(output_dir) if output_dir else []
        if not found:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir!r}; "
                "drop the flag to start a new run"
            )
        return found[-1]
    needed = ["model.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json"]
    missing = [n for n in needed if not os.path.isfile(os.path.join(spec, n))]
    if missing:
        raise CheckpointError(
            f"--resume_from_checkpoint {spec}: not a complete kdqa checkpoint (missing {', '.join(missing)}); "
            "give a checkpoint-N folder or 'latest'"
        )
    return spec


def load_checkpoint(path: str, *, model, optimizer, scheduler, scaler, map_location="cpu") -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG states; return the trainer state."""
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors"), device=str(map_location)))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=map_location,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=True))
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    set_rng_state(state["rng"])
    return state
