"""Checkpoints that resume a run exactly, survive a kill at any moment and tell a damaged one apart.

A checkpoint folder holds the model (safetensors), the optimizer, scheduler and gradient-scaler
states (loaded with torch.load(weights_only=True): no arbitrary unpickling), kdqa_state.json
(step, data-order position, every RNG state, the run id, the settings that shape the run; named
trainer_state.json before issue 24, still read: HF's file of that name holds other keys) and
checksums.json (size and sha256 of every other file). It is written under `checkpoint-N.tmp`,
every file fsync'ed, renamed whole and the directory fsync'ed, so a crash leaves either the
complete checkpoint or none. Resume verifies the checksums: a damaged newest checkpoint is
reported and the newest intact one of the same run is used instead. Parameters are checked for
NaN/inf before anything is written, so a checkpoint is never a non-finite one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kdqa.atomic_io import fsync_path, write_json_atomic
from kdqa.run_identity import read_run_id

logger = logging.getLogger("kdqa")

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST = "checksums.json"
STATE_FILE = "kdqa_state.json"
LEGACY_STATE_FILE = "trainer_state.json"  # older kdqa checkpoints; HF's Trainer's file of that name differs
PAYLOAD_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", STATE_FILE)
STATE_KEYS = ("step", "epoch", "batch_in_epoch", "world_size", "total_steps", "batches_per_epoch", "rng",
              "run_id", "settings", "last_eval_step", "log_window")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^checkpoint-\d+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, unsafe or does not fit this run."""


class NonFiniteParametersError(CheckpointError):
    """The model's parameters hold NaN or inf: nothing is saved from them."""


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
    # safetensors refuses shared storage (tied weights): save contiguous copies, made on the CPU so a
    # checkpoint never needs a second copy of the model in GPU memory.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _first_non_finite(tensors) -> str | None:
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_parameters_finite(model, step: int, output_dir: str | None) -> None:
    """Raise NonFiniteParametersError naming the step and the last good checkpoint if any parameter is NaN/inf."""
    bad = _first_non_finite(model.state_dict().items())
    if bad is not None:
        raise NonFiniteParametersError(_non_finite_message(bad, step, output_dir))


def _non_finite_message(bad: str, step: int, output_dir: str | None) -> str:
    return (f"the model's parameters became non-finite (NaN or inf, first: {bad}) by optimizer step {step}; "
            f"nothing was saved from them. Last good checkpoint: {last_good_checkpoint(output_dir)}. Lower "
            "--learning_rate, try --precision bf16 or fp32, or check the data for broken features.")


def last_good_checkpoint(output_dir: str | None) -> str:
    """The newest intact checkpoint of the output dir's run, or 'none' (for messages)."""
    if not output_dir:
        return "none"
    return newest_intact_checkpoint(output_dir, read_run_id(output_dir)) or "none"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_compact_json(path: str, obj) -> None:
    write_json_atomic(path, obj, indent=None, ensure_ascii=True, end="")


def _is_checkpoint_name(name: str) -> bool:
    """checkpoint-N, or checkpoint-N.<anything> (a half-written one)."""
    return name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].split(".")[0].isdigit()


def is_our_checkpoint(path: str) -> bool:
    """A real checkpoint-N folder holding kdqa's checkpoint files: its checksums.json of kdqa's payload, or
    (older kdqa) a trainer_state.json with kdqa's keys. Not a symlink, nor another trainer's checkpoint."""
    if not _is_checkpoint_name(os.path.basename(path)) or os.path.islink(path) or not os.path.isdir(path):
        return False
    manifest = _json_in(path, MANIFEST)
    state = _json_in(path, STATE_FILE) or _json_in(path, LEGACY_STATE_FILE)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if isinstance(files, dict) and "model.safetensors" in files and set(files) <= {*PAYLOAD_FILES, LEGACY_STATE_FILE}:
        return True
    return isinstance(state, dict) and {"run_id", "batches_per_epoch", "batch_in_epoch"} <= set(state)


def _json_in(folder: str, name: str):
    """The JSON in folder/name when it is a regular file that parses, else None."""
    path = os.path.join(folder, name)
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_checkpoint(output_dir: str, step: int, *, model, optimizer, scheduler, scaler, trainer_state: dict,
                    save_total_limit: int = 2, rng_by_rank: list[dict] | None = None,
                    keep_step: int | None = None) -> str:
    """Write checkpoint-{step} atomically and durably, then delete the oldest beyond save_total_limit.

    Raises NonFiniteParametersError (nothing written) if a parameter is NaN/inf, and CheckpointError
    with one line if the disk is full or not writable (the half-written folder is removed; the
    previous checkpoints are untouched). rng_by_rank: every rank's RNG states (DDP: each rank's
    dropout draws from its own GPU's generator), else this process's.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    model_state = _model_state(model)
    bad = _first_non_finite(model_state.items())
    if bad is not None:
        raise NonFiniteParametersError(_non_finite_message(bad, step, output_dir))
    tmp = final + ".tmp"
    try:
        _remove_folder(tmp)
        os.makedirs(tmp)
        save_file(model_state, os.path.join(tmp, "model.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        state = dict(trainer_state, rng=rng_by_rank[0] if rng_by_rank else rng_state(), step=step)
        if rng_by_rank and len(rng_by_rank) > 1:
            state["rng_by_rank"] = rng_by_rank  # the other ranks' streams (rank 0's is "rng")
        _write_compact_json(os.path.join(tmp, STATE_FILE), state)
        files = {}
        for name in PAYLOAD_FILES:
            path = os.path.join(tmp, name)
            fsync_path(path)
            files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
        _write_compact_json(os.path.join(tmp, MANIFEST), {"files": files})  # last: marks the folder complete
        fsync_path(tmp)
        _remove_folder(final)
        os.replace(tmp, final)
        fsync_path(output_dir)
    except Exception as err:  # a kill (no exception) leaves checkpoint-N.tmp: removed on the next start
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
            reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err)
            hint = " (free some disk space)" if getattr(err, "errno", None) == errno.ENOSPC or \
                "No space left" in str(err) else ""
            raise CheckpointError(
                f"could not write checkpoint {final}: {reason}{hint}; the half-written folder was removed and "
                f"the last complete checkpoint is {last_good_checkpoint(output_dir)}. Fix that and resume with "
                "--resume_from_checkpoint latest"
            ) from err
        raise
    # Never a link; never checkpoint-{keep_step} (the best one, --load_best_model_at_end): the limit counts the others.
    kept = [p for p in list_checkpoints(output_dir) if is_our_checkpoint(p) and checkpoint_step(p) != keep_step]
    for old in kept[:-save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def log_window_state(window_by_rank, steps: int) -> dict:
    """The checkpoint's log window: rank 0's unlogged sums, and under DDP every rank's (as with the RNGs)."""
    state = {"running": window_by_rank[0], "steps": steps}
    if len(window_by_rank) > 1:
        state["running_by_rank"] = list(window_by_rank)
    return state


def restored_log_window(window: dict, rank: int) -> dict:
    """This rank's unlogged sums of a checkpoint's log window (an older kdqa's DDP checkpoint holds
    only their mean over ranks: every rank takes that)."""
    by_rank = window.get("running_by_rank")
    return by_rank[rank] if by_rank and rank < len(by_rank) else window["running"]


def _remove_folder(path: str) -> None:
    """Clear the way for a checkpoint folder: a symlink there is removed as a link (what it points to is
    never written into nor deleted), a folder with what it holds."""
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.exists(path):
        shutil.rmtree(path)


def checkpoint_step(path: str) -> int:
    m = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def list_checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders of output_dir that were renamed into place (never *.tmp), oldest first.

    Renamed means complete when written; whether the files are still intact is verify_checkpoint's job.
    """
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path) and (os.path.isfile(os.path.join(path, MANIFEST))
                                          or os.path.isfile(os.path.join(path, state_file_name(path)))):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def remove_half_written(output_dir: str) -> list[str]:
    """Delete checkpoint-N.tmp folders a killed run left behind; returns their names."""
    removed = []
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):
            if _TMP_RE.match(name):
                path = os.path.join(output_dir, name)
                os.unlink(path) if os.path.islink(path) else shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
    return removed


def remove_newer_checkpoints(output_dir: str, step: int) -> list[str]:
    """After resuming from step, checkpoints beyond it are superseded (and would outrank new ones)."""
    removed = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step and is_our_checkpoint(p)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        logger.info("removed %s: newer than the step-%d checkpoint this run resumes from",
                    ", ".join(os.path.basename(p) for p in removed), step)
    return removed


def state_file_name(path: str) -> str:
    """The checkpoint's state file: kdqa_state.json, or trainer_state.json in one an older kdqa wrote."""
    if not os.path.isfile(os.path.join(path, STATE_FILE)) and os.path.isfile(os.path.join(path, LEGACY_STATE_FILE)):
        return LEGACY_STATE_FILE
    return STATE_FILE


def payload_files(path: str) -> tuple[str, ...]:
    """The files checksums.json must list for this checkpoint (the state file under its name there)."""
    name = state_file_name(path)
    return tuple(name if f == STATE_FILE else f for f in PAYLOAD_FILES)


def verify_checkpoint(path: str, run_id: str | None = None) -> str | None:
    """None when the checkpoint is intact (and of run_id, if given), else why not, naming the file."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"{manifest_path} is missing (incomplete checkpoint)"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest_path} is unreadable ({type(err).__name__})"
    for name in payload_files(path):
        file_path = os.path.join(path, name)
        expected = files.get(name) if isinstance(files, dict) else None
        if expected is None:
            return f"{manifest_path} lists no checksum for {name}"
        if not os.path.isfile(file_path):
            return f"{file_path} is missing"
        size = os.path.getsize(file_path)
        if size != expected.get("bytes"):
            return f"{file_path} has {size} bytes, {expected.get('bytes')} were written (truncated or damaged)"
        if _sha256(file_path) != expected.get("sha256"):
            return f"{file_path} does not match its checksum (damaged)"
    try:
        state = read_trainer_state(path)
    except CheckpointError as err:
        return str(err)
    if run_id is not None and state["run_id"] != run_id:
        return f"{path} belongs to another run ({state['run_id']}, this output dir's run is {run_id})"
    return None


def read_trainer_state(path: str) -> dict:
    """The checkpoint's trainer state (step, settings, schedule, ...) without touching any weights:
    what a resume checks before it loads anything."""
    state_path = os.path.join(path, state_file_name(path))
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{state_path} is unreadable ({type(err).__name__}: {err})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{state_path} lacks {', '.join(missing)} (damaged or written by an older kdqa)")
    return state


def newest_intact_checkpoint(output_dir: str, run_id: str | None, report=None) -> str | None:
    """The newest checkpoint of run_id that passes verify_checkpoint; report(path, why) for each skipped one."""
    for path in reversed(list_checkpoints(output_dir)):
        why = verify_checkpoint(path, run_id)
        if why is None:
            return path
        if report is not None:
            report(path, why)
    return None


def resolve_checkpoint(spec: str, output_dir: str | None) -> str:
    """'latest' -> the newest intact checkpoint of output_dir's run; a folder -> itself, verified.

    A damaged newest checkpoint is named in a warning and the next intact one is used; with none
    intact, or an explicit folder that is damaged, CheckpointError says which file is wrong.
    """
    if spec == "latest":
        found = list_checkpoints(output_dir) if output_dir else []
        if not found:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir!r}; "
                "drop the flag to start a new run"
            )
        run_id = read_run_id(output_dir)
        if run_id is None:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: {output_dir} has no run.json, so which run its checkpoints "
                "belong to is unknown; give a checkpoint folder explicitly or start over with --overwrite_output_dir"
            )
        problems = []

        def report(path, why):
            problems.append(why)
            logger.warning("checkpoint %s is damaged or not this run's, skipped: %s", path, why)

        path = newest_intact_checkpoint(output_dir, run_id, report)
        if path is None:
            raise CheckpointError(f"--resume_from_checkpoint latest: no intact checkpoint of this run in "
                                  f"{output_dir} ({'; '.join(problems)})")
        if problems:
            logger.warning("resuming from %s, the newest intact checkpoint", path)
        return path
    why = verify_checkpoint(spec)
    if why is not None:
        raise CheckpointError(f"--resume_from_checkpoint {spec}: not an intact kdqa checkpoint: {why}; "
                              "give another checkpoint-N folder or 'latest'")
    return spec


def _torch_load(path: str, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a safe checkpoint: torch.load(weights_only=True) refused to "
                              f"unpickle it ({first}); kdqa only loads plain tensors and numbers") from None
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged and cannot be read ({type(err).__name__}: {err})") from None


def load_checkpoint(path: str, *, model, optimizer, scheduler, scaler, map_location="cpu", rank: int = 0,
                    shape_flags: tuple[str, ...] = ()) -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG states (this rank's); return the trainer state.
    shape_flags: the flags besides the model's that decide what the checkpointed model holds (the loss
    terms' flags), named where it does not fit."""
    state = read_trainer_state(path)
    model_path = os.path.join(path, "model.safetensors")
    try:
        weights = load_file(model_path, device=str(map_location))
    except Exception as err:  # safetensors raises its own error type for a truncated header
        raise CheckpointError(f"{model_path} is damaged and cannot be read ({type(err).__name__}: {err})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing/unexpected keys or other shapes: another model than this run's
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"{model_path} does not fit this run's model ({' '.join(first[1:2] or first[:1]).strip()[:200]}); "
            "resume with the flags the run started with (model, --student_layers"
            f"{''.join(', --' + flag for flag in shape_flags)}), or start a new run without "
            "--resume_from_checkpoint") from None
    optimizer.load_state_dict(_torch_load(os.path.join(path, "optimizer.pt"), map_location))
    scheduler.load_state_dict(_torch_load(os.path.join(path, "scheduler.pt"), "cpu"))
    scaler.load_state_dict(_torch_load(os.path.join(path, "scaler.pt"), "cpu"))
    by_rank = state.get("rng_by_rank")
    set_rng_state(by_rank[rank] if by_rank and rank < len(by_rank) else state["rng"])
    return state
