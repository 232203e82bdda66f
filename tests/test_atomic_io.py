"""atomic_io: every kdqa output is written whole or not at all, and durably."""

import json
import os

import pytest

from kdqa import atomic_io
from kdqa.atomic_io import write_json_atomic, write_text_atomic


def test_json_formats_human_by_default_and_compact_on_request(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(str(path), {"é": 1})
    assert path.read_text(encoding="utf-8") == '{\n  "é": 1\n}\n'
    write_json_atomic(str(path), {"é": 1}, indent=None, ensure_ascii=True, end="")
    assert path.read_text(encoding="utf-8") == '{"\\u00e9": 1}'
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left


def test_the_file_is_synced_then_renamed_then_its_folder_synced(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic_io.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                           real_fsync(fd)))
    monkeypatch.setattr(atomic_io.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    path = tmp_path / "out.txt"
    write_text_atomic(str(path), "hello")
    assert events == [("fsync", str(path) + ".tmp"), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert path.read_text() == "hello"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(str(path), {"old": True})
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"new": object()})  # not JSON: fails before anything is written
    assert json.loads(path.read_text()) == {"old": True}
