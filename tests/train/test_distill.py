"""Fine-tuning from a trained dense model: model.weights, surgery.init: project, teacher + distill."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import xsurgery
from xsurgery.cli import main
from xsurgery.errors import UserError
from xsurgery.train import build_model, build_teacher, distill_loss, load_recipe, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "recipes", "digits.yaml")
SMALL = ["data.limit_train=192", "data.limit_test=96", "batch_size=32", "model.kwargs.width=8"]


def _recipe(tmp_path, name, *extra):
    return load_recipe(DIGITS, [f"output={tmp_path / name}", *SMALL, *extra])


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense digits run of one epoch: its best.xs is the teacher and the weights to start from."""
    tmp = tmp_path_factory.mktemp("dense")
    train(_recipe(tmp, "dense", "surgery=null", "epochs=1"), quiet=True)
    return tmp / "dense" / "best.xs"


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_distill_loss_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    for temp in (1.0, 2.5, 4.0):
        p, q = _softmax(t / temp), _softmax(s / temp)
        want = temp * temp * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))  # T^2 KL(p_t || p_s), batch mean
        got = distill_loss(torch.from_numpy(s), torch.from_numpy(t), temp)
        assert float(got) == pytest.approx(want, rel=1e-10)
    assert float(distill_loss(torch.from_numpy(s), torch.from_numpy(s), 2.0)) == pytest.approx(0.0, abs=1e-12)


def test_resume_with_a_teacher_gives_identical_metrics(tmp_path, dense_run):
    extra = [f"teacher={dense_run}", "distill.alpha=0.7", "distill.temperature=3", f"model.weights={dense_run}",
             "surgery.init=keep", "epochs=2"]
    full = train(_recipe(tmp_path, "full", *extra), quiet=True)
    part = _recipe(tmp_path, "part", *extra)
    assert part.teacher.checkpoint == str(dense_run) and part.distill.alpha == 0.7
    train(part, stop_after_epoch=1, quiet=True)
    resumed = train(part, resume=True, quiet=True)
    keys = ("train_loss", "train_task_loss", "train_distill_loss", "train_acc", "test_top1", "test_loss", "lr")
    assert [{k: r[k] for k in keys} for r in full] == [{k: r[k] for k in keys} for r in resumed]
    for r in full:  # the recorded loss is the stated mix of the two
        assert r["train_loss"] == pytest.approx(0.3 * r["train_task_loss"] + 0.7 * r["train_distill_loss"], rel=1e-6)  # float32 losses
        assert r["train_distill_loss"] > 0
    a = xsurgery.load(str(tmp_path / "full" / "last.xs")).state_dict()
    b = xsurgery.load(str(tmp_path / "part" / "last.xs")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the teacher is not saved in the student's checkpoint: exactly the student's own tensors
    assert set(a) == set(build_model(part).state_dict())
    result = json.loads((tmp_path / "full" / "result.json").read_text())
    assert result["distill"] == {"alpha": 0.7, "temperature": 3.0}
    assert result["train_distill_loss"] == full[-1]["train_distill_loss"]
    # the teacher is frozen and in eval mode, and the file it came from is unchanged
    teacher = build_teacher(part, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    again = xsurgery.load(str(dense_run)).state_dict()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in again.items())


def test_project_in_a_recipe_calibrates_on_its_training_split(tmp_path, dense_run):
    keep = build_model(_recipe(tmp_path, "k", f"model.weights={dense_run}", "surgery.init=keep"))
    proj_recipe = _recipe(tmp_path, "p", f"model.weights={dense_run}", "surgery.init=project", "calibration_batches=2")
    proj = build_model(proj_recipe)
    assert len(proj_recipe.calibration_data()) == 2 and proj_recipe.calibration_data()[0].shape == (32, 1, 16, 16)
    assert torch.equal(proj_recipe.calibration_data()[1], proj_recipe.calibration_data()[1])  # seeded
    ks, ps = keep.state_dict(), proj.state_dict()
    changed = [k for k in ks if not torch.equal(ks[k], ps[k])]
    assert changed and all(k.endswith("weight") for k in changed)  # only the X-layers' compact weights
    again = build_model(proj_recipe)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ps.items())  # every process builds the same one


def test_teacher_and_distill_mistakes(tmp_path, dense_run):
    with pytest.raises(UserError, match="distill needs a teacher"):
        _recipe(tmp_path, "x", "distill.alpha=0.5")
    with pytest.raises(UserError, match="not both or neither"):
        _recipe(tmp_path, "x", f"teacher.checkpoint={dense_run}", "teacher.source=digits_cnn")
    with pytest.raises(UserError, match=r"distill.alpha must be in \[0, 1\]"):
        _recipe(tmp_path, "x", f"teacher={dense_run}", "distill.alpha=2")
    r = _recipe(tmp_path, "x", f"teacher={dense_run}")
    assert (r.distill.alpha, r.distill.temperature) == (0.5, 4.0)  # the defaults, stated in the saved recipe
    wrong = _recipe(tmp_path, "wrong", "teacher.source=digits_cnn", "teacher.kwargs={num_classes: 7, input_size: 16}",
                    "epochs=1")
    with pytest.raises(UserError, match="same classes"):
        train(wrong, quiet=True)


def test_cli_train_prints_both_losses(tmp_path, dense_run, capsys):
    out = tmp_path / "cli"
    assert main(["train", DIGITS, f"output={out}", *SMALL, "epochs=1", f"teacher={dense_run}", "--weights",
                 str(dense_run), "surgery.init=project", "calibration_batches=1"]) == 0
    err = capsys.readouterr().err
    assert "(task " in err and ", distill " in err
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_task_loss", "train_distill_loss"} <= set(line)


@pytest.mark.slow  # two processes start in ~20 s; the plain torchrun test runs by default
def test_torchrun_two_processes_with_a_teacher(tmp_path, dense_run):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "xsurgery.cli", "train", DIGITS, "--device", "cpu", f"output={out}", *SMALL,
           "data.limit_train=64", "batch_size=16", "epochs=1", f"teacher={dense_run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count(", distill ") == 1  # rank 0 prints both losses
    rec = json.loads((out / "metrics.jsonl").read_text())
    assert rec["train_loss"] == pytest.approx(0.5 * rec["train_task_loss"] + 0.5 * rec["train_distill_loss"], rel=1e-6)
    assert set(xsurgery.load(str(out / "last.xs")).state_dict()) == set(build_model(load_recipe(
        DIGITS, [*SMALL, f"teacher={dense_run}"])).state_dict())


def test_runs_saved_before_the_new_recipe_fields_resume_and_are_reused(tmp_path):
    import yaml

    from xsurgery.bench import SweepRun, Variant, check_finished

    recipe = _recipe(tmp_path, "old", "epochs=2")
    train(recipe, stop_after_epoch=1, quiet=True)
    path = tmp_path / "old" / "recipe.yaml"
    saved = yaml.safe_load(path.read_text())
    for key in ("calibration_batches", "teacher", "distill"):
        saved.pop(key)
    saved["model"].pop("weights")
    path.write_text(yaml.safe_dump(saved))  # as a run started by an older xsurgery wrote it
    assert len(train(recipe, resume=True, quiet=True)) == 2
    path.write_text(yaml.safe_dump(saved))
    check_finished(SweepRun(Variant("x", "x"), 0, str(tmp_path / "old"), recipe.to_dict()))  # no error: same recipe
    with pytest.raises(UserError, match="another recipe"):
        check_finished(SweepRun(Variant("x", "x"), 0, str(tmp_path / "old"), {**recipe.to_dict(), "epochs": 5}))
