"""Training for people: validation split, best.xs, test read once at the end, final line, quiet logs."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import pytest
import torch
from test_data import fake_fashion_mnist

import xsurgery
from xsurgery.errors import UserError
from xsurgery.train import final_line, train
from xsurgery.train._recipe import load_recipe
from xsurgery.train.data import build_splits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "fashion_mnist_resnet.yaml")


def _tiny(tmp_path, *extra, name="run"):
    """The Fashion-MNIST ResNet recipe on generated IDX files, a few steps per epoch."""
    root = tmp_path / "fmnist"
    if not root.exists():
        fake_fashion_mnist(root, n_train=160, n_test=48)
    return load_recipe(RECIPE, [f"data.root={root}", "data.val_size=64", "data.limit_train=null", "batch_size=32",
                                "model.kwargs.width=4", "eval_batch_size=64", "epochs=3", "optim.lr=0.5",
                                f"output={tmp_path / name}", *extra], variant="x2")


def _accuracy(model, dataset):
    model.eval()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def _ascend_in_last_epoch(epoch, step, loss):
    return -loss if epoch == 3 else loss  # gradient ascent: the last epoch gets worse


def test_best_is_chosen_on_validation_and_test_is_read_once_at_the_end(tmp_path):
    recipe = _tiny(tmp_path)
    history = train(recipe, quiet=True, loss_hook=_ascend_in_last_epoch)
    out = tmp_path / "run"
    # every epoch is scored on the validation split, never on the test set
    assert all("val_top1" in h and "test_top1" not in h for h in history)
    vals = [h["val_top1"] for h in history]
    best_epoch = vals.index(max(vals)) + 1
    assert best_epoch < 3  # the ascent epoch is not the best
    result = json.loads((out / "result.json").read_text())
    assert result["best_epoch"] == best_epoch and result["selected_on"] == "val"
    assert result["best_val_top1"] == max(vals) and result["test_images"] == 48
    best, last = xsurgery.load(str(out / "best.xs")), xsurgery.load(str(out / "last.xs"))
    assert any(not torch.equal(a, b) for a, b in zip(best.state_dict().values(), last.state_dict().values()))
    # recomputed independently from the files: best.xs scores the logged validation and test accuracy
    splits = build_splits(recipe.data, recipe.seed)
    assert _accuracy(best, splits.val) == pytest.approx(max(vals), abs=1e-9)
    assert _accuracy(last, splits.val) == pytest.approx(vals[-1], abs=1e-9)
    assert _accuracy(best, splits.test) == pytest.approx(result["test_top1"], abs=1e-9)
    line = final_line(result, str(out))
    assert f"best val top-1 {100 * max(vals):.2f}% at epoch {best_epoch}/3" in line
    assert f"test top-1 {100 * result['test_top1']:.2f}%" in line and "best.xs" in line and "\n" not in line


def test_stopped_run_has_no_result_until_resumed(tmp_path):
    full = _tiny(tmp_path, name="full")
    train(full, quiet=True, loss_hook=_ascend_in_last_epoch)
    part = _tiny(tmp_path, name="part")
    train(part, quiet=True, stop_after_epoch=2, loss_hook=_ascend_in_last_epoch)
    assert (tmp_path / "part" / "best.xs").is_file() and not (tmp_path / "part" / "result.json").exists()
    train(part, resume=True, quiet=True, loss_hook=_ascend_in_last_epoch)
    a = json.loads((tmp_path / "full" / "result.json").read_text())
    b = json.loads((tmp_path / "part" / "result.json").read_text())
    assert a == b  # same best epoch, same validation and test accuracy as the uninterrupted run
    # a finished run resumed again does not train; a lost result.json is rebuilt from best.xs
    os.unlink(tmp_path / "part" / "result.json")
    history = train(part, resume=True, quiet=True)
    assert len(history) == 3 and json.loads((tmp_path / "part" / "result.json").read_text()) == a
    # --force removes what the run wrote, result included
    train(_tiny(tmp_path, "epochs=1", name="part"), force=True, quiet=True)
    assert json.loads((tmp_path / "part" / "result.json").read_text())["epochs"] == 1


def test_without_validation_split_best_is_selected_on_test_and_says_so(tmp_path):
    recipe = _tiny(tmp_path, "data.val_size=0", "epochs=2")
    history = train(recipe, quiet=True)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    tops = [h["test_top1"] for h in history]
    assert result["selected_on"] == "test" and result["test_top1"] == max(tops)
    assert "selected on the test set" in final_line(result, "x")
    with pytest.raises(UserError, match="leaves no training images"):
        train(_tiny(tmp_path, "data.val_size=160", name="none"), quiet=True)


def _cli(recipe_overrides, tmp_path, tty: bool):
    cmd = [sys.executable, "-m", "xsurgery.cli", "train", RECIPE, "--variant", "x2", *recipe_overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    if not tty:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = pty.openpty()
    # a terminal has a size (a fresh pty's is 0x0, where a bar has no room)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120, env=env, cwd=tmp_path)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, proc.stdout, b"".join(chunks).decode(errors="replace")


def test_cli_progress_bar_only_on_a_terminal_and_final_line(tmp_path):
    recipe = _tiny(tmp_path)  # writes the IDX files
    args = [f"data.root={recipe.data.root}", "data.val_size=64", "data.limit_train=null", "batch_size=16",
            "model.kwargs.width=4", "epochs=1"]
    rc, out, err = _cli([*args, f"output={tmp_path / 'log'}"], tmp_path, tty=False)
    assert rc == 0, err[-2000:]
    assert "\r" not in err and "img_s" not in err  # logs and CI: epoch lines only, no bar
    assert "epoch 1/1" in err and "val " in err
    last = out.strip().splitlines()[-1]
    result = json.loads((tmp_path / "log" / "result.json").read_text())
    assert last == final_line(result, str(tmp_path / "log"))
    rc, out, err = _cli([*args, f"output={tmp_path / 'tty'}"], tmp_path, tty=True)
    assert rc == 0, err[-2000:]
    assert "\r" in err and "img_s=" in err  # the bar inside the epoch, with images/s
    assert out.strip().splitlines()[-1].startswith("done: best val top-1")


def test_missing_fashion_mnist_is_one_line_cli_error(tmp_path):
    cmd = [sys.executable, "-m", "xsurgery.cli", "train", RECIPE, f"data.root={tmp_path / 'nowhere'}",
           f"output={tmp_path / 'o'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xsurgery: error: ")
    assert "apt-get install dataset-fashion-mnist" in lines[0] and "train-images-idx3-ubyte.gz" in lines[0]
