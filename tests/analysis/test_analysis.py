import dataclasses
import io
import json

import pytest
import timm
import torch
import torchvision
from rich.console import Console
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from xsurgery import XConv2d, XLinear
from xsurgery.analysis import LayerRow, Report, cached_spectral_gap, default_input_size, report
from xsurgery.graphs import spectral_gap

REQUIRED_LAYER_FIELDS = {
    "name", "kind", "converted", "reason", "in_channels", "out_channels", "kernel", "degree", "blocks", "graph",
    "spectral_gap", "params_before", "params_after", "macs_before", "macs_after",
}
REQUIRED_TOTALS = {"params_before", "params_after", "macs_before", "macs_after", "flops_before", "flops_after"}


def _flop_counter_macs(model: nn.Module, size) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, *size))
    return fc.get_total_flops() // 2


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _hand_convert(model: nn.Module, names, **kw) -> nn.Module:
    # FlopCounterMode sees the aten ops: gather execution is a grouped conv / bmm over the D
    # kept inputs and is counted as sparse, but masked execution is a dense conv on a
    # mostly-zero weight and FlopCounterMode would count it as dense. So compare on gather.
    for n in names:
        m = model.get_submodule(n)
        cls = XConv2d if isinstance(m, nn.Conv2d) else XLinear
        _set_module(model, n, cls.from_dense(m, execution="gather", seed=hash(n) % 1000, **kw))
    return model


def _assert_flops_are_twice_macs(rep: Report) -> None:
    for row in rep.to_dict()["layers"]:
        assert row["flops_before"] == 2 * row["macs_before"]
        assert row["flops_after"] == 2 * row["macs_after"]
    t = rep.totals
    assert t["flops_before"] == 2 * t["macs_before"] and t["flops_after"] == 2 * t["macs_after"]


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def test_resnet18_dense_matches_flop_counter(resnet18):
    rep = report(resnet18, (3, 224, 224))
    ref = _flop_counter_macs(resnet18, (3, 224, 224))
    t = rep.totals
    assert t["macs_before"] == t["macs_after"]
    assert abs(t["macs_before"] - ref) <= 0.01 * ref
    assert t["params_before"] == t["params_after"] == _n_params(resnet18) == 11_689_512
    assert t["converted_layers"] == 0
    _assert_flops_are_twice_macs(rep)
    kinds = {r.name: r.kind for r in rep.layers}
    assert kinds["conv1"] == "conv" and kinds["layer2.0.downsample.0"] == "pointwise" and kinds["fc"] == "linear"


def test_per_layer_macs_by_hand(resnet18):
    rows = {r.name: r for r in report(resnet18, (3, 64, 96)).layers}
    # conv1: 7x7 stride 2 pad 3, 3 -> 64: output 32 x 48
    oh, ow = (64 + 6 - 7) // 2 + 1, (96 + 6 - 7) // 2 + 1
    assert rows["conv1"].macs_before == 64 * oh * ow * 3 * 7 * 7
    assert rows["conv1"].params_before == 64 * 3 * 7 * 7
    # layer3.0.conv1: 3x3 stride 2, 128 -> 256, input 8 x 12 (after stem /4 and layer2 /2)
    assert rows["layer3.0.conv1"].macs_before == 256 * 4 * 6 * 128 * 9
    assert rows["fc"].macs_before == 512 * 1000 and rows["fc"].params_before == 512 * 1000 + 1000
    assert rows["conv1"].calls == 1


def test_batch_scales_macs_not_params(resnet18):
    one, two = report(resnet18, (3, 32, 32)), report(resnet18, (3, 32, 32), batch=2)
    assert two.totals["macs_before"] == 2 * one.totals["macs_before"]
    assert two.totals["params_before"] == one.totals["params_before"]


def test_hand_converted_resnet18():
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(weights=None)
    names = ["layer1.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer4.1.conv1", "fc"]
    model = _hand_convert(torchvision.models.resnet18(weights=None), names, compress=4, mixing=2)
    size = (3, 96, 96)
    rep = report(model, size)
    t = rep.totals
    assert t["params_after"] == _n_params(model)
    assert t["params_before"] == _n_params(dense)
    assert t["params_after"] < t["params_before"]
    assert t["macs_before"] == report(dense, size).totals["macs_before"]
    ref = _flop_counter_macs(model, size)
    assert abs(t["macs_after"] - ref) <= 0.01 * ref
    assert t["converted_layers"] == len(names)
    _assert_flops_are_twice_macs(rep)

    rows = {r.name: r for r in rep.layers}
    x = rows["layer2.0.conv2"]  # 128 -> 128, 3x3, input 12 x 12
    layer = model.get_submodule("layer2.0.conv2")
    assert x.converted and x.kind == "conv" and x.degree == 32 and x.blocks == layer.blocks
    assert x.macs_before == 128 * 12 * 12 * 128 * 9 and x.macs_after == 128 * 12 * 12 * 32 * 9
    assert x.params_after == 128 * 32 * 9 and x.params_before == 128 * 128 * 9
    assert x.spectral_gap == pytest.approx(spectral_gap(layer.graph))
    assert x.graph == layer.graph_name == "paired" and x.mixing == pytest.approx(2.0)  # graph auto at mixing 2
    assert rows["fc"].kind == "linear" and rows["fc"].macs_after == 1000 * 128
    assert rows["layer2.0.downsample.0"].kind == "pointwise"
    assert not rows["conv1"].converted and rows["conv1"].reason is None


def test_vit_dense_matches_flop_counter():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96)
    size = default_input_size(vit)
    assert size == (3, 96, 96)
    rep = report(vit)
    # FlopCounterMode has no formula for the CPU flash kernel of scaled_dot_product_attention
    # (aten._scaled_dot_product_flash_attention_for_cpu) and would miss q@k^T and attn@v; the
    # math backend decomposes into bmm, which both count.
    with sdpa_kernel(SDPBackend.MATH):
        ref = _flop_counter_macs(vit, size)
        math_rep = report(vit)
    for r in (rep, math_rep):
        assert abs(r.totals["macs_before"] - ref) <= 0.01 * ref
    # the attention row (fused kernel) and the matmul row (math path) count the same work
    att = {r.name: r.macs_before for r in rep.layers if r.kind == "attention"}
    mm = {r.name: r.macs_before for r in math_rep.layers if r.kind == "matmul"}
    assert len(att) == 12 and att == mm
    tokens, dim = (96 // 16) ** 2 + 1, 192
    assert att["blocks.0.attn"] == 2 * tokens * tokens * dim
    assert rep.totals["params_after"] == _n_params(vit)
    _assert_flops_are_twice_macs(rep)


def test_hand_converted_vit():
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    names = [f"blocks.{i}.{n}" for i in range(12) for n in ("attn.qkv", "mlp.fc1", "mlp.fc2")]
    _hand_convert(vit, names, compress=2, mixing=2)
    rep = report(vit)
    t = rep.totals
    assert t["params_after"] == _n_params(vit) and t["params_before"] == _n_params(dense)
    with sdpa_kernel(SDPBackend.MATH):
        ref = _flop_counter_macs(vit, (3, 64, 64))
    assert abs(t["macs_after"] - ref) <= 0.01 * ref
    assert t["macs_before"] == report(dense).totals["macs_before"]
    assert t["converted_layers"] == 36
    fc1 = next(r for r in rep.layers if r.name == "blocks.3.mlp.fc1")
    assert fc1.macs_after == 17 * 768 * 96 and fc1.macs_before == 17 * 768 * 192
    _assert_flops_are_twice_macs(rep)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.convs = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                   nn.Conv2d(8, 8, 3, padding=1, groups=2))

    def forward(self, x):
        y = self.convs(x).mean((2, 3))
        y = self.proj(self.proj(y))  # the same module twice
        z = torch.einsum("bi,oi->bo", y, self.proj.weight)  # contracts i: an mm
        return y[:, :, None] @ z[:, None, :]  # [1, 8, 1] @ [1, 1, 8]: a bmm with k = 1


def test_shared_module_grouped_kinds_and_functional_rows():
    m = _Shared()
    rep = report(m, (4, 5, 5), name="shared")
    rows = {(r.name, r.kind): r for r in rep.layers}
    assert rows[("proj", "linear")].calls == 2 and rows[("proj", "linear")].macs_before == 2 * 64
    assert rows[("convs.1", "depthwise")].macs_before == 8 * 25 * 9
    assert rows[("convs.2", "grouped")].macs_before == 8 * 25 * 4 * 9
    # the einsum (8 x 8 weight) and the outer-product bmm, counted under the root module
    fn = rows[("", "matmul")]
    assert fn.macs_before == fn.macs_after == 64 + 64 and not fn.converted
    assert rep.model == "shared"


def test_decisions_merge_and_render():
    torch.manual_seed(0)
    model = _hand_convert(torchvision.models.resnet18(weights=None), ["layer1.0.conv1"], compress=2)
    layer = model.get_submodule("layer1.0.conv1")
    decisions = [
        {"name": "conv1", "kind": "conv", "converted": False, "reason": "stem"},
        {"name": "fc", "kind": "linear", "converted": False, "reason": "classifier"},
        {"name": "layer1.0.conv1", "kind": "conv", "converted": True, "reason": None, "in_channels": 64,
         "out_channels": 64, "kernel": [3, 3], "degree": 32, "blocks": layer.blocks, "graph": "random",
         "spectral_gap": 0.25},
    ]
    rep = report(model, (3, 64, 64), decisions=decisions, name="resnet18")
    rep.method = "fx"
    rows = {r.name: r for r in rep.layers}
    assert rows["conv1"].reason == "stem" and rows["fc"].reason == "classifier"
    assert rows["layer1.0.conv1"].converted and rows["layer1.0.conv1"].spectral_gap == 0.25

    d = json.loads(rep.to_json())
    assert set(d) >= {"model", "input_size", "totals", "layers"}
    assert d["model"] == "resnet18" and d["input_size"] == [3, 64, 64]
    assert set(d["totals"]) >= REQUIRED_TOTALS
    for row in d["layers"]:
        assert set(row) >= REQUIRED_LAYER_FIELDS
    assert d["method"] == "fx" and Report.from_dict(d).to_dict() == d

    buf = io.StringIO()
    rep.render(Console(file=buf, width=200), max_rows=6)
    text = buf.getvalue()
    assert "MACs" in text and "FLOPs" in text and "more rows" in text
    t = rep.totals
    assert f"{t['params_before'] / 1e6:.2f} M" in text  # 11.69 M
    assert 1e8 < t["flops_before"] < 1e9 and f"{t['flops_before'] / 1e6:.2f} M" in text

    console = Console(record=True, width=200)
    rep.render(console)
    full = console.export_text()
    assert "stem" in full and "classifier" in full and "more rows" not in full


def test_projected_plan_on_dense_model(resnet18):
    decisions = [{"name": "layer1.0.conv1", "converted": True, "degree": 16, "blocks": 8, "graph": "random"}]
    rep = report(resnet18, (3, 32, 32), decisions=decisions, project=True)
    row = next(r for r in rep.layers if r.name == "layer1.0.conv1")
    assert row.projected and row.params_after == 64 * 16 * 9 and row.macs_after * 4 == row.macs_before
    assert rep.totals["params_before"] - rep.totals["params_after"] == 64 * 48 * 9
    plain = report(resnet18, (3, 32, 32), decisions=decisions)
    assert plain.totals["params_after"] == _n_params(resnet18)


def test_default_input_size():
    assert default_input_size(torchvision.models.resnet50(weights=None)) == (3, 224, 224)
    assert default_input_size(torchvision.models.inception_v3(weights=None, init_weights=False)) == (3, 299, 299)
    assert default_input_size(timm.create_model("resnet10t", pretrained=False)) == (3, 176, 176)
    m = nn.Linear(3, 3)
    m.default_input_size = (3, 32, 32)
    assert default_input_size(m) == (3, 32, 32)


def test_training_flag_restored_and_gap_cached():
    m = XConv2d(16, 16, 1, compress=4, graph="exact")
    bn = nn.BatchNorm2d(16).eval()  # a frozen norm must stay in eval
    model = nn.Sequential(m, bn).train()
    bn.eval()
    rep = report(model, (16, 4, 4))
    assert model.training and m.training and not bn.training
    assert rep.layers[0].spectral_gap == cached_spectral_gap(m.graph) == pytest.approx(spectral_gap(m.graph))
    assert isinstance(rep.layers[0], LayerRow)


def test_multihead_attention_counted_by_hand():
    # nn.MultiheadAttention runs in_proj / out_proj as F.linear on its own weights and the
    # attention as scaled_dot_product_attention: all functional, under "self_attn"
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    fast = torch.backends.mha.get_fastpath_enabled()
    rep = report(layer, (10, 32))
    assert torch.backends.mha.get_fastpath_enabled() == fast
    rows = {(r.name, r.kind): r.macs_before for r in rep.layers}
    assert rows[("self_attn", "matmul")] == 10 * 32 * 96 + 10 * 32 * 32
    assert rows[("self_attn", "attention")] == 4 * 10 * 10 * 8 * 2
    assert rows[("linear1", "linear")] == rows[("linear2", "linear")] == 10 * 32 * 64
    assert rep.totals["macs_before"] == 30720 + 10240 + 6400 + 2 * 20480
    assert rep.totals["params_after"] == _n_params(layer)


@dataclasses.dataclass
class _Decision:
    name: str
    kind: str
    converted: bool
    reason: str | None
    note: str | None = None


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module("0", nn.Conv2d(3, 8, 1))
        self.unused = nn.Linear(8, 8)  # never called by forward

    def forward(self, x):
        return self.get_submodule("0")(x)


def test_dataclass_decisions_and_unrun_modules():
    model = _WithUnused()
    rep = report(model, (3, 2, 2), decisions=[_Decision("0", "pointwise", False, "stem"),
                                             _Decision("unused", "linear", False, None, note="kept")])
    rows = {r.name: r for r in rep.layers}
    assert rows["0"].reason == "stem" and rows["0"].macs_before == 8 * 4 * 3
    assert rows["unused"].calls == 0 and rows["unused"].macs_before == 0 and rows["unused"].note == "kept"
    assert rep.totals["params_after"] == _n_params(model) == 8 * 3 + 8 + 64 + 8
