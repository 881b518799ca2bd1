"""Surgery on models beyond image classifiers: N-d convs, transformers' Conv1D, tied weights,
modules with no X-layer form, nn.TransformerEncoder in eval, and "nothing converted"."""

import pytest
import torch
from torch import nn

import xsurgery
from xsurgery import XConv1d, XConv3d, XLinear
from xsurgery.errors import UserError
from xsurgery.surgery import SurgerySpec, apply_surgery, decide


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 has it: weight [in, out], y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"  # how xsurgery recognises it without importing transformers


class TinyGPT(nn.Module):
    """GPT-2's shape: wte, blocks of Conv1D (c_fc, c_proj), lm_head tied to wte."""

    def __init__(self, vocab: int = 50, width: int = 32) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, width)
        self.transformer.h = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.ln = nn.LayerNorm(width)
            block.c_fc = Conv1D(4 * width, width)
            block.c_proj = Conv1D(width, 4 * width)
            self.transformer.h.append(block)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, ids):
        x = self.transformer.wte(ids)
        for b in self.transformer.h:
            x = x + b.c_proj(torch.relu(b.c_fc(b.ln(x))))
        return self.lm_head(x)


def _by_name(decisions):
    return {d.name: d for d in decisions}


def test_gpt2_like_conv1d_converted_tied_head_kept_and_counted_once():
    torch.manual_seed(0)
    model = TinyGPT().eval()
    spec = SurgerySpec(compress=2, include_classifier=True)  # the head would be converted if it were not tied
    out, decisions, _ = apply_surgery(model, spec)
    d = _by_name(decisions)
    assert d["transformer.h.0.c_fc"].converted and d["transformer.h.1.c_proj"].converted
    assert d["transformer.h.0.c_fc"].in_channels == 32 and d["transformer.h.0.c_fc"].out_channels == 128
    assert not d["lm_head"].converted and "shared" in d["lm_head"].reason and "transformer.wte" in d["lm_head"].reason
    assert not d["transformer.wte"].converted and "embedding" in d["transformer.wte"].reason
    assert isinstance(out.transformer.h[0].c_fc, XLinear) and out.lm_head.weight is out.transformer.wte.weight
    ids = torch.randint(0, 50, (2, 7))
    assert out(ids).shape == model(ids).shape
    # the tied tensor counted once before and after; the saving is exactly the Conv1Ds'
    dense_params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    saved = sum(m.weight.numel() // 2 for n, m in model.named_modules() if isinstance(m, Conv1D))
    assert sum(p.numel() for p in out.parameters()) == dense_params - saved


def test_gpt2_like_report_counts_conv1d_and_tied_once():
    torch.manual_seed(0)
    model = TinyGPT().eval()
    model.default_input_size = (7,)
    # token ids: the report's random float input would not index an embedding, so count on
    # a float stand-in through the same layers (the Conv1D rows are what is under test)
    out, decisions, _ = apply_surgery(model, SurgerySpec(compress=2))
    from xsurgery.analysis import report

    class Embedded(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            h = x
            for b in self.m.transformer.h:
                h = h + b.c_proj(torch.relu(b.c_fc(b.ln(h))))
            return self.m.lm_head(h)

    rep = report(Embedded(out), (5, 32), decisions=[])
    t = rep.totals
    dense_macs = 5 * sum(m.weight.numel() for m in model.modules() if isinstance(m, Conv1D)) + 5 * 32 * 50
    assert t["macs_before"] == dense_macs
    assert t["macs_after"] == dense_macs - 5 * sum(m.weight.numel() // 2 for m in model.modules() if isinstance(m, Conv1D))
    assert t["params_before"] == sum(p.numel() for p in model.parameters())


class Zoo(nn.Module):
    """One of every weight-carrying kind the surgery does not convert, and two it does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.up = nn.ConvTranspose1d(16, 16, 2, stride=2)
        self.dw = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv1d(16, 32, 1)
        self.mix = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, ids):
        x = self.emb(ids)
        x, _ = self.lstm(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.up(x.transpose(1, 2))
        x = self.mix(torch.relu(self.pw(self.dw(x))))
        return self.head(x.mean(-1))


def test_every_weight_module_has_a_decision_with_a_reason():
    decisions, _ = decide(Zoo(), SurgerySpec(compress=2))
    d = _by_name(decisions)
    expected = {
        "emb": "embedding", "lstm": "recurrent", "attn": "MultiheadAttention", "attn.out_proj": "directly",
        "up": "transposed", "dw": "depthwise", "head": "classifier",
    }
    for name, word in expected.items():
        assert not d[name].converted and word in d[name].reason, (name, d[name].reason)
    assert d["mix"].converted and d["mix"].kind == "conv"
    assert set(d) == set(expected) | {"pw", "mix"}


def test_zero_converted_is_an_error_unless_allowed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 2))
    with pytest.raises(UserError, match="0 of 2 layers converted.*--allow-none") as err:
        xsurgery.convert(model, compress=2, input_size=32)
    assert "\n" not in str(err.value)
    converted, rep = xsurgery.convert(model, compress=2, input_size=32, allow_none=True)
    assert rep.totals["converted_layers"] == 0


def test_cli_zero_converted_one_line(capsys):
    from xsurgery.cli import main

    assert main(["convert", "resnet18", "--exclude", "*", "--input-size", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xsurgery: error: 0 of") and "--allow-none" in err[0]
    assert main(["convert", "resnet18", "--exclude", "*", "--input-size", "32", "--allow-none", "--max-rows", "2"]) == 0


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_converted_runs_in_eval(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first).eval()
    out, decisions, _ = apply_surgery(enc, SurgerySpec(compress=2, include_classifier=True))
    d = _by_name(decisions)
    assert d["layers.0.linear1"].converted and d["layers.1.linear2"].converted
    assert "directly" in d["layers.0.self_attn.out_proj"].reason
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    # reference: the same model with every X-layer as its dense twin, fast path off
    ref = _densified(out)
    out.eval()
    ref.eval()
    with torch.no_grad():
        y = out(x, src_key_padding_mask=mask)  # fast path on: crashed before
        y_plain = out(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            r = ref(x, src_key_padding_mask=mask)
            r_plain = ref(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_plain, r_plain, rtol=1e-5, atol=1e-5)
    assert not out.use_nested_tensor and all(lay.activation_relu_or_gelu == 0 for lay in out.layers)


def test_conv1d_and_conv3d_nets_convert():
    net1 = nn.Sequential(nn.Conv1d(4, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv1d(32, 64, 1), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 3))
    net1.default_input_size = (4, 50)
    out, rep = xsurgery.convert(net1, compress=4)
    assert isinstance(out[2], XConv1d) and isinstance(out[4], XConv1d) and not isinstance(out[0], XConv1d)
    t = rep.totals
    assert t["params_before"] == sum(p.numel() for p in net1.parameters())
    assert t["params_after"] == sum(p.numel() for p in out.parameters())
    # MACs before against torch's own counter; after: the dense count scaled by D / C_in per X-layer
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net1(torch.randn(1, 4, 50))
    assert t["macs_before"] == fc.get_total_flops() // 2
    assert t["macs_before"] - t["macs_after"] == 50 * 32 * 32 * 3 * 3 // 4 + 50 * 64 * 32 * 3 // 4
    net3 = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 2))
    net3.default_input_size = (3, 4, 8, 8)
    out3, rep3 = xsurgery.convert(net3, compress=2)
    assert isinstance(out3[2], XConv3d) and out3[2].degree == 8
    assert rep3.totals["macs_after"] < rep3.totals["macs_before"]
    assert rep3.totals["macs_before"] - rep3.totals["macs_after"] == 4 * 8 * 8 * 16 * 8 * 27


def _densified(model):
    import copy

    m = copy.deepcopy(model)
    for name, layer in list(m.named_modules()):
        if hasattr(layer, "to_dense") and hasattr(layer, "index"):
            m.set_submodule(name, layer.to_dense())
    return m
