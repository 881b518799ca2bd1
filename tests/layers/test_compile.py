"""Converted models run under torch.compile with no graph break from an X-layer (CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xsurgery.layers import X_LAYERS
from xsurgery.surgery import convert


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32),
                         nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 8))


CASES = {"cnn": (_cnn, (2, 3, 8, 8)), "mlp": (_mlp, (4, 32))}


def _converted(name: str, execution: str, mixing: int = 2) -> tuple[nn.Module, torch.Tensor]:
    build, shape = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model, _ = convert(build(), compress=2, mixing=mixing, example_inputs=((x,), {}), check=False)
    layers = [m for m in model.modules() if isinstance(m, X_LAYERS)]
    assert len(layers) >= 2
    for m in layers:
        m.execution = execution
    return model, x


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("execution", ["gather", "masked", "auto"])
def test_no_graph_break_in_training_or_inference(name, execution):
    model, x = _converted(name, execution)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_training_step_matches_eager(name):
    """AOTAutograd through the gather's custom backward: gradients equal eager's (fullgraph=True
    fails on any graph break)."""
    model, x = _converted(name, "gather")
    model.train()
    want = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inductor_compiles_a_converted_mlp_step():
    model, x = _converted("mlp", "gather", mixing=1)
    model.train()
    ref = model(x)
    want = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
