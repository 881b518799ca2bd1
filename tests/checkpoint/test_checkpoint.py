import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import xsurgery
from xsurgery.checkpoint import read_manifest, weights_digest
from xsurgery.errors import UserError


@pytest.fixture(scope="module")
def converted():
    model, _ = xsurgery.convert("resnet18", compress=4, mixing=2, input_size=32, model_kwargs={"num_classes": 7})
    return model.eval()


def test_round_trip_bit_exact(converted, tmp_path):
    path = str(tmp_path / "m.xs")
    manifest = xsurgery.save(converted, path)
    assert manifest["source"]["source"] == "resnet18" and manifest["source"]["model_kwargs"] == {"num_classes": 7}
    loaded = xsurgery.load(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
    for (n1, b1), (n2, b2) in zip(converted.named_buffers(), loaded.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2)
    m = read_manifest(path)
    assert m["surgery"]["compress"] == 4 and m["versions"]["torch"] == torch.__version__
    layer = m["layers"][0]
    assert {"name", "degree", "blocks", "graph", "seed", "index_hash"} <= set(layer)
    assert layer["index_hash"] == loaded.get_submodule(layer["name"]).graph.hash()


def test_same_command_twice_identical_files(tmp_path):
    a, b = str(tmp_path / "a.xs"), str(tmp_path / "b.xs")
    for p in (a, b):
        torch.manual_seed(123)
        m, _ = xsurgery.convert("resnet18", compress=2, seed=5, input_size=32)
        xsurgery.save(m, p)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_no_overwrite_without_force(converted, tmp_path):
    path = str(tmp_path / "m.xs")
    xsurgery.save(converted, path)
    mtime = os.path.getmtime(path)
    with pytest.raises(UserError, match="exists; pass --force"):
        xsurgery.save(converted, path)
    assert os.path.getmtime(path) == mtime
    xsurgery.save(converted, path, force=True)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_tampered_checkpoints_fail_clearly(converted, tmp_path):
    path = str(tmp_path / "m.xs")
    xsurgery.save(converted, path)
    tensors = load_file(path)
    meta = read_manifest(path)
    # an index that does not match the recorded graph hash (digest recomputed, so that the
    # graph check is what catches it)
    key = next(k for k in tensors if k.endswith(".index"))
    bad = dict(tensors)
    bad[key] = bad[key].flip(0).contiguous()
    meta = {**meta, "weights": weights_digest(bad)}
    save_file(bad, str(tmp_path / "idx.xs"), metadata={"xsurgery": json.dumps(meta)})
    with pytest.raises(UserError, match="do not match the manifest"):
        xsurgery.load(str(tmp_path / "idx.xs"))
    # weights of another shape
    bad = dict(tensors)
    bad["fc.weight"] = torch.zeros(3, 3)
    meta = {**meta, "weights": weights_digest(bad)}
    save_file(bad, str(tmp_path / "w.xs"), metadata={"xsurgery": json.dumps(meta)})
    with pytest.raises(UserError, match="weights do not match"):
        xsurgery.load(str(tmp_path / "w.xs"))
    # not a safetensors file / no manifest / missing file
    (tmp_path / "junk.xs").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="not an xsurgery checkpoint"):
        xsurgery.load(str(tmp_path / "junk.xs"))
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="no xsurgery manifest"):
        xsurgery.load(str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="does not exist"):
        xsurgery.load(str(tmp_path / "missing.xs"))


def test_dense_model_and_unsourced_model(tmp_path):
    from xsurgery.models import create_model

    dense = create_model("resnet18", {"num_classes": 3})
    path = str(tmp_path / "d.xs")
    xsurgery.save(dense, path)
    assert read_manifest(path)["surgery"] is None
    loaded = xsurgery.load(path)
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), loaded.state_dict().values()))
    # a model with no recorded source is saved as an object; loading it needs model=
    lin = torch.nn.Linear(2, 2)
    xsurgery.save(lin, str(tmp_path / "x.xs"))
    assert read_manifest(str(tmp_path / "x.xs"))["source"]["source"] == "object"
    again = xsurgery.load(str(tmp_path / "x.xs"), model=torch.nn.Linear(2, 2))
    assert torch.equal(again.weight, lin.weight) and torch.equal(again.bias, lin.bias)
