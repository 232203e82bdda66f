"""The output directory of one training run: who may write into it, and which run it belongs to.

- A lock (`.kdqa-run.lock`, an fcntl lock on a file holding the owner's pid): a second run into the
  same --output_dir is refused while the first is alive. The kernel drops the lock when its process
  dies, even by kill -9, so a killed run never blocks the next one.
- A run id (`run.json`), new for every run that starts from scratch and stamped into each of its
  checkpoints: `--resume_from_checkpoint latest` only takes checkpoints of this id, never those of
  a previous run that shared the folder.
- `--overwrite_output_dir` really starts over: the previous run's checkpoints and files are
  removed up front (sub-folders other than checkpoints are kept), so nothing of it can be
  mistaken for the new run's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

logger = logging.getLogger("kdqa")

LOCK_NAME = ".kdqa-run.lock"
RUN_FILE = "run.json"
_held: dict[str, "RunLock"] = {}


class OutputDirBusyError(FileExistsError):
    """Another live run holds the lock of this output directory."""


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's entry list holds the renames made in it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on output_dir held for the life of the run (or of the process)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise OutputDirBusyError(
                f"--output_dir {os.path.dirname(self.path)} is in use by a run that is still going ({owner}); "
                "wait for it to end or choose another --output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _key(output_dir: str) -> str:
    return os.path.realpath(output_dir)


def lock(output_dir: str) -> None:
    """Take output_dir's lock for this process (released by release() or when the process ends)."""
    if _key(output_dir) in _held:
        return
    held = RunLock(output_dir)
    held.acquire()
    _held[_key(output_dir)] = held


def release(output_dir: str | None) -> None:
    """Give output_dir's lock back; a no-op where this process holds none."""
    held = _held.pop(_key(output_dir), None) if output_dir else None
    if held is not None:
        held.release()


def read_run_id(output_dir: str | None) -> str | None:
    """The run id recorded in output_dir/run.json, or None where there is none."""
    try:
        with open(os.path.join(output_dir, RUN_FILE), encoding="utf-8") as f:
            return json.load(f)["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_id(output_dir: str, run_id: str) -> None:
    path = os.path.join(output_dir, RUN_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_path(output_dir)


def _contents(output_dir: str, bookkeeping: bool = True) -> list[str]:
    """Names in output_dir but the lock (and, bookkeeping=False, run.json: a run that failed at start-up)."""
    skip = {LOCK_NAME} if bookkeeping else {LOCK_NAME, RUN_FILE}
    return sorted(n for n in os.listdir(output_dir) if n not in skip) if os.path.isdir(output_dir) else []


def _is_checkpoint_name(name: str) -> bool:
    return name.startswith("checkpoint-") and name[len("checkpoint-"):].split(".")[0].isdigit()


_RUN_MARKERS = (RUN_FILE, "metrics.jsonl", "training_args.json", "trainer_state.json")


def holds_a_run(output_dir: str) -> bool:
    """Whether output_dir holds a kdqa run's files (never clear a folder that is not a run's)."""
    names = _contents(output_dir)
    return any(n in _RUN_MARKERS or _is_checkpoint_name(n) for n in names)


def clear_previous_run(output_dir: str) -> list[str]:
    """Remove what an earlier run wrote at the top of output_dir: files and checkpoint folders.

    Only where the folder holds a kdqa run (a run.json, metrics.jsonl, checkpoints ...): pointing
    --output_dir at some other folder with --overwrite_output_dir deletes nothing there.
    """
    removed = []
    if not holds_a_run(output_dir):
        return removed
    for name in _contents(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            if _is_checkpoint_name(name):
                shutil.rmtree(path)
                removed.append(name)
        else:
            os.remove(path)
            removed.append(name)
    return removed


def prepare(output_dir: str, *, resume: bool, overwrite: bool) -> str | None:
    """Lock output_dir and make it ready for a run (call on the main process only).

    Returns the run id: a new one for a fresh run, the recorded one on resume (None where the
    folder has none yet: the checkpoint's is adopted with adopt_run_id). A non-empty folder without
    --resume_from_checkpoint or --overwrite_output_dir is refused; with --overwrite_output_dir the
    previous run's checkpoints and files are removed first.
    """
    from kdqa.checkpoint import list_checkpoints, remove_half_written

    os.makedirs(output_dir, exist_ok=True)
    lock(output_dir)
    try:
        left = remove_half_written(output_dir)
        if left:
            logger.info("removed %s: half-written by an interrupted run", ", ".join(left))
        if resume:
            return read_run_id(output_dir)
        contents = _contents(output_dir, bookkeeping=False)
        if contents and not overwrite:
            has_ckpt = bool(list_checkpoints(output_dir))
            raise FileExistsError(
                f"--output_dir {output_dir} already exists and is not empty"
                + (" (it holds checkpoints: continue with --resume_from_checkpoint latest)" if has_ckpt else "")
                + "; pass --overwrite_output_dir to start over there, or choose another --output_dir"
            )
        if contents:
            removed = clear_previous_run(output_dir)
            if removed:
                logger.info("--overwrite_output_dir: removed the previous run's %s", ", ".join(removed))
        run_id = uuid.uuid4().hex
        write_run_id(output_dir, run_id)
        return run_id
    except BaseException:
        release(output_dir)
        raise


def adopt_run_id(output_dir: str, checkpoint_run_id: str, checkpoint: str) -> str:
    """On resume: the output dir continues the checkpoint's run; a folder of another run is refused."""
    current = read_run_id(output_dir)
    if current is None:
        write_run_id(output_dir, checkpoint_run_id)
    elif current != checkpoint_run_id:
        from kdqa.checkpoint import CheckpointError

        raise CheckpointError(
            f"{checkpoint} belongs to run {checkpoint_run_id}, but --output_dir {output_dir} holds run {current}: "
            "resume into the checkpoint's own output dir or an empty one"
        )
    return checkpoint_run_id
