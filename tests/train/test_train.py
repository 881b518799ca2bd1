import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import xsurgery
from xsurgery.errors import UserError
from xsurgery.layers import XConv2d
from xsurgery.train import lr_at, train
from xsurgery.train._recipe import ScheduleSpec, load_recipe
from xsurgery.train.data import digits_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "recipes", "digits.yaml")



def _small(tmp_path, *extra, name="out"):
    """The digits recipe cut down to a few steps per epoch."""
    return load_recipe(DIGITS, [f"output={tmp_path / name}", "data.limit_train=256", "data.limit_test=128",
                                "epochs=3", "batch_size=32", *extra])


def _accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_digits_recipe_reaches_95_percent(tmp_path):
    recipe = load_recipe(DIGITS, [f"output={tmp_path / 'digits'}"])
    assert recipe.surgery is not None and recipe.surgery.compress == 2
    t0 = time.perf_counter()
    history = train(recipe, quiet=True)
    wall = time.perf_counter() - t0
    final = history[-1]
    print(f"\ndigits X (C=2): test top-1 {100 * final['test_top1']:.2f}% in {wall:.1f}s")
    assert len(history) == recipe.epochs
    assert final["test_top1"] >= 0.95
    # the saved checkpoint is an X-network and reproduces the logged accuracy independently
    model = xsurgery.load(str(tmp_path / "digits" / "last.xs"))
    assert sum(isinstance(m, XConv2d) for m in model.modules()) == 3
    _, _, xte, yte = digits_tensors(recipe.data.input_size)
    assert _accuracy(model, xte, yte) == pytest.approx(final["test_top1"], abs=1e-6)
    lines = (tmp_path / "digits" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == list(range(1, recipe.epochs + 1))
    assert set(json.loads(lines[0])) >= {"epoch", "train_loss", "train_acc", "test_top1", "test_top5", "lr",
                                         "images_per_s", "wall_time_s"}


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    full = train(_small(tmp_path, name="full"), quiet=True)
    part = _small(tmp_path, name="part")
    first = train(part, stop_after_epoch=1, quiet=True)
    assert len(first) == 1
    state = json.loads((tmp_path / "part" / "train_state.json").read_text())
    assert state["epoch"] == 1
    resumed = train(part, resume=True, quiet=True)
    assert len(resumed) == len(full) == 3
    keys = ("train_loss", "train_acc", "test_top1", "test_top5", "test_loss", "lr")
    for a, b in zip(full, resumed):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    wa = xsurgery.load(str(tmp_path / "full" / "last.xs")).state_dict()
    wb = xsurgery.load(str(tmp_path / "part" / "last.xs")).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_output_needs_resume_or_force(tmp_path):
    recipe = _small(tmp_path, "epochs=1")
    train(recipe, quiet=True)
    with pytest.raises(UserError, match="--resume"):
        train(recipe, quiet=True)
    with pytest.raises(UserError, match="changed in optim"):
        train(_small(tmp_path, "epochs=1", "optim.lr=0.01"), resume=True, quiet=True)
    assert len(train(recipe, force=True, quiet=True)) == 1
    with pytest.raises(UserError, match="nothing to resume"):
        train(_small(tmp_path, name="other"), resume=True, quiet=True)


def test_resume_detects_altered_state(tmp_path):
    recipe = _small(tmp_path, "epochs=2")
    train(recipe, stop_after_epoch=1, quiet=True)
    with open(tmp_path / "out" / ".xsurgery" / "epoch-0001" / "train_state.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="does not match train_state.json"):
        train(recipe, resume=True, quiet=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    recipe = _small(tmp_path)

    def poison(epoch, step, loss):
        return loss * float("nan") if (epoch, step) == (2, 3) else loss

    with pytest.raises(UserError) as info:
        train(recipe, loss_hook=poison, quiet=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert "loss became nan at epoch 2 step 4" in msg and "last good checkpoint" in msg
    model = xsurgery.load(str(tmp_path / "out" / "last.xs"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = json.loads((tmp_path / "out" / "train_state.json").read_text())
    assert state["epoch"] == 1
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 1


def test_cli_train_dense_variant_and_overrides(tmp_path, capsys):
    from xsurgery.cli import main

    out = tmp_path / "dense"
    rc = main(["train", DIGITS, "--variant", "dense", "--device", "cpu", f"output={out}", "epochs=1",
               "data.limit_train=128", "data.limit_test=64"])
    assert rc == 0
    model = xsurgery.load(str(out / "last.xs"))
    assert not any(isinstance(m, XConv2d) for m in model.modules())
    saved = (out / "recipe.yaml").read_text()
    assert "surgery: null" in saved and "epochs: 1" in saved
    assert main(["train", DIGITS, "optim.lrr=1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", DIGITS, "--dry-run", "--variant", "grouped", "epochs=2"]) == 0
    out = capsys.readouterr().out
    from xsurgery.train import build_model

    n = sum(p.numel() for p in build_model(load_recipe(DIGITS, variant="grouped")).parameters())
    assert "graph: grouped" in out and "epochs: 2" in out and f"{n:,} parameters" in out


def test_lr_schedules_against_closed_forms():
    step = ScheduleSpec(name="step", milestones=(150, 225), gamma=0.1)
    assert lr_at(0.1, step, 300, 0.5) == pytest.approx(0.1)
    assert lr_at(0.1, step, 300, 150.0) == pytest.approx(0.01)
    assert lr_at(0.1, step, 300, 299.9) == pytest.approx(0.001)
    cos = ScheduleSpec(name="cosine", warmup_epochs=2, min_lr=0.0)
    assert lr_at(1.0, cos, 12, 1.0) == pytest.approx(0.5)  # linear warm-up
    assert lr_at(1.0, cos, 12, 7.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(1.0, cos, 12, 12.0) == pytest.approx(0.0, abs=1e-12)


def test_torchrun_two_process_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "xsurgery.cli", "train", DIGITS, "--device", "cpu",
           f"output={out}", "data.name=fake", "data.input_size=[3,16,16]", "model.kwargs.in_chans=3",
           "data.limit_train=64", "data.limit_test=33", "epochs=1", "batch_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("epoch 1/1") == 1  # only rank 0 logs
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".xs") == ["best.xs", "last.xs"]
    assert json.loads((out / "result.json").read_text())["best_epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    state = json.loads((out / "train_state.json").read_text())
    # 64 images, 2 ranks x 8 per step: 4 steps each
    assert state["global_step"] == 4
    model = xsurgery.load(str(out / "last.xs"))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_cifar_offline_without_files_is_one_line_error(tmp_path):
    from xsurgery.train.data import build_datasets

    recipe = load_recipe(os.path.join(ROOT, "recipes", "cifar10_densenet_bc40.yaml"), [f"data.root={tmp_path}"])
    with pytest.raises(UserError) as info:
        build_datasets(recipe.data)
    msg = str(info.value)
    assert "\n" not in msg and "cifar-10-batches-py" in msg and str(tmp_path) in msg and "data.download=true" in msg
    recipe = load_recipe(os.path.join(ROOT, "recipes", "imagenet_resnet50.yaml"), [f"data.root={tmp_path}"])
    with pytest.raises(UserError, match="train"):
        build_datasets(recipe.data)


def test_digits_split_and_fake_data_are_seeded():
    from sklearn.datasets import load_digits

    from xsurgery.train.data import build_datasets

    xtr, ytr, xte, yte = digits_tensors((1, 16, 16))
    assert len(ytr) + len(yte) == len(load_digits().target) and len(yte) == 359
    assert abs(xtr.mean().item()) < 1e-5 and xtr.std().item() == pytest.approx(1.0, abs=1e-4)
    again = digits_tensors((1, 16, 16))
    assert torch.equal(again[1], ytr) and torch.equal(again[3], yte)
    spec = load_recipe(DIGITS, ["data.name=fake", "data.input_size=[3,8,8]", "data.limit_train=4"]).data
    a, b = build_datasets(spec, seed=1)[0], build_datasets(spec, seed=1)[0]
    c = build_datasets(spec, seed=2)[0]
    assert len(a) == 4 and torch.equal(a[3][0], b[3][0]) and not torch.equal(a[3][0], c[3][0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_digits_on_cuda_with_amp(tmp_path):
    recipe = load_recipe(DIGITS, [f"output={tmp_path / 'gpu'}", "epochs=4"])
    history = train(recipe, device="cuda", amp=True, quiet=True)
    assert history[-1]["test_top1"] >= 0.9
    model = xsurgery.load(str(tmp_path / "gpu" / "last.xs"))
    _, _, xte, yte = digits_tensors(recipe.data.input_size)
    assert _accuracy(model, xte, yte) == pytest.approx(history[-1]["test_top1"], abs=0.01)


@pytest.mark.onnx
def test_trained_checkpoint_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    from xsurgery.cli import main

    train(_small(tmp_path, "epochs=1"), quiet=True)
    onnx_path = tmp_path / "digits.onnx"
    assert main(["export", str(tmp_path / "out" / "last.xs"), "-o", str(onnx_path), "--layout", "gather"]) == 0
    import numpy as np
    import onnxruntime as ort

    model = xsurgery.load(str(tmp_path / "out" / "last.xs")).eval()
    x = torch.randn(3, 1, 16, 16)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-3, atol=1e-4)
