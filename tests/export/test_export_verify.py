"""ONNX verification that verifies: NaN/inf fail it, constant outputs are not a pass."""

import os

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

import xsurgery  # noqa: E402
from xsurgery.errors import UserError  # noqa: E402
from xsurgery.export import export_onnx  # noqa: E402


def _tiny_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16,
                             mlp_dim=32, num_classes=5)


def test_zero_head_verifies_on_perturbed_copy(tmp_path, capsys):
    vit = _tiny_vit()
    assert not vit.heads.head.weight.any()  # torchvision zero-initialises the head
    model, _ = xsurgery.convert(vit, compress=2, input_size=(3, 32, 32))
    path = str(tmp_path / "vit.onnx")
    res = export_onnx(model, path, input_size=(3, 32, 32), layout="gather")
    out = capsys.readouterr().out
    assert "same for every input" in out
    assert res.verified_on.startswith("perturbed copy") and "heads.head.weight" in res.verified_on
    # the comparison was on outputs that vary: a real error scale, not 0 vs 0
    assert res.max_abs_err is not None and res.max_rel_err < 1e-4 and os.path.exists(path)


class _Ignores(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.c = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * 0 + self.c


def test_input_independent_output_fails_verification(tmp_path):
    path = str(tmp_path / "c.onnx")
    with pytest.raises(UserError, match="same for every input") as info:
        export_onnx(_Ignores(), path, input_size=(4,), layout="dense", verbose=False)
    assert "\n" not in str(info.value)
    assert not os.path.exists(path)
    export_onnx(_Ignores(), path, input_size=(4,), layout="dense", verify=False, verbose=False)
    assert os.path.exists(path)


def test_nan_weights_refused_and_nan_outputs_fail(tmp_path):
    m = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight.fill_(float("nan"))
    path = str(tmp_path / "n.onnx")
    with pytest.raises(UserError, match=r"tensor '0.weight' holds 12 NaN/inf"):
        export_onnx(m, path, input_size=(4,), layout="dense", verbose=False)
    with pytest.raises(UserError, match="holds NaN/inf on the verification input"):
        export_onnx(m, path, input_size=(4,), layout="dense", verbose=False, allow_nonfinite=True)
    assert not os.path.exists(path)
    export_onnx(m, path, input_size=(4,), layout="dense", verbose=False, allow_nonfinite=True, verify=False)
    assert os.path.exists(path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp") or f.startswith(".tmp-")]
