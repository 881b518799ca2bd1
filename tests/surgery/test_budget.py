"""Budgets in convert (--target-macs, --target-params, --match-macs): the compression chosen
lands within 2% of the target, counted independently of the search (a fresh report of the
converted model, its parameters summed), and impossible budgets are one line naming the range."""

import math

import pytest
import torch
from torch import nn

import xsurgery
from xsurgery.cli import main
from xsurgery.errors import UserError
from xsurgery.layers import X_LAYERS
from xsurgery.models import create_model

BERT = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _counted(model: nn.Module, example) -> tuple[int, int]:
    """(params, MACs) of a converted model, counted afresh: parameters summed, a new report's MACs."""
    params = sum(p.numel() for p in model.parameters())
    return params, xsurgery.report(model, example_inputs=example).totals["macs_after"]


def _x_macs(model: nn.Module, example) -> int:
    """MACs of the converted layers by hand: output elements x degree x kernel area per call."""
    total = 0

    def hook(m, _inp, out):
        nonlocal total
        total += out.numel() * m.degree * math.prod(getattr(m, "kernel_size", (1,)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, X_LAYERS)]
    with torch.no_grad():
        args, kwargs = example
        model.eval()(*args, **kwargs)
    for h in handles:
        h.remove()
    return total


CASES = [  # (model, convert kwargs, example)
    ("resnet18", {"input_size": 64}, ((torch.randn(1, 3, 64, 64),), {})),
    ("timm/resnet10t", {"input_size": 64}, ((torch.randn(1, 3, 64, 64),), {})),
    ("hf/bert", {"model_kwargs": BERT, "example_inputs": ["1x32:int64"]},
     ((torch.randint(0, 100, (1, 32)),), {})),
    ("mlp", {"input_size": 64}, ((torch.randn(1, 64),), {})),
]


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("name,kwargs,example", CASES, ids=[c[0] for c in CASES])
def test_budget_lands_within_2_percent(name, kwargs, example, metric):
    model = _mlp() if name == "mlp" else name
    _, dense = xsurgery.convert(model, compress=1, check=False, **kwargs)
    before = dense.totals[f"{metric}_before"]
    # inside the reachable range: BERT's parameters are mostly its (dense) embeddings
    target = int(before * (0.98 if (name, metric) == ("hf/bert", "params") else 0.55))
    out, rep = xsurgery.convert(model, check=False, **kwargs, **{f"target_{metric}": target})
    params, macs = _counted(out, example)
    reached = params if metric == "params" else macs
    assert abs(reached - target) <= 0.02 * target, (reached, target)
    assert rep.budget["reached"] == reached and rep.budget["target"] == target
    assert rep.budget["ratio"] == pytest.approx(reached / target)
    assert rep.budget["range"][1] == before  # compression 1: the dense model
    assert 1 < rep.budget["compress"] < 64
    assert out._xsurgery_spec["compress"] == rep.budget["compress"]
    # the dense layers' MACs are what they were; the X-layers' are output x degree x area
    dense_rest = dense.totals["macs_before"] - sum(r.macs_before for r in rep.layers if r.converted)
    assert macs == dense_rest + _x_macs(out, example)


def test_suffixes_and_plain_integers_mean_the_same_target():
    a = xsurgery.convert(_mlp(), input_size=64, target_params="45k", check=False)[1].budget
    b = xsurgery.convert(_mlp(), input_size=64, target_params=45000, check=False)[1].budget
    assert a["target"] == b["target"] == 45000 and a["compress"] == b["compress"]
    assert xsurgery.convert(_mlp(), input_size=64, target_macs="0.045M", check=False)[1].budget["target"] == 45000


def test_match_macs_between_two_models():
    ex = ((torch.randn(1, 3, 64, 64),), {})
    other = xsurgery.report(create_model("mobilenet_v2"), example_inputs=ex).totals["macs_after"]
    out, rep = xsurgery.convert("resnet18", input_size=64, match_macs="mobilenet_v2", check=False)
    _, macs = _counted(out, ex)
    assert rep.budget["target"] == other and rep.budget["match"] == "mobilenet_v2"
    assert abs(macs - other) <= 0.02 * other
    # a module works the same
    torch.manual_seed(0)
    mod = create_model("mobilenet_v2")
    assert xsurgery.convert("resnet18", input_size=64, match_macs=mod, check=False)[1].budget["target"] == other


def test_impossible_budget_is_one_line_naming_the_range(capsys):
    _, dense = xsurgery.convert("resnet18", compress=1, input_size=64, check=False)
    _, sparsest = xsurgery.convert("resnet18", compress=10_000, input_size=64, check=False)  # every layer degree 1
    low, high = sparsest.totals["macs_after"], dense.totals["macs_before"]
    from xsurgery._util.table import human

    assert main(["convert", "resnet18", "--input-size", "64", "--target-macs", "1M"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "below what converting the selected layers can reach" in err
    assert f"({human(low, spaced=True)} ... {human(high, spaced=True)})" in err and "--include-classifier" in err
    assert main(["convert", "resnet18", "--input-size", "64", "--target-params", "1G"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "above what converting" in err


def test_cli_prints_the_budget_line_and_json_entry(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["convert", "resnet18", "--input-size", "64", "--target-macs", "60M", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("budget:"))
    assert line.startswith("budget: MACs 60.00 M target, ") and "reached" in line
    import json

    data = json.loads(path.read_text())
    assert data["budget"]["target"] == 60_000_000
    assert data["budget"]["reached"] == data["totals"]["macs_after"]


@pytest.mark.parametrize("kwargs,needle", [
    ({"target_macs": "1.2X"}, "--target-macs takes a positive count"),
    ({"target_params": 0}, "--target-params takes a positive count"),
    ({"target_macs": "1M", "compress": 2}, "drop --compress/--degree"),
    ({"target_macs": "1M", "target_params": "1M"}, "give one budget"),
])
def test_budget_mistakes_are_user_errors(kwargs, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        xsurgery.convert(_mlp(), input_size=64, **kwargs)


def test_macs_budget_needs_an_example_input():
    with pytest.raises(UserError, match="give --input"):
        xsurgery.convert(_mlp(), target_macs="40k")
    assert xsurgery.convert(_mlp(), target_params="40k")[1].budget["metric"] == "params"  # params need none


def test_coarse_steps_say_the_nearest_reachable_totals():
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UserError, match=r"cannot be met within 2%: degrees are whole numbers"):
        xsurgery.convert(tiny, input_size=4, target_params=46, include_stem=True)  # steps 26, 34, 42, 50
