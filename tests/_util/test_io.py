"""Writing outputs: --force on every one, one line for a full disk or a read-only folder,
no temp file left behind on errors or signals (xsurgery/_io.py and its callers)."""

import errno
import os
import signal

import pytest

from xsurgery._util import io as _io
from xsurgery.cli import main
from xsurgery.errors import UserError

DIGITS = ["digits_cnn", "--input-size", "1", "16", "16"]
RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes", "digits.yaml")
TINY_RUN = ["data.limit_train=32", "data.limit_test=16", "epochs=1", "batch_size=16"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("io") / "d.xs")
    assert main(["convert", *DIGITS, "-o", path]) == 0
    return path


def _one_line(capsys, argv, match):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xsurgery: error:") and match in err, err
    return err


def _leftovers(folder):
    found = []
    for root, _dirs, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.startswith((_io.TMP_PREFIX, ".")) or f.endswith(".tmp")]
    return found


def _outputs(tmp_path, ckpt):
    """Every command that writes a file, with the file it writes."""
    onnx = pytest.importorskip("onnxruntime") and str(tmp_path / "m.onnx")
    return [
        (["convert", *DIGITS, "-o", str(tmp_path / "a.xs")], str(tmp_path / "a.xs")),
        (["convert", *DIGITS, "--json", str(tmp_path / "a.json")], str(tmp_path / "a.json")),
        (["plan", *DIGITS[:1], "--json", str(tmp_path / "p.json")], str(tmp_path / "p.json")),
        (["report", ckpt, "--json", str(tmp_path / "r.json")], str(tmp_path / "r.json")),
        (["export", ckpt, "-o", onnx, "--layout", "dense"], onnx),
        (["bench", "digits_cnn", "--input-size", "1", "16", "16", "--compress", "2", "--backends", "torch",
          "--variants", "dense", "--repeat", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")],
         str(tmp_path / "b.json")),
    ]


def test_force_guards_every_output(tmp_path, ckpt, capsys):
    for argv, out in _outputs(tmp_path, ckpt):
        with open(out, "wb") as f:
            f.write(b"someone's file")
        _one_line(capsys, argv, "exists; pass --force")
        assert open(out, "rb").read() == b"someone's file", argv  # untouched
        assert main([*argv, "--force"]) == 0, argv
        assert open(out, "rb").read() != b"someone's file"
    # a checkpoint named as --json FILE is refused too, and -o / --json must differ
    _one_line(capsys, ["convert", *DIGITS, "--json", ckpt], "exists; pass --force")
    _one_line(capsys, ["convert", *DIGITS, "-o", str(tmp_path / "x.xs"), "--json", str(tmp_path / "x.xs"), "--force"],
              "name the same file")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("code,match", [(errno.ENOSPC, "No space left on device; free some space"),
                                        (errno.EROFS, "Read-only file system; the file system is read-only"),
                                        (errno.EACCES, "Permission denied; choose a folder you can write to")])
def test_full_disk_and_read_only_folder_are_one_line(tmp_path, ckpt, capsys, monkeypatch, code, match):
    """The write fails at the OS (simulated: tests may run as root, for whom chmod does not bite)."""
    def fail(*_a, **_k):
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as m:
        if code == errno.ENOSPC:
            m.setattr(_io.os, "fsync", fail)  # the data is written, flushing it finds the disk full
        else:
            m.setattr(_io.tempfile, "mkstemp", fail)  # the folder refuses new files
        for argv, out in _outputs(tmp_path, ckpt)[:5]:
            _one_line(capsys, argv, match)
            assert not os.path.exists(out)
        run = str(tmp_path / "run")
        _one_line(capsys, ["train", RECIPE, f"output={run}", *TINY_RUN], match)
    assert _leftovers(tmp_path) == []
    assert not os.path.exists(os.path.join(run, "train_state.json"))
    # the failed run left nothing that blocks the next one
    assert main(["train", RECIPE, f"output={run}", *TINY_RUN]) == 0


def test_unwritable_folder_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_io.os, "access", lambda *_a, **_k: False)
    _one_line(capsys, ["convert", *DIGITS, "-o", str(tmp_path / "a.xs")], "is not writable")
    _one_line(capsys, ["convert", *DIGITS, "-o", str(tmp_path / "no" / "a.xs")], "does not exist; create it")
    _one_line(capsys, ["convert", *DIGITS, "-o", str(tmp_path)], "is a folder; name the file")


SIGNAL_SCRIPT = """
import os, signal, sys
from xsurgery._util import io as _io

target, sig = sys.argv[1], int(sys.argv[2])

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half of a file")
    os.kill(os.getpid(), sig)

with _io.signals_raise():
    _io.write_atomic(target, write, force=True)
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, None)])
def test_signal_during_a_write_leaves_no_temp_file(tmp_path, sig, code):
    """In a fresh process (a signal sent to the test process would reach every native thread
    the suite's libraries started): the signal unwinds, the temp file goes, the old file stays."""
    import subprocess
    import sys

    target = tmp_path / "out.xs"
    target.write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, str(target), str(int(sig))], capture_output=True,
                          text=True, timeout=120)
    if code is not None:
        assert proc.returncode == code, proc.stderr[-2000:]
    else:
        assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert os.listdir(tmp_path) == ["out.xs"] and target.read_bytes() == b"old"


def test_safetensors_write_goes_through_our_temp_file(tmp_path, monkeypatch):
    """safetensors' own save_file would leave its partial file; ours serializes in memory."""
    import safetensors.torch
    import torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: pytest.fail("save_file used"))
    monkeypatch.setattr(_io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(UserError, match="No space left"):
        _io.write_safetensors(str(tmp_path / "w.safetensors"), {"w": torch.zeros(4)})
    assert os.listdir(tmp_path) == []


def test_orphan_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    """SIGKILL runs no cleanup; the temp file names its writer, and the next write of the
    same name removes it once the writer is gone (never a live writer's)."""
    import subprocess
    import sys

    target = str(tmp_path / "a.xs")
    code = ("import os, signal, sys\nfrom xsurgery._util import io as _io\n"
            "def w(tmp):\n    open(tmp, 'w').write('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "_io.write_atomic(sys.argv[1], w)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, target])
    assert proc.wait() == -signal.SIGKILL
    orphans = os.listdir(tmp_path)
    assert len(orphans) == 1 and orphans[0].startswith(f"{_io.TMP_PREFIX}{proc.pid}-")
    live = tmp_path / f"{_io.TMP_PREFIX}{os.getppid()}-x-a.xs"  # a live process's temp file: kept
    live.write_text("busy")
    for p in tmp_path.iterdir():
        os.utime(p, (1, 1))  # old enough to be an orphan
    _io.write_text(target, "new")
    assert sorted(os.listdir(tmp_path)) == sorted(["a.xs", live.name]) and open(target).read() == "new"


def test_link_atomic_onto_the_same_file_leaves_no_temp(tmp_path):
    from xsurgery._util import io as _io

    src = tmp_path / "a"
    src.write_text("x")
    _io.link_atomic(str(src), str(tmp_path / "b"))
    _io.link_atomic(str(src), str(tmp_path / "b"))  # b is already a's inode: rename would keep both names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "b").read_text() == "x" and os.path.samefile(src, tmp_path / "b")
