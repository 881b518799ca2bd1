"""Issue 23: the training folder's lock is taken atomically, never left empty, and a run
killed before its first commit does not block the next one."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from xsurgery.errors import UserError
from xsurgery.train import _loop
from xsurgery.train._recipe import load_recipe
from xsurgery.train._state import Run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "recipes", "digits.yaml")


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _stale(folder):
    private = folder / ".xsurgery"
    private.mkdir(parents=True, exist_ok=True)
    info = {"pid": _dead_pid(), "host": socket.gethostname()}
    (private / "lock").write_text(json.dumps(info))
    return info


def test_two_takeovers_of_one_stale_lock_one_wins(tmp_path):
    """Both runs saw the same stale lock; the second one to act is refused, and the winner's
    lock is intact (it is not check-then-write)."""
    folder = tmp_path / "run"
    stale = _stale(folder)
    first, second = Run(str(folder)), Run(str(folder))
    assert first._check_lock(force=False) == stale and second._check_lock(force=False) == stale
    with first.lock(force=False, log=lambda m: None):
        mine = json.loads((folder / ".xsurgery" / "lock").read_text())
        assert mine["pid"] == os.getpid()
        with pytest.raises(UserError, match="taken over by another run just now"):
            second._set_aside(stale)  # the stale lock it saw is gone: the rename finds the winner's
        assert json.loads((folder / ".xsurgery" / "lock").read_text()) == mine  # put back
        tmp = second._lock_draft({"pid": 1, "host": "x"})
        with pytest.raises(UserError, match="locked by another run just now"):
            second._claim(tmp)
        os.unlink(tmp)
        assert json.loads((folder / ".xsurgery" / "lock").read_text()) == mine
    assert not (folder / ".xsurgery" / "lock").exists()


def test_a_full_disk_leaves_no_lock(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    run = Run(str(folder))
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="No space left on device"), run.lock(force=False, log=lambda m: None):
        pass
    monkeypatch.setattr(os, "fsync", real)
    private = folder / ".xsurgery"
    assert not (private / "lock").exists() and [p for p in os.listdir(private)] == []
    with run.lock(force=False, log=lambda m: None):  # the next run is not blocked
        assert json.loads((private / "lock").read_text())["pid"] == os.getpid()


def test_a_run_killed_before_its_first_commit_blocks_nothing(tmp_path, capsys):
    """What a kill during epoch 1's save leaves: recipe.yaml, a private folder with a partial
    stage and a dead process's lock. A plain run takes it; --resume starts from epoch 1."""
    folder = tmp_path / "run"
    _stale(folder)
    (folder / ".xsurgery" / "epoch-0001").mkdir()
    (folder / ".xsurgery" / "epoch-0001" / ".tmp-1-last.xs").write_bytes(b"half")
    (folder / "recipe.yaml").write_text("name: x\n")
    recipe = load_recipe(DIGITS, [f"output={folder}"])
    run, resume = _loop._open(recipe, resume=False, force=False)
    assert resume is False
    run, resume = _loop._open(recipe, resume=True, force=False)
    assert resume is False and "no finished epoch yet" in capsys.readouterr().err
    (folder / "notes.txt").write_text("mine")  # a file the run did not write: still refused
    with pytest.raises(UserError, match="did not write"):
        _loop._open(recipe, resume=False, force=False)
    with pytest.raises(UserError, match="nothing to resume"):
        _loop._open(recipe, resume=True, force=False)
