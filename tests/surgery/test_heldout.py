"""Held-out model families (issue 23, "Models"): Hugging Face decoders, encoder-decoders, SSMs and
MoEs built from tiny configs, and hand-made models with the patterns they exercise (weights read
directly, custom Linear subclasses, parametrizations, pruning, lazy modules, dataclass outputs,
bf16/f64). Each is converted, counted against independent sums, saved and loaded, and exported
where the dense model exports."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

import xsurgery
from xsurgery.checkpoint import load, save
from xsurgery.errors import UserError
from xsurgery.graphs import input_coverage
from xsurgery.surgery import convert

tf = pytest.importorskip("transformers")

V = 64
TINY = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "vocab_size": V}


def _hf(cfg_cls, model_cls, **kw):
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return model_cls(cfg).eval()


FAMILIES = {
    "mobilebert": lambda: _hf(tf.MobileBertConfig, tf.MobileBertForMaskedLM, **TINY, embedding_size=16,
                              intra_bottleneck_size=32, true_hidden_size=32, num_feedforward_networks=1),
    "mamba": lambda: _hf(tf.MambaConfig, tf.MambaForCausalLM, num_hidden_layers=2, hidden_size=32, state_size=4,
                         vocab_size=V, expand=2, conv_kernel=4, time_step_rank=4),
    "falcon": lambda: _hf(tf.FalconConfig, tf.FalconForCausalLM, num_hidden_layers=2, hidden_size=32,
                          num_attention_heads=2, vocab_size=V),
    "mixtral": lambda: _hf(tf.MixtralConfig, tf.MixtralForCausalLM, **TINY, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: _hf(tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, **TINY, num_key_value_heads=2, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "bloom": lambda: _hf(tf.BloomConfig, tf.BloomForCausalLM, n_layer=2, hidden_size=32, n_head=2, vocab_size=V),
    "phi3": lambda: _hf(tf.Phi3Config, tf.Phi3ForCausalLM, **TINY, num_key_value_heads=2, pad_token_id=0),
    "gemma2": lambda: _hf(tf.Gemma2Config, tf.Gemma2ForCausalLM, **TINY, num_key_value_heads=2, head_dim=16),
    "pegasus": lambda: _hf(tf.PegasusConfig, tf.PegasusForConditionalGeneration, encoder_layers=1, decoder_layers=1,
                           d_model=32, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, vocab_size=V, max_position_embeddings=64),
}


def _example(name):
    torch.manual_seed(1)
    ex = {"input_ids": torch.randint(0, V, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    if name == "pegasus":
        ex["decoder_input_ids"] = torch.randint(0, V, (1, 4))
    if name == "mamba":
        ex.pop("attention_mask")
    return ex


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_family_converts_counts_and_round_trips(name, tmp_path):
    dense = FAMILIES[name]()
    assert getattr(dense.config, "use_cache", True)  # transformers' default, as a new user has it
    ex = _example(name)
    conv, rep = convert(dense, example_inputs=ex)
    assert rep.totals["converted_layers"] > 0
    # counts against independent sums: every parameter of both models, each reported layer's own
    assert rep.params_before == sum(p.numel() for p in dense.parameters())
    assert rep.params_after == sum(p.numel() for p in conv.parameters())
    mods = dict(dense.named_modules())
    for row in rep.layers:
        if row.kind not in ("matmul", "attention", "functional") and row.name in mods:
            assert row.params_before == sum(p.numel() for p in mods[row.name].parameters(recurse=False)) or \
                row.converted or row.params_before == sum(p.numel() for p in mods[row.name].parameters())
        assert row.converted or row.reason is not None or row.kind in ("matmul", "attention", "functional"), row
    # save / load
    path = str(tmp_path / f"{name}.xs")
    save(conv, path)
    back = load(path, model=FAMILIES[name]())
    with torch.no_grad():
        assert torch.allclose(_logits(back(**ex)), _logits(conv(**ex)), atol=1e-6)


def test_weights_read_directly_are_found_without_fx():
    """fx fails on transformers-5 models; the probe finds MobileBERT's LM head and Mamba's dt_proj."""
    _, rep = convert(FAMILIES["mobilebert"](), example_inputs=_example("mobilebert"))
    rows = {r.name: r for r in rep.layers}
    assert rep.method == "module-swap"  # the trace failed, the probe still ran
    assert "weights read directly (cat of cls.predictions.dense.weight" in rows["cls.predictions.dense"].reason
    _, rep = convert(FAMILIES["mamba"](), example_inputs=_example("mamba"))
    rows = {r.name: r for r in rep.layers}
    for i in range(2):
        r = rows[f"backbone.layers.{i}.mixer.dt_proj"]
        assert not r.converted and "weights read directly" in r.reason and "dt_proj.weight" in r.reason


def test_ten_line_model_with_weight_T():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.head(torch.relu(self.a(x)) @ self.b.weight.T)

    conv, rep = convert(M(), example_inputs=torch.randn(2, 32), include_stem=True)
    rows = {r.name: r for r in rep.layers}
    assert rows["a"].converted and not rows["b"].converted
    assert rows["b"].reason.startswith("weights read directly (.T of b.weight")
    conv(torch.randn(3, 32))  # runs: b kept its dense weight


def test_moe_experts_are_counted_with_a_reason():
    dense = FAMILIES["mixtral"]()
    ex = _example("mixtral")
    _, rep = convert(dense, example_inputs=ex)
    cfg = dense.config
    tokens = ex["input_ids"].numel()
    # independent: each token meets top_k experts: gate_up (2I x H) then down (H x I)
    per_layer = tokens * cfg.num_experts_per_tok * (2 * cfg.intermediate_size * cfg.hidden_size
                                                   + cfg.hidden_size * cfg.intermediate_size)
    for i in range(cfg.num_hidden_layers):
        row = next(r for r in rep.layers if r.name == f"model.layers.{i}.mlp.experts")
        experts = dense.model.layers[i].mlp.experts
        assert row.kind == "experts" and not row.converted and "MoE experts" in row.reason
        assert row.params_before == sum(p.numel() for p in experts.parameters())
        assert row.macs_before == per_layer


def test_custom_linear_subclass_with_plain_forward_converts():
    """transformers' FalconLinear: ``x @ self.weight.T + bias``, verified on the example."""
    dense = FAMILIES["falcon"]()
    conv, rep = convert(dense, example_inputs=_example("falcon"))
    qkv = [r for r in rep.layers if r.name.endswith("query_key_value")]
    assert qkv and all(r.converted for r in qkv)
    assert type(dense.transformer.h[0].self_attention.query_key_value).__name__ == "FalconLinear"

    class Scaled(nn.Linear):  # a forward that differs stays dense, named
        def forward(self, x):
            return 2 * super().forward(x)

    m = nn.Sequential(nn.Linear(32, 64), Scaled(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    _, rep = convert(m, example_inputs=torch.randn(2, 32))
    assert "custom Scaled (its forward differs from nn.Linear's)" in {r.name: r for r in rep.layers}["1"].reason


def test_parametrized_pruned_and_weight_normed_layers_stay_dense_and_count(tmp_path):
    from torch.nn.utils import prune, weight_norm
    from torch.nn.utils.parametrizations import spectral_norm
    from torch.nn.utils.parametrizations import weight_norm as p_weight_norm

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64),
                          nn.Linear(64, 64), nn.Linear(64, 10))
        prune.l1_unstructured(m[2], "weight", 0.5)
        weight_norm(m[3])
        p_weight_norm(m[4])
        spectral_norm(m[5])
        return m

    dense = build()
    conv, rep = convert(dense, example_inputs=torch.randn(2, 32), include_stem=True)
    rows = {r.name: r for r in rep.layers}
    assert rows["0"].converted
    assert rows["2"].reason.startswith("pruned") and rows["3"].reason.startswith("legacy weight_norm")
    assert "_WeightNorm" in rows["4"].reason and "_SpectralNorm" in rows["5"].reason
    assert rep.params_before == sum(p.numel() for p in dense.parameters())
    assert rows["4"].params_before == 64 * 64 + 64 + 64  # v, g and the bias
    assert torch.equal(conv[2].weight_mask, dense[2].weight_mask)  # the mask carried with the dense layer
    path = str(tmp_path / "p.xs")
    save(conv, path)
    back = load(path, model=build())
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), conv(x), atol=1e-6)


def test_input_coverage_is_a_rule_and_raw_input_linear_is_the_stem():
    mlp = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    conv, rep = convert(mlp, compress=32, mixing=1, include_stem=True, input_size=40)
    for name, layer in conv.named_modules():
        if isinstance(layer, xsurgery.XLinear):
            reads = torch.bincount(layer.graph.index.flatten(), minlength=layer.in_features)
            assert int((reads == 0).sum()) == 0 and input_coverage(layer.graph) == 1.0, name
            assert layer.blocks >= math.ceil(layer.in_features / layer.degree)
    _, rep = convert(mlp, compress=32, mixing=1, input_size=40)
    assert {r.name: r for r in rep.layers}["0"].reason == "stem (--include-stem)"


def test_lazy_modules_initialize_on_the_example():
    m = nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.LazyLinear(64), nn.ReLU(), nn.Linear(64, 10))
    conv, rep = convert(m, example_inputs=torch.randn(2, 32))
    assert {r.name: r for r in rep.layers}["2"].converted
    assert isinstance(m[0], nn.LazyLinear)  # the user's model is not initialized behind their back
    with pytest.raises(UserError, match="uninitialized lazy modules .*example_inputs"):
        convert(nn.Sequential(nn.LazyLinear(8), nn.Linear(8, 8)))


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    hidden: torch.Tensor


class _DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return _Out(self.head(h), h)


def test_export_dataclass_outputs_and_dtypes(tmp_path):
    pytest.importorskip("onnxruntime")
    from xsurgery.export import export_onnx

    conv, _ = convert(_DataclassOut(), example_inputs=torch.randn(2, 32))
    res = export_onnx(conv, str(tmp_path / "dc.onnx"), example_inputs=torch.randn(2, 32), layout="gather",
                      verbose=False)
    import onnx

    assert len(onnx.load(res.path).graph.output) == 2  # both fields
    for dtype in (torch.bfloat16, torch.float64):
        m = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)).to(dtype)
        conv, _ = convert(m, example_inputs=torch.randn(2, 32, dtype=dtype))
        with pytest.raises(UserError, match=r"weights are (bfloat16|float64).*model\.float\(\)") as err:
            export_onnx(conv, str(tmp_path / "x.onnx"), example_inputs=torch.randn(2, 32, dtype=dtype), verbose=False)
        assert "\n" not in str(err.value)


def test_export_generative_model_left_with_its_cache_on(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from xsurgery.export import export_onnx

    dense = _hf(tf.GPT2Config, tf.GPT2LMHeadModel, n_layer=2, n_embd=32, n_head=2, vocab_size=V)
    assert dense.config.use_cache
    ex = _example("gpt2")
    conv, _ = convert(dense, example_inputs=ex)
    res = export_onnx(conv, str(tmp_path / "g.onnx"), example_inputs=ex, layout="gather", verbose=False)
    proto = onnx.load(res.path)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["xsurgery.cache"].startswith("off") and len(proto.graph.output) == 1  # the logits
    assert conv.config.use_cache  # the caller's model keeps its setting
    # without an attention mask the torch exporter cannot export the dense model either: it says so,
    # and names the input that fixes it
    with pytest.raises(UserError, match="every layer dense too") as err:
        export_onnx(conv, str(tmp_path / "g2.onnx"), example_inputs={"input_ids": ex["input_ids"]}, verbose=False)
    assert "add --input attention_mask=<input_ids' shape>:int64" in str(err.value) and "\n" not in str(err.value)


def _tv(name):
    tv = pytest.importorskip("torchvision").models
    torch.manual_seed(0)
    if name == "lraspp":
        return tv.segmentation.lraspp_mobilenet_v3_large(num_classes=3, weights_backbone=None).eval(), \
            torch.randn(1, 3, 64, 64)
    if name == "fcn":
        return tv.segmentation.fcn_resnet50(num_classes=3, weights_backbone=None).eval(), torch.randn(1, 3, 64, 64)
    if name == "ssdlite":
        return tv.detection.ssdlite320_mobilenet_v3_large(num_classes=3, weights_backbone=None).eval(), \
            ([torch.rand(3, 128, 128)],)
    return tv.detection.maskrcnn_resnet50_fpn(num_classes=3, weights_backbone=None, min_size=128,
                                              max_size=128).eval(), ([torch.rand(3, 128, 128)],)


@pytest.mark.parametrize("name", ["lraspp", "fcn", "ssdlite", "maskrcnn"])
def test_torchvision_family_converts_counts_and_round_trips(name, tmp_path):
    dense, ex = _tv(name)
    conv, rep = convert(dense, example_inputs=ex)
    assert rep.totals["converted_layers"] > 0
    assert rep.params_before == sum(p.numel() for p in dense.parameters())
    assert rep.params_after == sum(p.numel() for p in conv.parameters())
    path = str(tmp_path / f"{name}.xs")
    save(conv, path)
    back = load(path, model=_tv(name)[0])
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), conv.state_dict().values()))
    # layers that ran on 0 rows (heads with no proposals after the surgery), seen independently by hooks
    empty, hooks = set(), []
    for n, m in conv.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, xsurgery.XConv2d, xsurgery.XLinear)):
            hooks.append(m.register_forward_hook(lambda m, i, o, n=n: empty.add(n) if o.numel() == 0 else None))
    with torch.no_grad():
        conv(*ex) if isinstance(ex, tuple) else conv(ex)
    for h in hooks:
        h.remove()
    assert empty == {r.name for r in rep.layers if r.note and "0 rows" in r.note}
