"""Local weights (--weights / weights=): safetensors, dense .xs, torch files of tensors only; never code."""

import builtins
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import xsurgery
from xsurgery.cli import main
from xsurgery.errors import UserError
from xsurgery.models import create_model, load_weights


def _net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


class _Marker:
    """Unpickling this would create the marker file: it must never happen."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, how, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    payload = {"0.weight": torch.zeros(8, 1, 3, 3), "hook": _Marker(str(marker))}
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(UserError, match="refused without running it") as exc:
        load_weights(_net(), str(evil))
    assert how == "pickle" or "could run code" in str(exc.value)
    assert not marker.exists()
    # the command line: one line, exit 2, still nothing run
    assert main(["convert", "digits_cnn", "--weights", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused without running it" in err
    assert not marker.exists()


def test_mismatched_keys_and_shapes_are_named(tmp_path):
    sd = _net().state_dict()
    bad = dict(sd)
    bad.pop("0.weight")
    bad.pop("0.bias")
    bad["extra.weight"] = torch.zeros(2)
    save_file(bad, tmp_path / "keys.safetensors")
    with pytest.raises(UserError) as exc:
        load_weights(_net(), str(tmp_path / "keys.safetensors"))
    msg = str(exc.value)
    assert "missing 0.weight, 0.bias" in msg and "unexpected extra.weight" in msg and "\n" not in msg
    shaped = dict(sd)
    shaped["7.weight"] = torch.zeros(5, 8)
    save_file(shaped, tmp_path / "shape.safetensors")
    with pytest.raises(UserError, match=r"shape of 7.weight: file \[5, 8\], model \[3, 8\]"):
        load_weights(_net(), str(tmp_path / "shape.safetensors"))
    many = {f"w{i}": torch.zeros(1) for i in range(10)}
    save_file(many, tmp_path / "many.safetensors")
    with pytest.raises(UserError, match=r"unexpected w0, w1, w2 and 7 more"):
        load_weights(_net(), str(tmp_path / "many.safetensors"))


def test_safetensors_torch_files_and_wrappers_load_exactly(tmp_path):
    src = _net()
    for p in src.parameters():
        p.data.normal_()
    sd = src.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("w.safetensors", "w.pt", "wrapped.pth"):
        got = load_weights(_net(), str(tmp_path / name)).state_dict()
        assert all(torch.equal(got[k], sd[k]) for k in sd), name


def test_dense_checkpoint_is_accepted_and_a_converted_one_refused(tmp_path):
    dense = create_model("digits_cnn", {"num_classes": 10, "width": 8, "input_size": 16})
    xsurgery.save(dense, str(tmp_path / "dense.xs"))
    got = create_model("digits_cnn", {"num_classes": 10, "width": 8, "input_size": 16},
                       weights=str(tmp_path / "dense.xs"))
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), dense.state_dict().values()))
    sparse, _ = xsurgery.convert(dense, compress=2, input_size=16)
    xsurgery.save(sparse, str(tmp_path / "sparse.xs"))
    with pytest.raises(UserError, match="converted .sparse. xsurgery checkpoint"):
        load_weights(dense, str(tmp_path / "sparse.xs"))
    with pytest.raises(UserError, match="not both"):
        create_model("digits_cnn", pretrained=True, weights=str(tmp_path / "dense.xs"))
    for bad, what in ((tmp_path / "missing.pt", "cannot read"), (tmp_path, "not a regular file")):
        with pytest.raises(UserError, match=what):
            load_weights(dense, str(bad))
    (tmp_path / "junk.bin").write_bytes(os.urandom(64))
    with pytest.raises(UserError, match="neither safetensors nor a torch file|not a file of tensors only"):
        load_weights(dense, str(tmp_path / "junk.bin"))


def test_convert_loads_weights_before_the_surgery(tmp_path, capsys):
    src = _net()
    for p in src.parameters():
        p.data.normal_()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    fresh = _net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    sparse, _ = xsurgery.convert(fresh, compress=2, init="keep", weights=str(tmp_path / "w.safetensors"),
                                 example_inputs=torch.randn(2, 1, 8, 8))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # the input is not modified
    x = sparse[3]
    idx = x.index.view(x.blocks, x.degree)
    per = x.out_features // x.blocks
    for g in range(x.blocks):  # keep copied the file's weights of the kept connections
        torch.testing.assert_close(x.weight[g * per:(g + 1) * per], src[3].weight[g * per:(g + 1) * per][:, idx[g]])
    assert torch.equal(sparse[0].weight, src[0].weight)  # the stem stays dense, with the file's weights
    # the CLI: --weights, -o
    out = tmp_path / "x.xs"
    assert main(["convert", "digits_cnn", "--model-kwargs", '{"width": 8}', "--weights",
                 str(tmp_path / "w.safetensors"), "-o", str(out)]) == 2
    assert "do not match the model" in capsys.readouterr().err and not out.exists()
