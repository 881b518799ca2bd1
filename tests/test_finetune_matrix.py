"""tools/finetune_matrix.py: the runs it plans (training itself is `xsurgery train`, tested elsewhere)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("finetune_matrix", os.path.join(ROOT, "tools", "finetune_matrix.py"))
fm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fm)


def _args(tmp_path, *extra):
    import argparse

    ns = dict(recipe=os.path.join(ROOT, "recipes", "digits.yaml"), overrides=["optim.lr=0.01", *extra],
              dense=str(tmp_path / "dense" / "best.xs"), compress=[2.0, 4.0], methods=list(fm.METHODS), seeds=[0, 1],
              epochs=2, alpha=0.3, temperature=2.0, out=str(tmp_path / "ft"))
    return argparse.Namespace(**ns)


def test_plan_has_one_run_per_compression_method_and_seed(tmp_path):
    runs = fm.plan(_args(tmp_path))
    assert len(runs) == 2 * 4 * 2 and len({r.folder for r in runs}) == len(runs)
    dense = os.path.abspath(tmp_path / "dense" / "best.xs")
    by = {(r.variant.family, r.variant.value, r.seed): r.recipe for r in runs}
    scratch, keep = by[("scratch", 4.0, 1)], by[("keep", 4.0, 1)]
    proj, kd = by[("project", 2.0, 0)], by[("project+distill", 2.0, 0)]
    assert scratch["surgery"]["init"] == "kaiming" and not scratch["model"].get("weights")
    assert keep["model"]["weights"] == dense and keep["surgery"]["init"] == "keep" and keep["surgery"]["compress"] == 4
    assert proj["surgery"]["init"] == "project" and "teacher" not in proj
    assert kd["teacher"] == dense and kd["distill"] == {"alpha": 0.3, "temperature": 2.0}
    assert all(r.recipe["epochs"] == 2 and r.recipe["optim"]["lr"] == 0.01 for r in runs)  # one budget for all
    assert by[("keep", 2.0, 1)]["seed"] == 1


def test_a_dense_recipe_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no surgery"):
        fm.plan(_args(tmp_path, "surgery=null"))
