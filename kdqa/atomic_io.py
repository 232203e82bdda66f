"""Durable, atomic file writes: the one writer every kdqa output goes through.

A crash or kill at any moment leaves either the old file or the new one, never half of one: the
text goes to a temporary file in the same folder (so the rename cannot cross file systems), is
fsync'ed, renamed over the target with ``os.replace``, and the folder is fsync'ed (its entry list
holds the rename).
"""

from __future__ import annotations

import json
import os

__all__ = ["fsync_path", "write_json_atomic", "write_text_atomic"]


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


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) through ``path + '.tmp'``, synced, renamed, folder synced."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, obj, *, indent: int | None = 2, ensure_ascii: bool = False,
                      end: str = "\n") -> None:
    """``obj`` as JSON through write_text_atomic.  The defaults are the human-read outputs' format
    (results, reports); bookkeeping files pass the compact form they have always had."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + end)
