"""`xsurgery convert --weights FILE --init project --calibration RECIPE`: the fine-tuning start point."""

import json
import os

import torch

import xsurgery
from xsurgery.cli import main
from xsurgery.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "recipes", "digits.yaml")
KW = '{"num_classes": 10, "width": 16, "input_size": 16}'  # the digits recipe's model


def test_convert_weights_project_calibration_recipe(tmp_path, capsys):
    torch.manual_seed(0)
    dense = create_model("digits_cnn", json.loads(KW))
    xsurgery.save(dense, str(tmp_path / "dense.xs"))
    out, js = tmp_path / "x.xs", tmp_path / "r.json"
    assert main(["convert", "digits_cnn", "--model-kwargs", KW, "--input-size", "1", "16", "16", "--weights",
                 str(tmp_path / "dense.xs"), "--compress", "4", "--init", "project", "--calibration", DIGITS,
                 "--calibration-batches", "2", "-o", str(out), "--json", str(js)]) == 0
    text = capsys.readouterr()
    assert "project error" in text.out and "2 calibration batch(es)" in " ".join(text.out.split())
    assert "warning" not in text.err
    proj = json.loads(js.read_text())["projection"]
    assert proj["batches"] == 2 and proj["data"] == "calibration"
    assert proj["layers"] and all(r["project_error"] <= r["keep_error"] for r in proj["layers"])
    model = xsurgery.load(str(out))
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    # no --calibration: the example input, with a one-line warning
    assert main(["convert", "digits_cnn", "--model-kwargs", KW, "--input-size", "1", "16", "16", "--init", "project",
                 "--json"]) == 0
    text = capsys.readouterr()
    assert text.err.startswith("xsurgery: warning: init='project' calibrates on the example input")
    assert json.loads(text.out)["projection"]["data"] == "example input"
    # --calibration without --init project: one line
    assert main(["convert", "digits_cnn", "--calibration", DIGITS]) == 2
    assert "--init project" in capsys.readouterr().err
