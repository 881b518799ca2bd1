"""`xsurgery plan` runs the same probe as `convert`: weights read directly stay dense in the plan."""

import json

import pytest

from xsurgery.cli import main


def test_plan_names_weights_read_directly(capsys):
    pytest.importorskip("transformers")
    kwargs = {"num_hidden_layers": 1, "hidden_size": 32, "state_size": 4, "vocab_size": 64, "expand": 2,
              "time_step_rank": 4}
    assert main(["plan", "hf/mamba", "--model-kwargs", json.dumps(kwargs), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    dt = rows["layers.0.mixer.dt_proj"]
    assert not dt["converted"] and dt["reason"].startswith("weights read directly (matmul of layers.0.mixer.dt_proj")
    assert rows["layers.0.mixer.in_proj"]["converted"]
