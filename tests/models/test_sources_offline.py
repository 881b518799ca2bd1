"""torchvision detection / segmentation / video names build with random weights, offline."""

import socket
import time

import pytest
import torch

from xsurgery.layers import XConv3d
from xsurgery.models import create_model, is_library_name
from xsurgery.surgery import SurgerySpec, apply_surgery


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "keypointrcnn_resnet50_fpn",
                                  "deeplabv3_mobilenet_v3_large", "r3d_18"])
def test_builds_offline_with_random_weights(name, no_network):
    t = time.perf_counter()
    model = create_model(name)
    assert model._xsurgery_source == {"source": name, "model_kwargs": {}, "pretrained": False}
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert time.perf_counter() - t < 120  # a download attempt would have raised, not waited


def test_detection_model_runs_small(no_network):
    model = create_model("fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 3}).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert isinstance(out, list) and set(out[0]) == {"boxes", "labels", "scores"}


def test_r3d_conv3d_layers_convert(no_network):
    model = create_model("r3d_18", {"num_classes": 4}).eval()
    out, decisions, _ = apply_surgery(model, SurgerySpec(compress=4))
    assert sum(isinstance(m, XConv3d) for m in out.modules()) >= 10
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert out(x).shape == model(x).shape == (1, 4)
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters()) / 2


def test_library_names():
    assert all(is_library_name(n) for n in ("resnet50", "timm/convnext_tiny", "densenet_bc_40", "hf/gpt2"))
    assert not any(is_library_name(n) for n in ("object", "pkg.mod:make", "../x.xs", "timm/../../x", "", None, "a b"))
