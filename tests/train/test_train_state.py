"""A run survives any kill, and one folder is written by one run (xsurgery/train/_state.py)."""

import builtins
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import xsurgery
from xsurgery.errors import UserError
from xsurgery.train import _state as _train_state
from xsurgery.train import train
from xsurgery.train._recipe import load_recipe
from xsurgery.train._state import Run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "recipes", "digits.yaml")
TINY = ["data.limit_train=64", "data.limit_test=32", "batch_size=32", "epochs=3"]
KEYS = ("epoch", "train_loss", "train_acc", "test_top1", "test_top5", "test_loss", "lr")


def _recipe(folder, epochs=3):
    return load_recipe(DIGITS, [f"output={folder}", *TINY[:3], f"epochs={epochs}"])


def _metrics(history):
    return [{k: h[k] for k in KEYS} for h in history]


class _Killed(BaseException):
    """The process died here: nothing after this instant reaches the disk (not even cleanup)."""


# every call that changes the file system; a kill "at step k" happens just before the k-th
MUTATIONS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (os, "remove"), (os, "makedirs"),
             (os, "mkdir"), (os, "rmdir"), (os, "fsync"), (os, "chmod"), (os, "open"), (shutil, "rmtree"),
             (shutil, "copyfile"), (builtins, "open")]


class _Killer:
    def __init__(self, monkeypatch):
        self.armed, self.dead, self.count, self.at, self.steps, self.fail = False, False, 0, None, [], None
        self.in_rmtree = 0  # steps inside shutil.rmtree(ignore_errors=True) swallow an OSError
        for mod, name in MUTATIONS:
            label = "os.open" if (mod, name) == (os, "open") else name
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name), label))
        save = Run.save

        def armed_save(run, model, opt, scaler, scalars, history, artifacts=None):
            self.armed = scalars["epoch"] == 2  # the second epoch's save, with a previous one to keep
            try:
                return save(run, model, opt, scaler, scalars, history, artifacts)
            finally:
                self.armed = False

        monkeypatch.setattr(Run, "save", armed_save)

    def _wrap(self, fn, name):
        def step(*args, **kwargs):
            if name == "open":  # builtins.open: only opening for writing mutates
                mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
                if not any(c in str(mode) for c in "wax+"):
                    return fn(*args, **kwargs)
            if name == "os.open":
                flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
                if not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    return fn(*args, **kwargs)
            if self.dead:
                raise _Killed(name)
            if self.armed:
                self.count += 1
                self.steps.append(f"{name}({os.path.basename(str(args[0])) if args else ''})"
                                  + (" [in rmtree]" if self.in_rmtree else ""))
                if self.count == self.at:
                    if self.fail is not None:  # a failure the process survives: cleanup runs after it
                        raise self.fail()
                    self.dead = True
                    raise _Killed(name)
            if name == "rmtree":
                self.in_rmtree += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.in_rmtree -= 1
            return fn(*args, **kwargs)

        return step

    def arm(self, at, fail=None):
        self.dead, self.count, self.at, self.steps, self.fail = False, 0, at, [], fail


def test_kill_at_every_write_step_of_a_save_then_resume(tmp_path, monkeypatch):
    """Kill at each file-system step of epoch 2's save; the folder always holds a loadable
    last.xs, and --resume finishes with the metrics and weights of an uninterrupted run."""
    full = train(_recipe(tmp_path / "full", 2), quiet=True)
    base = tmp_path / "base"
    train(_recipe(base, 2), stop_after_epoch=1, quiet=True)
    killer = _Killer(monkeypatch)
    killer.arm(None)  # a clean pass counts the steps of one save
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    train(_recipe(probe, 2), resume=True, stop_after_epoch=2, quiet=True)
    steps = list(killer.steps)
    assert len(steps) >= 10 and any(s.startswith("replace(train_state.json") or "train_state.json" in s
                                    for s in steps), steps
    want = xsurgery.load(str(tmp_path / "full" / "last.xs")).state_dict()
    def disk_full():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # a kill at every step; a full disk and Ctrl-C (cleanup runs) at every third
    cases = [(k, None) for k in range(1, len(steps) + 1)]
    cases += [(k, disk_full if k % 2 else KeyboardInterrupt) for k in range(1, len(steps) + 1, 3)
              # removing an old stage ignores errors on purpose: a full disk there is no failure
              if not (k % 2 and steps[k - 1].endswith("[in rmtree]"))]
    for k, fail in cases:
        run = tmp_path / f"kill{k}"
        shutil.copytree(base, run)
        killer.arm(k, fail)
        with pytest.raises(KeyboardInterrupt if fail is KeyboardInterrupt else UserError if fail else _Killed) as info:
            train(_recipe(run, 2), resume=True, quiet=True)
        if fail is disk_full:
            assert "No space left on device" in str(info.value) and "\n" not in str(info.value)
        killer.arm(None)
        # whatever instant: the published checkpoint is complete, the commit record readable
        state = json.loads((run / "train_state.json").read_text())
        assert state["epoch"] in (1, 2), steps[k - 1]
        xsurgery.load(str(run / "last.xs"))
        resumed = train(_recipe(run, 2), resume=True, quiet=True)
        assert _metrics(resumed) == _metrics(full), f"killed at step {k}: {steps[k - 1]}"
        got = xsurgery.load(str(run / "last.xs")).state_dict()
        assert all(bool((got[n] == want[n]).all()) for n in want), f"killed at step {k}: {steps[k - 1]}"
        leftovers = [p for p in os.listdir(run) if p.startswith(".tmp")] + \
                    [p for p in os.listdir(run / ".xsurgery") if p != "epoch-0002"]
        assert leftovers == [], (k, leftovers)
        shutil.rmtree(run)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_names_live_stale_and_foreign_host_runs(tmp_path, capsys):
    folder = tmp_path / "run"
    private = folder / ".xsurgery"
    private.mkdir(parents=True)
    lock = private / "lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        for kw in ({}, {"force": True}, {"resume": True}):
            with pytest.raises(UserError, match=f"being written by another run \\(process {sleeper.pid}"):
                train(_recipe(folder), quiet=True, **kw)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere.example"}))
    with pytest.raises(UserError, match="locked by process 4242 on host elsewhere.example.*--force"):
        train(_recipe(folder), quiet=True)
    dead = _dead_pid()
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    capsys.readouterr()
    assert len(train(_recipe(folder), quiet=True, stop_after_epoch=1)) == 1
    assert f"taking over the stale lock of process {dead}" in capsys.readouterr().err
    assert not lock.exists()


def test_files_the_run_did_not_write_are_refused_and_kept(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files this run did not write \(notes.txt\)"):
        train(_recipe(folder), quiet=True)
    (folder / "notes.txt").unlink()
    (folder / "metrics.jsonl").write_text("someone else's\n")  # a run's name, but no run committed it
    with pytest.raises(UserError, match="pass --force"):
        train(_recipe(folder), quiet=True)
    assert (folder / "metrics.jsonl").read_text() == "someone else's\n"
    (folder / "notes.txt").write_text("mine")
    assert len(train(_recipe(folder), quiet=True, force=True, stop_after_epoch=1)) == 1
    assert (folder / "notes.txt").read_text() == "mine"  # --force starts over but never deletes others' files


def test_concurrent_runs_one_folder(tmp_path):
    """A second run into a folder a live run writes is refused; SIGTERM stops the first
    cleanly (no temp files, no lock) and --resume continues it."""
    folder = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "xsurgery.cli", "train", DIGITS, "--device", "cpu", f"output={folder}",
           *TINY[:3], "epochs=500"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "train_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        for kw in ({}, {"resume": True}, {"force": True}):
            with pytest.raises(UserError, match=f"being written by another run \\(process {proc.pid}") as info:
                train(_recipe(folder), quiet=True, **kw)
            assert "\n" not in str(info.value)
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=240)  # a loaded CI machine is slow, never stuck
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"SIGTERM did not stop the run: {proc.communicate()[1][-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert not (folder / ".xsurgery" / "lock").exists()
    assert not [p for p in os.listdir(folder) if p.startswith(".tmp")]
    done = json.loads((folder / "train_state.json").read_text())["epoch"]
    history = train(load_recipe(DIGITS, [f"output={folder}", *TINY[:3], f"epochs={done + 1}"]), resume=True, quiet=True)
    assert [h["epoch"] for h in history] == list(range(1, done + 2))
    assert _train_state.STATE_JSON in os.listdir(folder)


def test_set_up_mistakes_are_one_line_before_any_step(tmp_path, capsys, monkeypatch):
    from xsurgery.cli import main
    from xsurgery.train import _loop as train_module

    steps = []
    monkeypatch.setattr(train_module.torch.optim.SGD, "step", lambda *a, **k: steps.append(1))
    (tmp_path / "a.xs").write_bytes(b"a checkpoint")
    for extra, match in (([f"output={tmp_path / 'a.xs'}"], "is a file; set output= to a folder"),
                         ([f"output={tmp_path / 'nc'}", "model.kwargs.num_classes=5"],
                          "the model has 5 outputs but digits has 10 classes; set model.kwargs.num_classes=10")):
        capsys.readouterr()
        assert main(["train", DIGITS, *TINY, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("xsurgery: error:") and match in err, err
    assert steps == [] and (tmp_path / "a.xs").read_bytes() == b"a checkpoint"
    assert os.listdir(tmp_path / "nc") == []  # nothing left that would block the corrected run
