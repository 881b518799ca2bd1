"""The coverage matrix of issue 9: one model of every family, end to end.

Each case (``tools/coverage_matrix.py``: tiny configs, random weights, offline) is converted
at compression 2 on real-dtype inputs; asserted here: layers converted, parameters drop and
equal the models' own ``parameters()`` counts, the report's MACs equal FlopCounterMode's on
the same input (math attention), tied weights stay tied, ``save`` then ``load(model=fresh)``
is bit-exact, and the ONNX export of the cases that require one matches ONNX Runtime run
independently on the example. ``docs/coverage.md`` is written from the same measurements.
"""

import importlib.util
import os
import sys

import pytest

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "coverage_matrix.py")
_spec = importlib.util.spec_from_file_location("coverage_matrix", _TOOL)
cm = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("coverage_matrix", cm)  # dataclasses look their module up there
_spec.loader.exec_module(cm)

# what must be converted in each family (the module classes the X-layers replaced)
CONVERTED_FROM = {
    "bert": "Linear", "gpt2": "Conv1D", "t5": "Linear", "llama": "Linear", "vit": "Linear",
    "fasterrcnn": "Conv2d", "deeplabv3": "Conv2d", "r3d_18": "Conv3d", "mlp": "Linear", "conv1d": "Conv1d",
    "lstm": "Linear", "two_input": "Linear", "transformer_encoder": "Linear",
}
# a reason each family must report for what it keeps dense
KEPT_REASON = {
    "bert": "embedding", "gpt2": "weight with transformer.wte shared", "t5": "shared", "llama": "embedding",
    "vit": "stem", "fasterrcnn": "depthwise", "deeplabv3": "depthwise", "r3d_18": "stem", "mlp": "classifier",
    "conv1d": "stem", "lstm": "recurrent layer", "two_input": "classifier",
    "transformer_encoder": "weights read directly by nn.MultiheadAttention",
}


def test_every_family_of_the_issue_is_in_the_matrix():
    assert set(cm.CASES) == set(CONVERTED_FROM) == set(KEPT_REASON)
    required = {"bert", "gpt2", "t5", "llama", "mlp", "conv1d", "r3d_18"}  # the issue's ONNX cases
    assert required <= {n for n, c in cm.CASES.items() if c.onnx}


@pytest.mark.parametrize("name", list(cm.CASES))
def test_family(name):
    row = cm.measure(name)
    case = cm.CASES[name]
    # converted, and runs on its real-dtype inputs
    assert row["converted_layers"] > 0
    assert any(k.startswith(CONVERTED_FROM[name]) for k in row["converted_from"]), row["converted_from"]
    assert any(KEPT_REASON[name] in r for r in row["not_converted"]), row["not_converted"]
    assert row["outputs_finite"]
    # parameters: the report's totals are the models' own counts (a tied tensor once), and drop
    assert row["params_before"] == row["params_model"]
    assert row["params_after"] == row["params_converted"] < row["params_before"]
    # MACs: the report equals torch's FlopCounterMode before and after, on the same input
    assert row["macs_before"] == row["flop_counter_before"] > 0
    assert row["macs_after"] == row["flop_counter_after"] < row["macs_before"]
    assert row["macs_convert_report"] == row["macs_after"]  # convert's own report, default attention
    # tied weights stay tied through convert and save/load; the load is bit-exact
    assert row["ties_kept"] and row["load_ties_kept"]
    assert row["load_state_equal"] and row["load_outputs_equal"]
    if case.onnx:
        assert row["onnx_outputs_compared"] == row["onnx_outputs_expected"] >= 1
        assert row["onnx_max_rel_err"] < 1e-4
        assert row["onnx_gathers"] > 0
    else:
        assert "onnx_max_rel_err" not in row


def test_gpt2_tied_head_is_reported_and_counted_once():
    row = cm.measure("gpt2", onnx=False)
    assert ["lm_head.weight", "transformer.wte.weight"] in row["ties"]
    # 2 blocks x (c_attn, c_proj, c_fc, mlp.c_proj): every Conv1D, nothing else
    assert row["converted_layers"] == 8 and row["converted_from"] == ["Conv1D"]


def test_render_has_a_row_per_case():
    rows = [{"name": "mlp", "family": "MLP", "model": "m", "inputs": "[8, 40] float32", "converted_layers": 2,
             "layers_decided": 3, "x_layer_kinds": ["XLinear"], "params_before": 154890, "params_after": 79114,
             "macs_before": 1232896, "macs_after": 626688, "flop_counter_before": 1232896,
             "flop_counter_after": 626688, "load_state_equal": True, "load_outputs_equal": True,
             "onnx_max_rel_err": 3.5e-07, "onnx_inputs": ["input"], "not_converted": ["classifier"]}]
    text = cm.render(rows, {"date": "d", "torch": "t", "transformers": "x"})
    line = next(ln for ln in text.splitlines() if ln.startswith("| MLP"))
    assert "154.89 K -> 79.11 K" in line and "1.23 M -> 626.69 K" in line and "| yes | bit-exact | 3.5e-07 (input) |" in line
    rows[0]["flop_counter_after"] += 1
    assert "| NO |" in cm.render(rows, {"date": "d", "torch": "t", "transformers": "x"})
