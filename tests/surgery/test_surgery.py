import pytest
import torch
import torchvision
from torch import nn

import xsurgery
from xsurgery import XConv2d, XLinear
from xsurgery.errors import UserError
from xsurgery.surgery import SurgerySpec, convert, decide, load_plan


def _by_name(report):
    return {row.name if hasattr(row, "name") else row["name"]: row for row in report.to_dict()["layers"]}


def test_resnet18_default_rules_and_original_untouched():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, rep = convert(model, compress=2, input_size=64)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.layer1[0].conv1, nn.Conv2d)  # original not modified
    assert type(out) is type(model)
    rows = _by_name(rep)
    assert rows["conv1"]["converted"] is False and rows["conv1"]["reason"].startswith("stem")
    assert rows["fc"]["converted"] is False and rows["fc"]["reason"].startswith("classifier")
    assert isinstance(out.layer1[0].conv1, XConv2d) and out.layer1[0].conv1.degree == 32
    assert isinstance(out.layer2[0].downsample[0], XConv2d)
    assert rows["layer2.0.downsample.0"]["kind"] == "pointwise"
    assert rep.method == "fx"
    x = torch.randn(2, 3, 64, 64)
    assert out(x).shape == model(x).shape == (2, 1000)


def test_include_flags_and_patterns():
    model = torchvision.models.resnet18()
    out, rep = convert(model, compress=4, include_stem=True, include_classifier=True, input_size=32)
    assert isinstance(out.conv1, XConv2d) and isinstance(out.fc, XLinear)
    assert out.conv1.degree == 1  # 3 // 4 -> at least 1
    out, _ = convert(model, compress=2, layers=["pointwise"], exclude=["layer4.*"], input_size=32)
    assert isinstance(out.layer2[0].downsample[0], XConv2d)
    assert isinstance(out.layer4[0].downsample[0], nn.Conv2d)
    assert isinstance(out.layer1[0].conv1, nn.Conv2d)  # 3x3: not selected
    out, rep = convert(model, compress=2, layers=["pointwise"], include=["layer1.0.conv1"], input_size=32)
    assert isinstance(out.layer1[0].conv1, XConv2d)  # include wins over --layers
    out, rep = convert(model, compress=2, include=["fc"], exclude=["fc"], input_size=32)
    assert isinstance(out.fc, nn.Linear)  # exclude wins over include
    out, rep = convert(model, compress=2, min_channels=256, input_size=32)
    assert isinstance(out.layer3[0].conv1, nn.Conv2d) and isinstance(out.layer4[0].conv1, XConv2d)
    assert "min-channels" in _by_name(rep)["layer3.0.conv1"]["reason"]


def test_depthwise_never_converted_and_mha_protected():
    out, rep = convert(torchvision.models.mobilenet_v2(), compress=2, input_size=64)
    rows = _by_name(rep)
    dw = rows["features.1.conv.0.0"]
    assert dw["kind"] == "depthwise" and not dw["converted"]
    assert isinstance(out.features[1].conv[0][0], nn.Conv2d)
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
    out, rep = convert(vit, compress=2, input_size=32)
    rows = _by_name(rep)
    assert rows["encoder.layers.encoder_layer_0.self_attention.out_proj"]["converted"] is False
    assert isinstance(out.encoder.layers[0].mlp[0], XLinear)
    assert out(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_compression_one_keep_reproduces_exactly():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    out, _ = convert(model, compress=1, init="keep", include_stem=True, include_classifier=True, input_size=48)
    out.eval()
    assert sum(isinstance(m, (XConv2d, XLinear)) for m in out.modules()) == 21
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


def test_keep_init_matches_masked_dense_model():
    """init=keep at C=4: the converted model equals the dense model with the pruned weights zeroed."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    out, _ = convert(model, compress=4, init="keep", input_size=32)
    out.eval()
    ref = torchvision.models.resnet18().eval()
    ref.load_state_dict(model.state_dict())
    for name, m in out.named_modules():
        if isinstance(m, XConv2d):
            ref.get_submodule(name).weight.data.copy_(m.to_dense().weight)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref(x), rtol=1e-4, atol=1e-4)


def test_fx_trace_of_converted_equals_eager():
    out, _ = convert(torchvision.models.resnet18(), compress=2, input_size=32)
    out.eval()
    gm = torch.fx.symbolic_trace(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), out(x))


def test_seed_per_layer_stable_under_selection_change():
    m = torchvision.models.resnet18()
    a, _ = convert(m, compress=2, seed=3, input_size=32)
    b, _ = convert(m, compress=2, seed=3, exclude=["layer1.*"], input_size=32)
    c, _ = convert(m, compress=2, seed=4, input_size=32)
    assert torch.equal(a.layer2[0].conv1.index, b.layer2[0].conv1.index)
    assert not torch.equal(a.layer2[0].conv1.index, c.layer2[0].conv1.index)


def test_plan_rules(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "rules:\n"
        "  - {pattern: 'layer4.*', compress: 8, mixing: 4}\n"
        "  - {pattern: 'layer1.0.conv1', degree: 4, graph: grouped}\n"
        "  - {pattern: 'layer1.*', skip: true}\n"
        "  - {pattern: 'fc', compress: 2}\n"
    )
    out, rep = convert(torchvision.models.resnet18(), compress=2, plan=str(plan), input_size=32)
    assert out.layer4[0].conv1.degree == 256 // 8 and out.layer4[0].conv1.blocks == 4 * 8
    assert out.layer1[0].conv1.degree == 4 and out.layer1[0].conv1.graph_name == "grouped"  # exact name first
    assert isinstance(out.layer1[0].conv2, nn.Conv2d)
    assert isinstance(out.fc, XLinear)  # a rule converts what the defaults keep dense
    assert out.layer2[0].conv1.degree == 64 // 2
    assert load_plan([{"pattern": "a", "compress": 2}])[0].compress == 2
    with pytest.raises(UserError, match="unknown key"):
        load_plan([{"pattern": "a", "compres": 2}])


def test_cayley_skips_non_power_of_two_layers():
    out, rep = convert(torchvision.models.mobilenet_v2(), compress=2, graph="cayley", input_size=32)
    rows = _by_name(rep)
    conv = [r for r in rows.values() if r["converted"]]
    assert conv and all(r["graph"] == "cayley" for r in conv)
    skipped = rows["features.3.conv.0.0"]  # 24 -> 144
    assert not skipped["converted"] and "power-of-two" in skipped["reason"]


def test_spec_round_trip():
    spec = SurgerySpec(compress=4, mixing=1, include=("a*",), plan=load_plan([{"pattern": "x", "degree": 3}]))
    assert SurgerySpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UserError, match="unknown surgery field"):
        SurgerySpec.from_dict({"compres": 2})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"compress": 0}, "--compress must be a number >= 1"),
        ({"compress": -3}, "--compress must be a number >= 1"),
        ({"degree": 100000}, "larger than the input channels of every selected layer"),
        ({"include": ["nothing.*"]}, "matches no conv/linear layer"),
        ({"exclude": ["nothing.*"]}, "matches no conv/linear layer"),
        ({"graph": "nope"}, "unknown --graph"),
        ({"mixing": 0}, "--mixing must be a positive integer"),
        ({"layers": ["depthwise"]}, "--layers takes any of"),
        ({"compress": 2, "degree": 2}, "not both"),
    ],
)
def test_bad_requests(kwargs, match):
    with pytest.raises(UserError, match=match):
        convert(torchvision.models.resnet18(), input_size=32, **kwargs)


def test_unknown_model_names():
    with pytest.raises(UserError, match="unknown model 'resnet5o'.*did you mean"):
        convert("resnet5o")
    with pytest.raises(UserError, match="unknown timm model"):
        convert("timm/not_a_model")
    with pytest.raises(UserError, match="cannot import"):
        convert("no_such_pkg.mod:factory")


def test_top_level_api():
    out, rep = xsurgery.convert("resnet18", compress=2, input_size=32, model_kwargs={"num_classes": 10})
    assert out.fc.out_features == 10
    assert rep.totals["params_after"] == sum(p.numel() for p in out.parameters())
    assert rep.totals["params_after"] < rep.totals["params_before"]
    again = xsurgery.report(out, input_size=(3, 32, 32))
    assert again.totals["macs_after"] == rep.totals["macs_after"]


def test_decide_does_not_modify():
    m = torchvision.models.resnet18()
    decisions, trace = decide(m, SurgerySpec(compress=2))
    assert trace.ok and trace.stems == {"conv1"} and trace.classifiers == {"fc"}
    assert all(isinstance(mod, (nn.Conv2d, nn.Linear)) for n, mod in m.named_modules() if n in {d.name for d in decisions})


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = x * 2
        return self.head(self.body(x).mean((2, 3)))


def test_fallback_when_fx_cannot_trace():
    model = _Untraceable()
    out, rep = convert(model, compress=2, input_size=16)
    assert rep.method == "module-swap" and rep.trace_error
    rows = _by_name(rep)
    assert rows["stem"]["reason"].startswith("stem") and rows["head"]["reason"].startswith("classifier")
    assert isinstance(out.body[0], XConv2d) and isinstance(out.body[2], XConv2d)
    assert out(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_converted_runs_at_other_input_sizes():
    model = torchvision.models.resnet18().eval()
    out, _ = convert(model, compress=2, input_size=64)
    out.eval()
    for size in (32, 97, 128):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            assert out(x).shape == model(x).shape
