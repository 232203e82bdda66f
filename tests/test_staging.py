"""The one staged-folder helper the cache, the export and the final model folder share."""

import os
import socket

import pytest

from kdqa import staging


def test_only_folders_of_dead_processes_of_this_host_are_removed(tmp_path):
    host = socket.gethostname()
    mine = staging.new_staging(str(tmp_path), ".x-")
    assert os.path.basename(mine).startswith(f".x-{host}-{os.getpid()}-")
    names = {"dead": f".x-{host}-999999999-a", "live": f".x-{host}-{os.getppid()}-a", "other host": ".x-elsewhere-1-a",
             "other prefix": f".y-{host}-999999999-a"}
    for name in names.values():
        (tmp_path / name).mkdir()
    removed = staging.remove_dead_staging(str(tmp_path), ".x-")
    # This process's own folder counts as dead: it is what an earlier, failed attempt of ours left.
    assert sorted(removed) == sorted([mine, str(tmp_path / names["dead"])])
    assert sorted(os.listdir(tmp_path)) == sorted(n for k, n in names.items() if k != "dead")


def test_move_into_moves_in_the_order_given(tmp_path, monkeypatch):
    staged, target = tmp_path / "staged", tmp_path / "target"
    staged.mkdir(), target.mkdir()
    for name in ("b", "a", "config.json"):
        (staged / name).write_text(name)
    moved = []
    real = staging._move
    monkeypatch.setattr(staging, "_move", lambda s, t: (moved.append(os.path.basename(t)), real(s, t)))
    staging.move_into(str(staged), str(target), ["a", "b", "config.json"])
    assert moved == ["a", "b", "config.json"] and os.listdir(staged) == []
    assert (target / "config.json").read_text() == "config.json"


def test_replace_folder_swaps_a_whole_folder(tmp_path):
    old, new = tmp_path / "k", tmp_path / ".tmp-new"
    old.mkdir(), new.mkdir()
    (old / "stale").write_text("old")
    (new / "meta.json").write_text("new")
    staging.replace_folder(str(new), str(old), stale_prefix=".tmp-stale-")
    assert sorted(os.listdir(tmp_path)) == ["k"] and os.listdir(old) == ["meta.json"]


@pytest.mark.parametrize("pid,alive", [(os.getpid(), False), (999999999, False), (1, True)])
def test_pid_alive(pid, alive):
    assert staging.pid_alive(pid) is alive
