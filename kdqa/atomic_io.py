"""Durable, atomic file writes: the one writer every kdqa output goes through, never through a symlink.

A crash or kill at any moment leaves either the old file or the new one, never half of one: the
text goes to a temporary file in the same folder (so the rename cannot cross file systems), is
fsync'ed, renamed over the target with ``os.replace``, and the folder is fsync'ed (its entry list
holds the rename).

A symlink where kdqa writes one of its own files (``metrics.jsonl`` -> a file elsewhere, a planted
``.kdqa-run.lock``) is replaced by kdqa's file, with a warning; what the link points to is never
opened for writing: the rename replaces the link itself, and files kdqa opens in place
(``open_own``: the lock, the appended metrics log) are opened with O_NOFOLLOW after the link is gone.
"""

from __future__ import annotations

import json
import logging
import os

__all__ = ["fsync_path", "open_own", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]

logger = logging.getLogger("kdqa")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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


def _warn_link(path: str) -> None:
    target = os.readlink(path)
    logger.warning("%s was a symlink (to %s): replaced by kdqa's own file; its target was not written", path, target)


def open_own(path: str, flags: int) -> int:
    """os.open(path, flags | O_CREAT) for a file kdqa writes in place, never through a symlink.

    Why: opening a link follows it, so a planted link would have its target truncated or appended to.
    A link at `path` is removed first (the link, not its target); O_NOFOLLOW refuses one made in between.
    """
    if os.path.islink(path):
        _warn_link(path)
        os.unlink(path)
    return os.open(path, flags | os.O_CREAT | _NOFOLLOW, 0o666)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path + '.tmp'``, synced, renamed, folder synced.

    The temporary name is created afresh (O_EXCL: a leftover or a link of that name is removed, never
    followed); the rename replaces a link at ``path`` itself, so no file outside is ever written.
    """
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)  # a kill's leftover, or a link: never written through
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if os.path.islink(path):
        _warn_link(path)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(path: str, text: str) -> None:
    """``text`` (UTF-8) to ``path`` through write_bytes_atomic."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj, *, indent: int | None = 2, ensure_ascii: bool = False,
                      end: str = "\n") -> None:
    """``obj`` as JSON through write_text_atomic.  The defaults are the human-read outputs' format
    (results, reports); bookkeeping files pass the compact form they have always had."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + end)
