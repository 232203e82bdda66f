"""The output directory of one training run: who may write into it, and which run it belongs to.

- A lock (`.kdqa-run.lock`, an fcntl lock on a file holding the owner's pid): a second run into the
  same --output_dir is refused while the first is alive. The kernel drops the lock when its process
  dies, even by kill -9, so a killed run never blocks the next one. A command made of several runs
  (the recipe) holds its own folder's lock and each stage folder's for its whole life (HeldFolders),
  so another command cannot clear a stage that finished while the recipe goes on.
- A run id (`run.json`), new for every run that starts from scratch and stamped into each of its
  checkpoints: `--resume_from_checkpoint latest` only takes checkpoints of this id, never those of
  a previous run that shared the folder.
- A record of kdqa's own outputs (`.kdqa-outputs.json`): every name a run writes at the top of
  the folder is recorded there before it is written. `--overwrite_output_dir` removes exactly
  those files, the `checkpoint-N` folders kdqa wrote and its half-written leftovers; never a
  file or folder it did not write, never a symlink, never an input of the current command.
- The final model folder is staged (`.kdqa-staging`) and moved into place with `config.json`
  last (publish_staged): a kill leaves the previous state or the complete new one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid

from kdqa.atomic_io import open_own, write_json_atomic
from kdqa.staging import move_into
from kdqa.checkpoint import CheckpointError, is_our_checkpoint, list_checkpoints, remove_half_written
from kdqa.run_identity import RUN_FILE, read_run_id, write_run_file

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

logger = logging.getLogger("kdqa")

LOCK_NAME = ".kdqa-run.lock"
OUTPUTS_FILE = ".kdqa-outputs.json"  # the names kdqa wrote at the top of the output dir
STAGING_NAME = ".kdqa-staging"       # the final model folder while it is written
METRICS_FILE = "metrics.jsonl"
_held: dict[str, "RunLock"] = {}
_pinned: set[str] = set()  # held by a HeldFolders block: release() leaves them locked


def result_files(*, evaluated: bool, predicts: bool) -> list[str]:
    """The files a training run writes at the top of the output dir after its final save (--do_predict's too)."""
    prefixes = [p for p, on in (("eval", evaluated), ("predict", predicts)) if on]
    return ["training_curves.png", "train_results.json", "all_results.json",
            *(f"{p}_{kind}.json" for p in prefixes for kind in ("predictions", "nbest_predictions", "results"))]


# What kdqa wrote at the top of a run folder from before the record existed (then the only guide).
_LEGACY_OUTPUTS = (RUN_FILE, METRICS_FILE, "training_args.json", "model.safetensors", "config.json",
                   "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "added_tokens.json", "recipe_stage.json",
                   *result_files(evaluated=True, predicts=True))


class OutputDirBusyError(FileExistsError):
    """Another live run holds the lock of this output directory."""


class RunLock:
    """An exclusive lock on output_dir held for the life of the run (or of the process)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        fd = open_own(self.path, os.O_RDWR)  # a symlink here is replaced, its target never written
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
    """Give output_dir's lock back; a no-op where this process holds none, or a HeldFolders block holds it."""
    if not output_dir or _key(output_dir) in _pinned:
        return
    held = _held.pop(_key(output_dir), None)
    if held is not None:
        held.release()


class HeldFolders:
    """Locks held for a whole block, across the runs inside it that lock and release the same folders.

    Why: the recipe's stages are runs of their own, each releasing its folder when it ends; a finished
    stage must stay locked while the recipe goes on, or another command could clear it meanwhile.
    """

    def __init__(self):
        self._folders: list[str] = []

    def add(self, folder: str) -> None:
        """Create and lock folder until the block ends (OutputDirBusyError where another process holds it)."""
        if _key(folder) in _pinned:
            return
        os.makedirs(folder, exist_ok=True)
        lock(folder)
        _pinned.add(_key(folder))
        self._folders.append(folder)

    def __enter__(self) -> "HeldFolders":
        return self

    def __exit__(self, *exc) -> None:
        for folder in reversed(self._folders):
            _pinned.discard(_key(folder))
            release(folder)
        self._folders.clear()


def write_run_id(output_dir: str, run_id: str) -> None:
    record_outputs(output_dir, RUN_FILE)
    write_run_file(output_dir, run_id)


# ----------------------------------------------------------------------------- what kdqa wrote here

def recorded_outputs(output_dir: str, record: str = OUTPUTS_FILE) -> set[str] | None:
    """The names kdqa recorded as written at the top of output_dir; None where there is no record.
    `record`: the record's file (an export keeps its own, export.EXPORT_RECORD)."""
    try:
        with open(os.path.join(output_dir, record), encoding="utf-8") as f:
            return set(json.load(f)["names"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return set()  # damaged: trust nothing in it (checkpoints are still recognised by their files)


def record_outputs(output_dir: str, *names: str, record: str = OUTPUTS_FILE) -> None:
    """Add names to output_dir's record of kdqa's outputs (atomically), before they are written."""
    known = recorded_outputs(output_dir, record) or set()
    if set(names) <= known:
        return
    write_json_atomic(os.path.join(output_dir, record), {"names": sorted(known | set(names))},
                      indent=1, ensure_ascii=True, end="")


def input_paths(args) -> list[str]:
    """The files and folders the command reads: never removed by --overwrite_output_dir."""
    flags = ("train_file", "validation_file", "test_file", "config", "model_name_or_path",
             "teacher_model_name_or_path", "teacher_logits_cache")
    return [getattr(args, f) for f in flags if isinstance(getattr(args, f, None), str)]


def precious_dir_reason(path: str) -> str | None:
    """Why `path` must never be an --output_dir (the checkout, $HOME, /), or None."""
    real = os.path.realpath(path)
    cwd = os.getcwd()
    checkout = _git_toplevel(cwd) or (cwd if any(os.path.exists(os.path.join(cwd, n))
                                                 for n in (".git", "pyproject.toml")) else None)
    if real == os.path.realpath(os.sep):
        return "the root of the file system"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "your home folder ($HOME)"
    if checkout and real == os.path.realpath(checkout):
        return f"the root of the repository {checkout}"
    return None


def _git_toplevel(cwd: str) -> str | None:
    folder = os.path.realpath(cwd)
    while True:
        if os.path.exists(os.path.join(folder, ".git")):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def _contents(output_dir: str, bookkeeping: bool = True) -> list[str]:
    """Names in output_dir but the lock (and, bookkeeping=False, run.json and the record of outputs: a run
    that failed at start-up)."""
    skip = {LOCK_NAME} if bookkeeping else {LOCK_NAME, RUN_FILE, OUTPUTS_FILE}
    return sorted(n for n in os.listdir(output_dir) if n not in skip) if os.path.isdir(output_dir) else []


_RUN_MARKERS = (RUN_FILE, METRICS_FILE, "training_args.json", "trainer_state.json")


def holds_a_run(output_dir: str) -> bool:
    """Whether output_dir holds a kdqa run's files (never clear a folder that is not a run's)."""
    def marker(name):
        path = os.path.join(output_dir, name)
        return (name in _RUN_MARKERS or name == OUTPUTS_FILE) and os.path.isfile(path) and not os.path.islink(path)
    return any(marker(n) or is_our_checkpoint(os.path.join(output_dir, n)) for n in _contents(output_dir))


def _ours(output_dir: str, name: str, recorded: set[str]) -> bool:
    """Whether output_dir/name is something kdqa wrote: a recorded file (or its .tmp), a checkpoint, the staging."""
    path = os.path.join(output_dir, name)
    if os.path.islink(path):
        return False  # kdqa never makes a link: whatever it points to, it is the user's
    if os.path.isdir(path):
        return is_our_checkpoint(path) or (name == STAGING_NAME)
    return os.path.isfile(path) and (name in recorded or (name.endswith(".tmp") and name[:-4] in recorded))


def _holds_an_input(path: str, inputs: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(p == real or p.startswith(real + os.sep) for p in inputs)


def clear_previous_run(output_dir: str, keep: list[str] = ()) -> list[str]:
    """Remove exactly what an earlier kdqa run wrote at the top of output_dir (see _ours); returns the names.

    Only where the folder holds a kdqa run: pointing --output_dir at some other folder deletes nothing
    there. Without a record (a run folder of an older kdqa: its run.json holds a run id), kdqa's own
    file names stand for it. Nothing that is, or holds, a path in `keep` (the command's inputs) is touched.
    """
    if not holds_a_run(output_dir):
        return []
    recorded = recorded_outputs(output_dir)
    if recorded is None:
        recorded = set(_LEGACY_OUTPUTS) if read_run_id(output_dir) else set()
    recorded = recorded | {OUTPUTS_FILE}  # its own .tmp, left by a kill while it was rewritten
    inputs = [os.path.realpath(p) for p in keep]
    removed = []
    for name in _contents(output_dir):
        path = os.path.join(output_dir, name)
        if name == OUTPUTS_FILE or not _ours(output_dir, name, recorded) or _holds_an_input(path, inputs):
            continue
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(name)
    if os.path.isfile(os.path.join(output_dir, OUTPUTS_FILE)):
        os.remove(os.path.join(output_dir, OUTPUTS_FILE))  # last: a kill before it leaves the record whole
    return removed


def remove_staging(output_dir: str) -> bool:
    """Delete the staging folder of a final save that was killed (the next save writes it anew); a link
    of that name is removed as a link (what it points to is not kdqa's: never written into)."""
    path = os.path.join(output_dir, STAGING_NAME)
    if os.path.islink(path):
        os.unlink(path)
        return True
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
        return True
    return False


def publish_staged(output_dir: str, write, last: tuple[str, ...] = ("config.json",)) -> list[str]:
    """Write a model folder's files with write(staging_folder), then move them into output_dir.

    Every file is fsync'ed and recorded as kdqa's before the moves; `last` moves last (config.json: until
    it is there the folder is no model, so a kill mid-move never leaves a model without its tokenizer,
    and a kill before leaves the previous state). Returns the names moved.
    """
    staging = os.path.join(output_dir, STAGING_NAME)
    remove_staging(output_dir)
    os.makedirs(staging)
    try:
        write(staging)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    names = sorted(os.listdir(staging), key=lambda n: (n in last, last.index(n) if n in last else 0, n))
    record_outputs(output_dir, *names)
    move_into(staging, output_dir, names)
    os.rmdir(staging)
    return names


def prepare(output_dir: str, *, resume: bool, overwrite: bool, keep: list[str] = ()) -> str | None:
    """Lock output_dir and make it ready for a run (call on the main process only).

    Returns the run id: a new one for a fresh run, the recorded one on resume (None where the
    folder has none yet: the checkpoint's is adopted with adopt_run_id). A non-empty folder without
    --resume_from_checkpoint or --overwrite_output_dir is refused; with --overwrite_output_dir what
    the previous run wrote is removed first (clear_previous_run; `keep`: the command's inputs).
    """
    os.makedirs(output_dir, exist_ok=True)
    lock(output_dir)
    try:
        left = remove_half_written(output_dir) + ([STAGING_NAME] if remove_staging(output_dir) else [])
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
            removed = clear_previous_run(output_dir, keep)
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
        raise CheckpointError(
            f"{checkpoint} belongs to run {checkpoint_run_id}, but --output_dir {output_dir} holds run {current}: "
            "resume into the checkpoint's own output dir or an empty one"
        )
    return checkpoint_run_id
