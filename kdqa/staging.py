"""Staged folders: files are written in a folder beside their final place and renamed in, so a kill
leaves the previous state or the complete new one, never half of it.

A staging folder that several processes may write (a teacher-logits cache, an export) is named
`<prefix><host>-<pid>-<random>`: one that a killed process left is found by that name and removed
by the next one (remove_dead_staging), while a live process's folder, or one of another host (whose
pid means nothing here), is kept. The training run's final model folder has one fixed name instead:
the run's lock already says whose it is (run_dir).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile

from kdqa.atomic_io import fsync_path

__all__ = ["move_into", "new_staging", "pid_alive", "remove_dead_staging", "replace_folder"]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (this very process counts as gone: a folder of
    ours is one an earlier, failed attempt in this process left)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_staging(parent: str, prefix: str) -> str:
    """A new, empty staging folder in `parent` named after this host and process."""
    return tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-", dir=parent)


def remove_dead_staging(parent: str, prefix: str) -> list[str]:
    """Delete the staging folders of `prefix` in `parent` that dead processes of this host left;
    returns their paths (the caller says so in its own words, or not at all)."""
    pattern = re.compile(re.escape(f"{prefix}{socket.gethostname()}-") + r"(\d+)-")
    removed = []
    for name in sorted(os.listdir(parent)):
        match = pattern.match(name)
        if match and not pid_alive(int(match.group(1))):
            removed.append(os.path.join(parent, name))
            shutil.rmtree(removed[-1], ignore_errors=True)
    return removed


def move_into(staging: str, target_dir: str, names, *, sync: bool = True) -> None:
    """Rename staging/<name> to target_dir/<name> in the order given (what marks the folder complete
    goes last), then sync target_dir's entries; `sync`: each file is fsync'ed first, so a crash of the
    machine cannot leave a renamed file without its content."""
    if sync:
        for name in names:
            fsync_path(os.path.join(staging, name))
    for name in names:
        _move(os.path.join(staging, name), os.path.join(target_dir, name))
    fsync_path(target_dir)


def _move(source: str, target: str) -> None:
    """One rename of move_into (a link at `target` is replaced, what it points to is never touched)."""
    os.replace(source, target)


def replace_folder(staged: str, final: str, stale_prefix: str) -> None:
    """Make the complete folder `staged` the folder `final` with one rename; a folder already at
    `final` (incomplete, or another build's) is first moved into a `stale_prefix` staging folder of
    its parent and deleted, so no reader ever sees a mix of both."""
    parent = os.path.dirname(final)
    if os.path.lexists(final):
        stale = tempfile.mkdtemp(prefix=stale_prefix, dir=parent)
        os.replace(final, os.path.join(stale, "old"))
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(staged, final)
    fsync_path(parent)
