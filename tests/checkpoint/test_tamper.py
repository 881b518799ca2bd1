"""Adversarial checkpoints: every edit is refused with one line and nothing a file names runs."""

import json
import os
import struct

import pytest
import torch

import xsurgery
from xsurgery.cli import main
from xsurgery.errors import UserError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tamper")
    model, _ = xsurgery.convert("digits_cnn", compress=2, input_size=(1, 16, 16))
    path = str(folder / "m.xs")
    xsurgery.save(model, path)
    return path


def _split(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return header, data[8 + n:]


def _write(path, header, body):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + body)


def _with_manifest(src, dst, edit):
    header, body = _split(src)
    manifest = json.loads(header["__metadata__"]["xsurgery"])
    edit(manifest)
    header["__metadata__"]["xsurgery"] = json.dumps(manifest)
    _write(dst, header, body)
    return dst


def _refused(path, match=None, **kw):
    with pytest.raises(UserError) as info:
        xsurgery.load(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg
    if match:
        assert match in msg, msg
    return msg


def test_bit_flip_in_every_tensor_is_named(ckpt, tmp_path):
    header, body = _split(ckpt)
    names = [k for k in header if k != "__metadata__"]
    assert any(k.endswith(".index") for k in names) and any(k.endswith("running_var") for k in names)
    for name in names:
        start, end = header[name]["data_offsets"]
        assert end > start
        itemsize = {"F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2}[header[name]["dtype"]]
        last = start + (end - start) // itemsize * itemsize - itemsize
        # the top byte of the first element (an exponent bit for floats, a high bit for ints),
        # and the lowest bit of the last one
        for pos, bit in ((start + itemsize - 1, 0x40), (last, 0x01)):
            flipped = bytearray(body)
            flipped[pos] ^= bit
            dst = str(tmp_path / "flip.xs")
            _write(dst, header, bytes(flipped))
            _refused(dst, f"tensor {name!r} does not match its sha256")


@pytest.mark.parametrize("source,kwargs", [
    ("os:system", {"command": "touch {marker}"}),
    ("subprocess:run", {"args": ["touch", "{marker}"]}),
    ("builtins:exec", {"source": "open({marker!r}, 'w').close()"}),
    ("os:remove", {"path": "{victim}"}),
])
def test_import_path_sources_never_run(ckpt, tmp_path, capsys, source, kwargs):
    marker = str(tmp_path / "marker")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    kw = json.loads(json.dumps(kwargs).replace("{marker}", marker).replace("{marker!r}", repr(marker))
                    .replace("{victim}", str(victim)))

    def edit(m):
        m["source"] = {"source": source, "model_kwargs": kw, "pretrained": False}

    bad = _with_manifest(ckpt, str(tmp_path / "src.xs"), edit)
    msg = _refused(bad, "trust_source=True")
    assert "--trust-source" in msg and "model=" in msg and source in msg
    for cmd in (["report", bad], ["export", bad, "-o", str(tmp_path / "x.onnx"), "--no-verify"],
                ["bench", bad, "--compress", "2", "--backends", "torch", "--repeat", "1"]):
        capsys.readouterr()
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("xsurgery: error:") and "trust" in err
    assert not os.path.exists(marker) and victim.read_text() == "keep"
    assert not os.path.exists(tmp_path / "x.onnx")


def test_trusted_import_path_source_loads(ckpt, tmp_path):
    def edit(m):
        m["source"] = {"source": "xsurgery.models.zoo:digits_cnn", "model_kwargs": {}, "pretrained": False}

    path = _with_manifest(ckpt, str(tmp_path / "ip.xs"), edit)
    _refused(path, "import path")
    model = xsurgery.load(path, trust_source=True)
    ref = xsurgery.load(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("name,edit,match", [
    ("plan path", lambda m, p: m["surgery"].__setitem__("plan", "/dev/zero"), "names a file"),
    ("self source", lambda m, p: m["source"].__setitem__("source", p), "never loads another file"),
    ("other ckpt", lambda m, p: m["source"].__setitem__("source", "other.safetensors"), "never loads another file"),
    ("unknown name", lambda m, p: m["source"].__setitem__("source", "no_such_model_xyz"), "not a torchvision"),
    ("unknown kwarg", lambda m, p: m["source"].__setitem__("model_kwargs", {"evil": 1}), "takes no keyword"),
    ("source int", lambda m, p: m["source"].__setitem__("source", 5), "source.source"),
    ("kwargs list", lambda m, p: m["source"].__setitem__("model_kwargs", [1]), "model_kwargs"),
    ("surgery str", lambda m, p: m.__setitem__("surgery", "x"), "surgery"),
    ("compress str", lambda m, p: m["surgery"].__setitem__("compress", "abc"), "compress"),
    ("layers int", lambda m, p: m["surgery"].__setitem__("layers", 5), "surgery"),
    ("huge input", lambda m, p: m.__setitem__("input_size", [1, 100000, 100000]), "input_size"),
    ("layers bad", lambda m, p: m.__setitem__("layers", [{"name": 1}]), "layers"),
    ("version", lambda m, p: m.__setitem__("format_version", 99), "unsupported checkpoint format"),
    ("deep", lambda m, p: m.__setitem__("extra", json.loads("[" * 50 + "]" * 50)), "nested deeper"),
    ("long string", lambda m, p: m.__setitem__("extra", {"a": "x" * 100000}), "characters"),
    ("many items", lambda m, p: m.__setitem__("extra", {"a": list(range(300000))}), "entries"),
    ("digest gone", lambda m, p: m.pop("weights"), "no weights digest"),
])
def test_manifest_edits_are_refused(ckpt, tmp_path, capsys, name, edit, match):
    dst = str(tmp_path / "edit.xs")
    _with_manifest(ckpt, dst, lambda m: edit(m, dst))
    _refused(dst, match)
    capsys.readouterr()
    assert main(["report", dst]) == 2  # the CLI: one line, exit 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xsurgery: error:") and match in err, err


def test_truncation_and_appended_bytes(ckpt, tmp_path):
    data = open(ckpt, "rb").read()
    dst = tmp_path / "cut.xs"
    for cut in (0, 4, 8, 100, len(data) // 2, len(data) - 1):
        dst.write_bytes(data[:cut])
        _refused(str(dst))
    dst.write_bytes(data + b"\x00" * 16)
    _refused(str(dst), "appended")
    header, body = _split(ckpt)
    dst.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])  # a header length far beyond the file
    _refused(str(dst), "header claims")


def test_nonfinite_weights_refused_unless_allowed(tmp_path):
    model, _ = xsurgery.convert("digits_cnn", compress=2, input_size=(1, 16, 16))
    name = next(n for n, p in model.named_parameters() if p.dim() > 1)
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = float("nan")
    path = str(tmp_path / "nan.xs")
    xsurgery.save(model, path)  # the digest matches: only the NaN check can catch it
    _refused(path, f"tensor {name!r} holds 1 NaN/inf")
    loaded = xsurgery.load(path, allow_nonfinite=True)
    assert torch.isnan(dict(loaded.named_parameters())[name]).any()
    assert main(["report", path]) == 2
    assert main(["report", path, "--allow-nonfinite"]) == 0
    assert main(["export", path, "-o", str(tmp_path / "nan.onnx"), "--layout", "gather"]) == 2
    assert not os.path.exists(tmp_path / "nan.onnx")
