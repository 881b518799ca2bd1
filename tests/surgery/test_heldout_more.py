"""More held-out families (issue 23, "Models"): Whisper, MT5; torchvision FCOS, Keypoint R-CNN,
Swin3D, RAFT, S3D; hand-made UNet, VAE, GNN, channels-last, ``torch.compile``d, keyword-only
and dict-in models. Each converts, counts against independent sums, saves and loads to the same
outputs, and exports where the dense model exports (else the one-line error names the limit)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xsurgery.checkpoint import load, save
from xsurgery.errors import UserError
from xsurgery.surgery import convert

tf = pytest.importorskip("transformers")
tv = pytest.importorskip("torchvision")
V = 64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _seeded(build):
    def make():
        torch.manual_seed(0)
        return build().eval()
    return make


def _hf(cfg_cls, model_cls, **kw):
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    return model_cls(cfg)


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inc, self.down = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.mid, self.up = nn.Conv2d(32, 32, 3, padding=1), nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec, self.out = nn.Conv2d(32, 16, 3, padding=1), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = F.relu(self.inc(x))
        b = F.relu(self.mid(F.relu(self.down(a))))
        return self.out(F.relu(self.dec(torch.cat([a, self.up(b)], 1))))  # skip connection


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.mu, self.logvar = nn.Linear(128, 16), nn.Linear(128, 16)
        self.dec = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x):
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.dec(z), mu, logvar


class GNN(nn.Module):
    """Message passing: node features [N, F] and edges [2, E] (no batch axis), ``index_add``."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(8, 64), nn.Linear(64, 3)
        self.msg = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))
        self.upd = nn.ModuleList(nn.Linear(128, 64) for _ in range(2))

    def forward(self, x, edge_index):
        h, (src, dst) = F.relu(self.inp(x)), edge_index
        for m, u in zip(self.msg, self.upd):
            agg = torch.zeros_like(h).index_add(0, dst, F.relu(m(h))[src])
            h = F.relu(u(torch.cat([h, agg], -1)))
        return self.head(h)


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = _mlp()

    def forward(self, *, x, scale=2.0):
        return self.m(x) * scale


class DictIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(16, 64)
        self.m = nn.Sequential(nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, batch):
        return self.m(self.a(batch["x"]) + self.b(batch["y"]))


def _detector(cls, **kw):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    def build():
        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
        if cls is tv.models.detection.FCOS:
            from torchvision.ops.feature_pyramid_network import LastLevelP6P7

            backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                           returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        return cls(backbone, min_size=64, max_size=64, **kw)
    return build


def _swin3d():
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                             window_size=[2, 4, 4], num_classes=5)


torch.manual_seed(1)
_IDS = torch.randint(0, V, (1, 8))
# name: (builder, example, exports: True, or the text its one-line refusal holds)
CASES = {
    "whisper": (_seeded(lambda: _hf(
        tf.WhisperConfig, tf.WhisperForConditionalGeneration, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=V,
        num_mel_bins=8, max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1)),
        {"input_features": torch.randn(1, 8, 32), "decoder_input_ids": _IDS[:, :4]},
        "operator aten::diff"),
    "mt5": (_seeded(lambda: _hf(tf.MT5Config, tf.MT5ForConditionalGeneration, vocab_size=V, d_model=32, d_kv=16,
                                d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)),
            {"input_ids": _IDS, "attention_mask": torch.ones(1, 8, dtype=torch.long), "decoder_input_ids": _IDS[:, :4]},
            "EncoderDecoderCache"),
    "unet": (_seeded(UNet), torch.randn(1, 3, 32, 32), True),
    "vae": (_seeded(VAE), torch.randn(2, 64), True),
    "gnn": (_seeded(GNN), (torch.randn(10, 8), torch.randint(0, 10, (2, 30))),
            "(every layer of the file is dense|the file with every layer dense differs too)"),
    "channels_last": (_seeded(lambda: _cnn().to(memory_format=torch.channels_last)),
                      torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last), True),
    "compiled": (lambda: torch.compile(_seeded(_mlp)()), torch.randn(2, 32), True),
    "keyword_only": (_seeded(KeywordOnly), {"x": torch.randn(2, 32)}, True),
    "dict_in": (_seeded(DictIn), ({"x": torch.randn(2, 32), "y": torch.randn(2, 16)},), True),
    "swin3d": (_seeded(_swin3d), torch.randn(1, 3, 4, 32, 32), True),
    "fcos": (_seeded(_detector(tv.models.detection.FCOS, num_classes=3)), ([torch.rand(3, 64, 64)],), True),
    "keypoint_rcnn": (_seeded(_detector(tv.models.detection.KeypointRCNN, num_classes=2, num_keypoints=3,
                                                 box_detections_per_img=4, rpn_post_nms_top_n_test=50)),
                      ([torch.rand(3, 64, 64)],), None),  # export: the slow test
}


def _call(model, ex):
    if isinstance(ex, dict):
        return model(**ex)
    return model(*ex) if isinstance(ex, tuple) else model(ex)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return _tensors(out.logits) if hasattr(out, "logits") else []


def _module_macs(model, ex):
    """Independent dense MACs of every Linear / Conv / ConvTranspose (an X-layer: of the dense layer
    it replaced) on this model's own run: hooks and the textbook formulas."""
    import math

    from xsurgery.layers import X_LAYERS, XLinear

    total, hooks = [0], []

    def hook(m, args, out):
        if isinstance(m, (nn.Linear, XLinear)):
            total[0] += out.numel() * m.in_features
        elif isinstance(m, X_LAYERS):
            total[0] += out.numel() * m.in_channels * math.prod(m.kernel_size)
        elif isinstance(m, nn.modules.conv._ConvTransposeNd):
            total[0] += args[0].numel() * (m.out_channels // m.groups) * m.weight[0, 0].numel()
        else:
            total[0] += out.numel() * m.weight[0].numel()

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, *X_LAYERS)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        _call(model, ex)
    for h in hooks:
        h.remove()
    return total[0]


@pytest.mark.parametrize("name", list(CASES))
def test_family_converts_counts_round_trips_and_exports(name, tmp_path):
    build, ex, exports = CASES[name]
    dense = build()
    conv, rep = convert(dense, example_inputs=ex)
    assert rep.totals["converted_layers"] > 0
    assert rep.params_before == sum(p.numel() for p in dense.parameters())
    assert rep.params_after == sum(p.numel() for p in conv.parameters())
    assert all(r.converted or r.reason is not None or r.kind in ("matmul", "attention", "functional")
               for r in rep.layers)
    if name not in ("whisper", "mt5", "swin3d"):  # no functional matmuls: every MAC is a module's
        # counted on the converted model's run: a detector's heads run on its own (value-dependent) rows
        assert rep.totals["macs_before"] == _module_macs(conv, ex)
        assert rep.totals["macs_after"] < rep.totals["macs_before"]
    path = str(tmp_path / f"{name}.xs")
    save(conv, path)
    back = load(path, model=build())
    with torch.no_grad():
        got, want = _tensors(_call(back, ex)), _tensors(_call(conv, ex))
    assert got and all(torch.equal(a, b) for a, b in zip(got, want))
    if exports is None:
        return
    pytest.importorskip("onnxruntime")
    from xsurgery.export import export_onnx

    if exports is True:
        res = export_onnx(conv, str(tmp_path / f"{name}.onnx"), example_inputs=ex, layout="gather", verbose=False)
        assert res.max_abs_err is not None and res.max_abs_err <= 1e-3 * max(1.0, float(want[0].abs().max()))
    else:
        with pytest.raises(UserError, match=exports) as err:
            export_onnx(conv, str(tmp_path / f"{name}.onnx"), example_inputs=ex, verbose=False)
        assert "\n" not in str(err.value) and ("its own limit" in str(err.value) or "its limit" in str(err.value))


def test_compiled_model_converts_the_module_it_wraps(tmp_path):
    """Surgery, export and load see through ``torch.compile``: no recompiles, a file, plain keys."""
    compiled = CASES["compiled"][0]()
    conv, _ = convert(compiled, example_inputs=torch.randn(2, 32))
    assert isinstance(conv, nn.Sequential)  # the module compile wrapped, converted
    assert compiled._orig_mod[0].weight.shape == (64, 32)  # the caller's model is not modified


def test_dict_input_exports_one_onnx_input_per_tensor(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from xsurgery.export import export_onnx

    conv, _ = convert(CASES["dict_in"][0](), example_inputs=CASES["dict_in"][1])
    res = export_onnx(conv, str(tmp_path / "d.onnx"), example_inputs=CASES["dict_in"][1], verbose=False)
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["batch.x", "batch.y"]
    x, y = torch.randn(5, 32), torch.randn(5, 16)
    (got,) = sess.run(None, {"batch.x": x.numpy(), "batch.y": y.numpy()})
    with torch.no_grad():
        assert np.allclose(got, conv({"x": x, "y": y}).numpy(), atol=1e-5)


def test_graph_inputs_without_a_batch_axis_verify_at_other_sizes():
    """Edges ``[2, E]``: axis 0 is no batch (it is not the first input's size), so verification
    doubles the nodes and halves the edges instead of asking for a ``[4, 15]`` edge list."""
    from xsurgery.export._trace import _dynamic_axes

    x, ei = CASES["gnn"][1]
    axes = _dynamic_axes(((x, ei), {}), ["x", "edge_index"], [x, ei])
    assert axes == {"x": {0: "batch"}, "edge_index": {1: "sequence"}}


def test_s3d_refuses_a_small_input_in_one_line():
    dense = tv.models.video.s3d(num_classes=5).eval()
    with pytest.raises(UserError, match=r"does not run on the example input \(\[1, 3, 8, 64, 64\].*smaller than "
                                        r"kernel size.*give an input it takes") as err:
        convert(dense, example_inputs=torch.randn(1, 3, 8, 64, 64))
    assert "\n" not in str(err.value)


def test_raft_refuses_a_small_input_in_one_line():
    dense = tv.models.optical_flow.raft_small().eval()
    with pytest.raises(UserError, match=r"does not run on the example input .*H and W of feature maps should be "
                                        r"at least 16") as err:
        convert(dense, example_inputs=((torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)), {}))
    assert "\n" not in str(err.value)


def test_raft_converts_at_the_smallest_input(tmp_path):
    """128 x 128: the correlation pyramid needs feature maps of 16 (the images / 8)."""
    torch.manual_seed(0)
    dense = tv.models.optical_flow.raft_small().eval()
    ex = ((torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)), {"num_flow_updates": 2})
    conv, rep = convert(dense, example_inputs=ex)
    assert rep.totals["converted_layers"] > 0 and rep.params_after == sum(p.numel() for p in conv.parameters())
    assert rep.params_before == sum(p.numel() for p in dense.parameters())
    save(conv, str(tmp_path / "r.xs"))
    back = load(str(tmp_path / "r.xs"), model=tv.models.optical_flow.raft_small().eval())
    with torch.no_grad():
        assert torch.equal(back(*ex[0], **ex[1])[-1], conv(*ex[0], **ex[1])[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["keypoint_rcnn", "fcos", "s3d", "swin3d_t"])
def test_full_size_torchvision_families(name, tmp_path):
    """The library's own builders (ResNet-50 detectors, S3D at its smallest input, swin3d_t)."""
    pytest.importorskip("onnxruntime")
    from xsurgery.export import export_onnx

    d, video = tv.models.detection, tv.models.video
    torch.manual_seed(0)
    dense, ex = {
        "keypoint_rcnn": lambda: (d.keypointrcnn_resnet50_fpn(num_classes=2, num_keypoints=3, weights_backbone=None,
                                                              min_size=128, max_size=128), ([torch.rand(3, 128, 128)],)),
        "fcos": lambda: (d.fcos_resnet50_fpn(num_classes=3, weights_backbone=None, min_size=128, max_size=128),
                         ([torch.rand(3, 128, 128)],)),
        "s3d": lambda: (video.s3d(num_classes=5), torch.randn(1, 3, 16, 224, 224)),  # its smallest input
        "swin3d_t": lambda: (video.swin3d_t(num_classes=5), torch.randn(1, 3, 4, 32, 32)),
    }[name]()
    conv, rep = convert(dense.eval(), example_inputs=ex)
    assert rep.params_before == sum(p.numel() for p in dense.parameters())
    assert rep.params_after == sum(p.numel() for p in conv.parameters())
    if name == "s3d":
        return
    try:
        export_onnx(conv, str(tmp_path / f"{name}.onnx"), example_inputs=ex, layout="gather", verbose=False)
    except UserError as err:  # Keypoint R-CNN: torchvision's reshape(0, -1) of no detections, dense too
        assert name == "keypoint_rcnn" and "every layer dense fails too" in str(err) and "\n" not in str(err)
