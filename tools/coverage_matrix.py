"""The coverage matrix: one model of every family issue 9 names, measured end to end.

Each case builds a model offline with random weights (tiny configs: the families' layer
kinds, not their sizes), converts it at compression 2 on a real-dtype example and measures:
converted layers, parameters before/after (against the models' own ``parameters()``), the
report's MACs against ``torch.utils.flop_counter.FlopCounterMode`` on the same input (math
attention), ``save`` then ``load(model=fresh)`` bit-exact, and for the cases marked ONNX an
export verified independently in ONNX Runtime. :func:`measure` returns every number;
``tests/test_coverage.py`` asserts on them and this script writes them to
``docs/coverage.md`` / ``docs/coverage.json``::

    .venv/bin/python tools/coverage_matrix.py             # all cases, writes docs/coverage.{md,json}
    .venv/bin/python tools/coverage_matrix.py mlp gpt2    # some cases, prints the rows
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import xsurgery  # noqa: E402
from xsurgery.layers import X_LAYERS  # noqa: E402
from xsurgery.models import call, describe, flat_tensors  # noqa: E402

# --------------------------------------------------------------------------- the models


class TwoInput(nn.Module):
    """A two-input model: image-like features and a side vector, fused."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 64)
        self.b = nn.Linear(8, 64)
        self.mix = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(torch.relu(self.a(x) + self.b(side)))))


class LSTMHead(nn.Module):
    """An LSTM over a sequence with a linear head (the LSTM has no X-layer form)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.fc = nn.Linear(32, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        return self.out(torch.relu(self.fc(h[:, -1])))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def conv1d_net() -> nn.Module:
    return nn.Sequential(nn.Conv1d(4, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv1d(64, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 3))


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _hf(name: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from xsurgery.models.hf import create_hf_model

        return create_hf_model(name, config)

    return build


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from xsurgery.models import create_model

        return create_model(name, kwargs)

    return build


def _ids(*shape: int, high: int = 100) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> Any:
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, high, shape, generator=g),
                "attention_mask": torch.ones(shape, dtype=torch.int64)}

    return make


def _randn(*shape: int) -> Callable[[nn.Module], Any]:
    return lambda model: torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class Case:
    """One family of the matrix."""

    family: str
    model: str  # what is built, in words
    build: Callable[[], nn.Module]
    example: Callable[[nn.Module], Any]  # real-dtype example inputs for the built model
    onnx: bool = False  # the test exports it (all cases are exported by the tool)
    data_dependent: bool = False  # output sizes depend on the weights (detection): MACs-before on the dense twin
    convert_kwargs: dict[str, Any] = field(default_factory=dict)
    slow: bool = False


TINY_LM = {"vocab_size": 100}
CASES: dict[str, Case] = {
    "bert": Case("HF encoder", "hf/bert, 2 layers, hidden 64, vocab 100", _hf(
        "bert", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
        max_position_embeddings=64, **TINY_LM), _ids(2, 12), onnx=True),
    "gpt2": Case("HF decoder (Conv1D, tied head)", "hf/gpt2, 2 layers, n_embd 64, vocab 100", _hf(
        "gpt2", n_layer=2, n_embd=64, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0, **TINY_LM),
        _ids(2, 12), onnx=True),
    "t5": Case("HF encoder-decoder", "hf/t5, 2+2 layers, d_model 64, vocab 100", _hf(
        "t5", num_layers=2, num_decoder_layers=2, d_model=64, d_ff=128, d_kv=32, num_heads=2,
        **TINY_LM),
        lambda m: {**_ids(2, 12)(m), "decoder_input_ids": torch.randint(
            0, 100, (2, 6), generator=torch.Generator().manual_seed(1))}, onnx=True),
    "llama": Case("HF LLaMA-style decoder", "hf/llama, 2 layers, hidden 64, GQA 4/2 heads, vocab 100", _hf(
        "llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **TINY_LM), _ids(2, 12), onnx=True),
    "vit": Case("HF vision transformer", "hf/vit, 2 layers, hidden 64, 32x32 image, patch 8", _hf(
        "vit", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2, image_size=32,
        patch_size=8), lambda m: {"pixel_values": _randn(2, 3, 32, 32)(m)}, onnx=True),
    "fasterrcnn": Case("torchvision detection", "fasterrcnn_mobilenet_v3_large_320_fpn, 3 classes, 128 px",
                       _tv("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, min_size=128, max_size=128,
                           rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=50),
                       lambda m: ([_randn(3, 128, 128)(m).abs().clamp(0, 1)],), data_dependent=True),
    "deeplabv3": Case("torchvision segmentation", "deeplabv3_mobilenet_v3_large, 3 classes, 64 px",
                      _tv("deeplabv3_mobilenet_v3_large", num_classes=3), _randn(1, 3, 64, 64)),
    "r3d_18": Case("torchvision video (Conv3d)", "r3d_18, 4 classes, clip 4x32x32",
                   _tv("r3d_18", num_classes=4), _randn(1, 3, 4, 32, 32), onnx=True),
    "mlp": Case("MLP on [B, 40]", "Linear 40-512-256-10", mlp, _randn(8, 40), onnx=True),
    "conv1d": Case("Conv1d audio-style net", "Conv1d 4-32-64-64 + head, length 100", conv1d_net,
                   _randn(2, 4, 100), onnx=True),
    "lstm": Case("LSTM + linear head", "LSTM(16, 32) + Linear 32-64-4", LSTMHead, _randn(2, 10, 16), onnx=True),
    "two_input": Case("two-input model", "forward(x [B, 24], side [B, 8])", TwoInput,
                      lambda m: (_randn(4, 24)(m), _randn(4, 8)(m)), onnx=True),
    "transformer_encoder": Case("nn.TransformerEncoder (eval)", "2 layers, d_model 32, 4 heads",
                                encoder, _randn(2, 7, 32), onnx=True),
}


# --------------------------------------------------------------------------- measuring


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _flop_counter_macs(model: nn.Module, example: Any) -> int:
    """MACs by torch's own counter, on plain ops: attention in its math form (matmuls), no fused
    MultiheadAttention fast path, RNNs without oneDNN (its fused op is invisible to the counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fastpath, onednn = torch.backends.mha.get_fastpath_enabled(), torch.backends.mkldnn.enabled
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        torch.backends.mkldnn.enabled = False
        with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            call(model, example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        torch.backends.mkldnn.enabled = onednn
    return fc.get_total_flops() // 2


def _gather_twin(model: nn.Module) -> nn.Module:
    """The converted model with every X-layer in its gather execution: what runs is exactly the
    sparse work (index_select + grouped conv / batched matmul), so FlopCounterMode sees it."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, X_LAYERS):
            m.execution = "gather"
    return twin


def _dense_twin(model: nn.Module) -> nn.Module:
    """The converted model with every X-layer as its zero-filled dense equivalent (same outputs)."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, X_LAYERS):
            twin.set_submodule(name, m.to_dense())
    return twin


def _ties(model: nn.Module) -> set[frozenset[str]]:
    """Groups of parameter names that share one tensor (tied weights)."""
    groups: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(n)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _flat_out(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict) or hasattr(obj, "to_tuple"):
        obj = list(obj.values()) if isinstance(obj, dict) else list(obj.to_tuple())
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat_out(v)]
    return []


def _same(a: Any, b: Any) -> bool:
    fa, fb = _flat_out(a), _flat_out(b)
    return len(fa) == len(fb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(fa, fb))


def _onnx(converted: nn.Module, example: Any, folder: str) -> dict[str, Any]:
    """Export (gather layout), then run the file in ORT ourselves on the example and compare."""
    import onnxruntime as ort

    from xsurgery.export import export_onnx

    path = os.path.join(folder, "m.onnx")
    res = export_onnx(converted, path, example_inputs=example, layout="gather", verbose=False)
    from xsurgery.models import normalize

    ex = normalize(example)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), flat_tensors(ex))}
    got = sess.run(None, feed)
    with torch.no_grad():
        want = [t.float() for t in _flat_out(call(converted.eval(), ex))]
    errs = []
    for g, w in zip(got, want):
        g = torch.from_numpy(g).float()
        errs.append(float((g - w).abs().max() / max(float(w.abs().max()), 1e-12)))
    gathers = sum(n.op_type == "Gather" for n in __import__("onnx").load(path).graph.node)
    return {"onnx_inputs": [i.name for i in sess.get_inputs()], "onnx_outputs_compared": len(got),
            "onnx_outputs_expected": len(want), "onnx_max_rel_err": max(errs) if errs else None,
            "onnx_gathers": gathers, "onnx_verified_by_export": res.max_rel_err}


def measure(name: str, *, onnx: bool | None = None) -> dict[str, Any]:
    """Every number of one matrix row (see the module docstring); raises on a failed step."""
    case = CASES[name]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = case.build().eval()
    example = case.example(model)
    converted, rep = xsurgery.convert(model, compress=2, example_inputs=example, **case.convert_kwargs)
    converted.eval()
    with torch.no_grad():
        out = call(converted, xsurgery.models.normalize(example))
    outs = _flat_out(out)
    t = rep.totals
    ex = xsurgery.models.normalize(example)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the report on the same input as the counter below
        rep_math = xsurgery.report(converted, example_inputs=example).totals
    modules = dict(model.named_modules())
    before_ref = _dense_twin(converted) if case.data_dependent else model
    row: dict[str, Any] = {
        "name": name, "family": case.family, "model": case.model,
        "inputs": ", ".join(f"{d['name']} {d['shape']} {d['dtype']}" for d in describe(model, ex)),
        "output_dtypes": sorted({str(o.dtype).replace("torch.", "") for o in outs}),
        "outputs_finite": all(bool(torch.isfinite(o).all()) for o in outs if o.is_floating_point()),
        "converted_layers": t["converted_layers"],
        "layers_decided": sum(bool(r.converted or r.reason) for r in rep.layers),
        "not_converted": sorted({(r.reason or "").split(" (")[0] for r in rep.layers
                                 if not r.converted and r.reason}),
        "x_layer_kinds": sorted({type(m).__name__ for m in converted.modules() if isinstance(m, X_LAYERS)}),
        "converted_from": sorted({type(modules[r.name]).__name__ for r in rep.layers if r.converted}),
        "ties": sorted(sorted(g) for g in _ties(model)),
        "ties_kept": _ties(converted) == _ties(model),
        "params_before": t["params_before"], "params_after": t["params_after"],
        "params_model": _unique_params(model), "params_converted": _unique_params(converted),
        "macs_before": rep_math["macs_before"], "macs_after": rep_math["macs_after"],
        "macs_convert_report": t["macs_after"],
        "flop_counter_before": _flop_counter_macs(before_ref, ex),
        "flop_counter_after": _flop_counter_macs(_gather_twin(converted), ex),
        "macs_before_reference": "dense twin of the converted model" if case.data_dependent else "original model",
    }
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.xs")
        xsurgery.save(converted, path)
        row["checkpoint_bytes"] = os.path.getsize(path)
        torch.manual_seed(123)  # the fresh model's own weights differ from the checkpoint's
        fresh = case.build().eval()
        loaded = xsurgery.load(path, model=fresh).eval()
        sd_a, sd_b = converted.state_dict(), loaded.state_dict()
        row["load_ties_kept"] = _ties(loaded) == _ties(model)
        row["load_state_equal"] = list(sd_a) == list(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        with torch.no_grad():
            row["load_outputs_equal"] = _same(call(converted, ex), call(loaded, ex))
        if case.onnx if onnx is None else onnx:
            row.update(_onnx(converted, example, folder))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


# --------------------------------------------------------------------------- the page


def _h(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Coverage: which model families xsurgery converts",
        "",
        "Generated by `tools/coverage_matrix.py` from the measurements `tests/test_coverage.py` asserts",
        f"(one run: {meta['date']}, torch {meta['torch']}, transformers {meta['transformers']}). Every model is",
        "built offline with random weights from a tiny config (the families' layer kinds, not their sizes)",
        "and converted with `compress=2` and the default rules (stem and classifier dense) on the example",
        "shown. Do not edit the numbers by hand: re-run the tool.",
        "",
        "- **params**: all parameters, a tied tensor once; equal to `sum(p.numel() for p in model.parameters())`",
        "  of the original and of the converted model.",
        "- **MACs**: the report's, equal to `torch.utils.flop_counter.FlopCounterMode` on the same input",
        "  with attention in its math form (before: the original model; detection, whose proposal counts",
        "  depend on the weights: the converted model's dense twin; after: the converted model with every",
        "  X-layer in its gather execution).",
        "- **save/load**: `xsurgery.save` then `xsurgery.load(path, model=fresh_dense_model)`: state dict and",
        "  outputs bit-exact.",
        "- **ONNX**: `xsurgery.export_onnx(layout=\"gather\")`, then the file run in ONNX Runtime on the",
        "  example: max relative error against torch and the ONNX input names. The test asserts it for",
        f"  {', '.join(n for n, c in CASES.items() if c.onnx)}; the detection and segmentation exports",
        "  (tens of seconds each here) are run by the tool only.",
        "",
        "| family | model | example input | converted | params before -> after | MACs before -> after "
        "| = FlopCounter | save/load | ONNX (ORT rel. err) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flop_ok = r["macs_before"] == r["flop_counter_before"] and r["macs_after"] == r["flop_counter_after"]
        saved = "bit-exact" if r["load_state_equal"] and r["load_outputs_equal"] else "DIFFERS"
        onnx = f"{r['onnx_max_rel_err']:.1e} ({', '.join(r['onnx_inputs'])})" if "onnx_max_rel_err" in r else "-"
        kinds = ", ".join(r["x_layer_kinds"])
        lines.append(
            f"| {r['family']} | {r['model']} | {r['inputs']} | {r['converted_layers']} of {r['layers_decided']} "
            f"({kinds}) | {_h(r['params_before'])} -> {_h(r['params_after'])} | {_h(r['macs_before'])} -> "
            f"{_h(r['macs_after'])} | {'yes' if flop_ok else 'NO'} | {saved} | {onnx} |")
    lines += ["", "Layers kept dense, with the report's reasons:", ""]
    for r in rows:
        lines.append(f"- {r['name']}: {'; '.join(r['not_converted']) or 'none'}")
    lines += ["", "Exact counts are in `docs/coverage.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"cases to run (default all): {', '.join(CASES)}")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"), help="folder for coverage.md / coverage.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}")
    rows = []
    for n in names:
        row = measure(n, onnx=True)
        print(json.dumps({k: row[k] for k in ("name", "converted_layers", "params_before", "params_after",
                                              "macs_before", "macs_after", "seconds")}), flush=True)
        rows.append(row)
    if args.cases:
        return 0
    import transformers

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "transformers": transformers.__version__}
    from xsurgery._util.io import write_text

    write_text(os.path.join(args.out, "coverage.json"), json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n",
               force=True)
    write_text(os.path.join(args.out, "coverage.md"), render(rows, meta), force=True)
    print(f"wrote {args.out}/coverage.md and coverage.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
