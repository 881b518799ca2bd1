"""Example inputs (xsurgery/_inputs.py): specs, resolution, per-family defaults, the no-input
mode, and the output-structure check with its determinism rules and --no-check."""

import json
import os
import textwrap

import pytest
import torch
from torch import nn

import xsurgery
from xsurgery.errors import UserError
from xsurgery.models import (
    InputSpec,
    default_example,
    describe,
    first_error_line,
    from_description,
    input_names,
    parse_input_spec,
    resample,
    resolve,
)
from xsurgery.surgery import check_outputs


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.h = nn.Linear(16, 32), nn.Linear(8, 32), nn.Linear(32, 2)

    def forward(self, x, side):
        return self.h(torch.relu(self.a(x) + self.b(side)))


class Tokens(nn.Module):
    def __init__(self, vocab=30):
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(vocab, 16), nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, ids):
        return self.out(torch.relu(self.fc(self.emb(ids)))).mean(1)


# --------------------------------------------------------------------------- --input specs


@pytest.mark.parametrize("text, name, shape, dtype", [
    ("1x128:int64", None, (1, 128), torch.int64),
    ("attention_mask=1x128:int64", "attention_mask", (1, 128), torch.int64),
    ("8x40", None, (8, 40), None),
    ("8,3,32,32:bf16", None, (8, 3, 32, 32), torch.bfloat16),
    (" x=2x5:FLOAT64 ", "x", (2, 5), torch.float64),
])
def test_parse_input_spec(text, name, shape, dtype):
    assert parse_input_spec(text) == InputSpec(name, shape, dtype)


@pytest.mark.parametrize("text, match", [
    ("abc", r"use \[NAME=\]SHAPE\[:DTYPE\]"),
    ("1x0", "every size must be >= 1"),
    ("100000x100000x100", "at most"),
    ("1x8:complex", "unknown dtype 'complex'"),
    ("1=1x8", r"use \[NAME=\]SHAPE"),
    ("1x8:", r"use \[NAME=\]SHAPE"),
])
def test_parse_input_spec_errors_are_one_line(text, match):
    with pytest.raises(UserError, match=match) as err:
        parse_input_spec(text)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- resolve


def test_resolve_tensor_tuple_dict_and_args_kwargs():
    x, y = torch.randn(2, 16), torch.randn(2, 8)
    assert resolve(_mlp(), x)[0][0] is x and resolve(_mlp(), x)[1] == {}
    args, kwargs = resolve(Two(), (x, y))
    assert args[0] is x and args[1] is y and kwargs == {}
    args, kwargs = resolve(Two(), {"x": x, "side": y})
    assert args == () and kwargs["side"] is y
    args, kwargs = resolve(Two(), ((x,), {"side": y}))
    assert args[0] is x and kwargs["side"] is y
    with pytest.raises(UserError, match="argument names"):
        resolve(Two(), {0: x})
    with pytest.raises(UserError, match="a tensor, a tuple of inputs or a dict"):
        resolve(Two(), 3.5)
    with pytest.raises(UserError, match="not both"):
        resolve(_mlp(), x, input_size=40)


def test_resolve_specs_dtypes_and_order():
    model = Tokens(vocab=30)
    args, kwargs = resolve(model, ["4x9:int64"])
    ids = args[0]
    assert ids.dtype == torch.int64 and ids.shape == (4, 9) and 0 <= int(ids.min()) and int(ids.max()) < 30
    args, kwargs = resolve(Two(), ["2x16", "side=2x8"])
    assert args[0].dtype == torch.float32 and kwargs["side"].shape == (2, 8)
    _, kwargs = resolve(Two(), ["attention_mask=2x8:int64", "token_type_ids=2x8:int64"])
    assert bool((kwargs["attention_mask"] == 1).all()) and bool((kwargs["token_type_ids"] == 0).all())
    with pytest.raises(UserError, match="positional inputs come first"):
        resolve(Two(), ["x=2x16", "2x8"])
    with pytest.raises(UserError, match="given twice"):
        resolve(Two(), ["x=2x16", "x=2x16"])
    # a float spec takes the model's dtype: a float64 model gets float64 inputs
    args, _ = resolve(_mlp().double(), ["3x40"])
    assert args[0].dtype == torch.float64


def test_input_size_follows_the_first_layer():
    (x,), _ = resolve(_mlp(), input_size=40)
    assert x.shape == (1, 40) and x.dtype == torch.float32  # not [1, 3, 40, 40]
    with pytest.raises(UserError, match="must end in 40"):
        resolve(_mlp(), input_size=(3, 32, 32))
    (ids,), _ = resolve(Tokens(), input_size=12)
    assert ids.shape == (1, 12) and ids.dtype == torch.int64 and int(ids.max()) < 30
    with pytest.raises(UserError, match="sequence length"):
        resolve(Tokens(), input_size=(3, 12))
    c1 = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3))
    assert resolve(c1, input_size=100)[0][0].shape == (1, 4, 100)
    assert resolve(c1, input_size=(4, 50))[0][0].shape == (1, 4, 50)
    c3 = nn.Sequential(nn.Conv3d(3, 8, 3))
    assert resolve(c3, input_size=(4, 16, 16))[0][0].shape == (1, 3, 4, 16, 16)
    with pytest.raises(UserError, match="T H W or C T H W"):
        resolve(c3, input_size=(16, 16))
    c2 = nn.Sequential(nn.Conv2d(1, 8, 3))
    assert resolve(c2, input_size=28)[0][0].shape == (1, 1, 28, 28)  # the model's own channels
    bf = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert resolve(bf, input_size=8)[0][0].dtype == torch.bfloat16
    with pytest.raises(UserError, match="positive"):
        resolve(_mlp(), input_size=0)


# --------------------------------------------------------------------------- family defaults


def test_default_examples_per_family():
    import torchvision

    assert default_example(_mlp()) is None  # no known family: no guessed shape
    (x,), _ = default_example(torchvision.models.resnet18(num_classes=3))
    assert x.shape == (1, 3, 224, 224)
    (x,), _ = default_example(torchvision.models.inception_v3(weights=None, init_weights=False, aux_logits=False))
    assert x.shape == (1, 3, 299, 299)
    own = _mlp()
    own.default_input_size = (40,)
    assert default_example(own)[0][0].shape == (1, 40)
    (images,), _ = default_example(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3), batch=2)
    assert isinstance(images, list) and len(images) == 2 and images[0].shape == (3, 320, 320)
    (clip,), _ = default_example(torchvision.models.video.r3d_18(num_classes=2))
    assert clip.shape == (1, 3, 8, 112, 112)


def test_default_examples_hf():
    from xsurgery.models.hf import create_hf_model

    bert = create_hf_model("bert", {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                    "num_attention_heads": 2, "vocab_size": 50, "max_position_embeddings": 8})
    args, kw = default_example(bert, batch=3)
    assert args == () and set(kw) == {"input_ids", "attention_mask"}
    assert kw["input_ids"].shape == (3, 8)  # the default length 16, bounded by the config's positions
    assert kw["input_ids"].dtype == torch.int64 and int(kw["input_ids"].max()) < 50
    assert bool((kw["attention_mask"] == 1).all())
    t5 = create_hf_model("t5", {"num_layers": 1, "num_decoder_layers": 1, "d_model": 32, "d_ff": 64, "d_kv": 16,
                                "num_heads": 2, "vocab_size": 50})
    _, kw = default_example(t5)
    assert set(kw) == {"input_ids", "attention_mask", "decoder_input_ids"} and kw["input_ids"].shape == (1, 16)
    vit = create_hf_model("vit", {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                  "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "num_channels": 1})
    _, kw = default_example(vit)
    assert list(kw) == ["pixel_values"] and kw["pixel_values"].shape == (1, 1, 32, 32)
    # and the default drives convert: a token model converts with no input given
    _, rep = xsurgery.convert(bert, compress=2)
    assert rep.totals["macs_before"] > 0 and [d["name"] for d in rep.inputs] == ["input_ids", "attention_mask"]


# --------------------------------------------------------------------------- no input


def test_no_input_converts_by_structure_with_macs_null(capsys):
    model = _mlp()
    converted, rep = xsurgery.convert(model, compress=4, include_stem=True)  # the raw-input Linear too
    assert rep.totals["converted_layers"] == 2
    assert rep.totals["params_after"] == sum(p.numel() for p in converted.parameters())
    assert rep.totals["params_before"] == sum(p.numel() for p in model.parameters())
    t = json.loads(rep.to_json())["totals"]
    assert t["macs_before"] is None and t["macs_after"] is None and t["flops_after"] is None
    assert rep.inputs is None
    rep.render()
    assert "give an example input for MACs" in capsys.readouterr().out
    # given one, the same model has MACs, from its real shape: 3 x (64*40/4 + 64*64/4 + dense head 64*10)
    _, rep = xsurgery.convert(model, compress=4, example_inputs=torch.randn(3, 40), include_stem=True)
    assert rep.totals["macs_after"] == 3 * (64 * 10 + 64 * 16 + 64 * 10)
    _, rep = xsurgery.convert(model, compress=4, input_size=40, include_stem=True)
    assert rep.totals["macs_after"] == 64 * 10 + 64 * 16 + 64 * 10


def test_export_without_input_says_what_to_give(tmp_path):
    from xsurgery.export import export_onnx

    converted, _ = xsurgery.convert(_mlp(), compress=2)
    with pytest.raises(UserError, match="--input SHAPE"):
        export_onnx(converted, str(tmp_path / "m.onnx"), verbose=False)
    assert not os.listdir(tmp_path)


def test_failing_forward_carries_the_models_own_error():
    with pytest.raises(UserError) as err:
        xsurgery.convert(_mlp(), compress=2, example_inputs=torch.randn(2, 41))
    msg = str(err.value)
    assert "\n" not in msg and "[2, 41] float32" in msg and "mat1 and mat2 shapes cannot be multiplied" in msg
    assert first_error_line(ValueError("first\nsecond")) == "ValueError: first"
    assert first_error_line(KeyError()) == "KeyError"


# --------------------------------------------------------------------------- describing


def test_describe_round_trip_and_names():
    model = Two()
    ex = resolve(model, (torch.randn(2, 16), torch.randn(2, 8)))
    assert input_names(model, ex) == ["x", "side"]
    assert input_names(_mlp(), resolve(_mlp(), torch.randn(2, 40))) == ["input"]
    desc = describe(model, ex)
    assert [d["name"] for d in desc] == ["x", "side"] and all(d["positional"] for d in desc)
    again = from_description(model, json.loads(json.dumps(desc)))
    assert [t.shape for t in again[0]] == [(2, 16), (2, 8)]
    ids = {"input_ids": torch.randint(3, 9, (2, 5)), "mask": torch.ones(2, 5, dtype=torch.int64)}
    desc = describe(Tokens(), resolve(Tokens(), ids))
    assert desc[0]["high"] == int(ids["input_ids"].max()) + 1
    _, kw = from_description(Tokens(), desc)
    assert kw["input_ids"].dtype == torch.int64 and int(kw["input_ids"].max()) < desc[0]["high"]
    # a description is data: anything malformed gives no example, never a guess
    for bad in ("x", [], [{"name": "x", "shape": [2, -1], "dtype": "float32"}],
                [{"name": "x", "shape": [2], "dtype": "os.system"}], [{"name": 3, "shape": [2], "dtype": "int64"}],
                [{"name": "x", "shape": [1 << 20, 1 << 20], "dtype": "float32"}]):
        assert from_description(model, bad) is None


def test_resample_keeps_structure_dtypes_and_ranges():
    ex = ((torch.randn(2, 3), [torch.randn(3, 4)]), {"ids": torch.randint(5, 9, (2, 6)),
                                                      "mask": torch.ones(2, 6, dtype=torch.bool)})
    new = resample(ex, seed=3, shape_fn=lambda name, t: [2 * t.shape[0], *t.shape[1:]])
    (a, lst), kw = new
    assert a.shape == (4, 3) and isinstance(lst, list) and lst[0].shape == (6, 4) and not torch.equal(a[:2], ex[0][0])
    assert kw["ids"].shape == (4, 6) and 5 <= int(kw["ids"].min()) and int(kw["ids"].max()) <= 8
    assert kw["mask"].dtype == torch.bool and bool(kw["mask"].all())


# --------------------------------------------------------------------------- the check


class Returns(nn.Module):
    """A model whose output is whatever ``make(h)`` builds from a linear layer's output."""

    def __init__(self, make):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.make = make

    def forward(self, x):
        return self.make(self.fc(x), self)


def _check(make_a, make_b, x=None):
    torch.manual_seed(0)
    a, b = Returns(make_a), Returns(make_b)
    b.load_state_dict(a.state_dict())
    check_outputs(a, b, ((torch.randn(4, 8) if x is None else x,), {}))


def test_check_compares_structure():
    same = lambda h, m: {"logits": h, "aux": [h.sum(-1)]}  # noqa: E731
    _check(same, same)
    cases = [
        (lambda h, m: {"logits": h, "other": h}, "keys"),
        (lambda h, m: {"logits": h.double(), "aux": [h.sum(-1)]}, "dtype float64 instead of float32"),
        (lambda h, m: {"logits": h[None], "aux": [h.sum(-1)]}, "rank 3 instead of 2"),
        (lambda h, m: {"logits": h[:, :3], "aux": [h.sum(-1)]}, r"shape \[4, 3\] instead of \[4, 8\]"),
        (lambda h, m: {"logits": h, "aux": [h.sum(-1), h]}, "2 items instead of 1"),
        (lambda h, m: (h, h), "the original returns dict"),
    ]
    for make_b, match in cases:
        with pytest.raises(UserError, match=match) as err:
            _check(same, make_b)
        assert "--no-check" in str(err.value) and "\n" not in str(err.value)


def test_check_exact_shapes_only_where_deterministic():
    # the original's output size depends on the input values: compared by rank only
    _check(lambda h, m: h[h > 0], lambda h, m: h[h > 0.5])
    # instance lists (torchvision detection: list of dicts) are compared by rank only
    _check(lambda h, m: [{"boxes": h[h.sum(-1) > 0]}], lambda h, m: [{"boxes": h[:1]}])
    # but a rank change there still fails
    with pytest.raises(UserError, match="rank"):
        _check(lambda h, m: [{"boxes": h[h.sum(-1) > 0]}], lambda h, m: [{"boxes": h[:1, 0]}])
    # a deterministic size that changes fails
    with pytest.raises(UserError, match="shape"):
        _check(lambda h, m: h[:, :4], lambda h, m: h[:, :5])


def test_check_errors_name_the_model_error():
    def boom(h, m):
        raise RuntimeError("converted broke\nmore")

    with pytest.raises(UserError, match=r"converted model fails on the example input \(RuntimeError: converted broke\)"):
        _check(lambda h, m: h, boom)
    with pytest.raises(UserError, match="does not run on the example input .*RuntimeError: converted broke"):
        _check(boom, lambda h, m: h)


class WeightShaped(nn.Module):
    """Also returns a vector as long as its parameter count: the converted model's output
    differs in shape although nothing is wrong with it (what --no-check is for)."""

    def __init__(self):
        super().__init__()
        self.a, self.m, self.b = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        n = sum(p.numel() for p in self.parameters())
        return self.b(torch.relu(self.m(torch.relu(self.a(x))))), torch.zeros(n)


def test_convert_check_false_skips_the_check():
    with pytest.raises(UserError, match=r"output\[1\]: shape \[356\] instead of \[612\].*--no-check"):
        xsurgery.convert(WeightShaped(), compress=2, example_inputs=torch.randn(2, 16), include_stem=True)
    converted, rep = xsurgery.convert(WeightShaped(), compress=2, example_inputs=torch.randn(2, 16), check=False,
                                       include_stem=True)
    assert rep.totals["converted_layers"] == 2 and rep.totals["macs_after"] < rep.totals["macs_before"]


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's own file in the working directory (not on sys.path), as a new user has it."""
    (tmp_path / "mynets_inputs.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def mlp():
            return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b, self.h, self.o = nn.Linear(16, 32), nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 2)

            def forward(self, x, side):
                return self.o(torch.relu(self.h(self.a(x) + self.b(side))))

        def two():
            return Two()

        class WeightShaped(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.m, self.b = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

            def forward(self, x):
                n = sum(p.numel() for p in self.parameters())
                return self.b(torch.relu(self.m(torch.relu(self.a(x))))), torch.zeros(n)

        def weight_shaped():
            return WeightShaped()
    """))
    monkeypatch.chdir(tmp_path)
    yield "mynets_inputs"
    import sys

    sys.modules.pop("mynets_inputs", None)


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_cli_inputs(user_module, capsys):
    from xsurgery.cli import main

    assert main(["convert", f"{user_module}:mlp", "--compress", "4", "--input", "8x40", "--include-stem", "--json"]) == 0
    data = _json(capsys)
    assert data["inputs"] == [{"name": "input", "shape": [8, 40], "dtype": "float32", "positional": True}]
    assert data["totals"]["macs_after"] == 8 * (64 * 10 + 64 * 16 + 64 * 10)
    assert main(["convert", f"{user_module}:mlp", "--compress", "4", "--json"]) == 0
    assert _json(capsys)["totals"]["macs_after"] is None
    assert main(["convert", f"{user_module}:two", "--input", "2x16", "--input", "side=2x8", "--include-stem",
                 "--json"]) == 0
    data = _json(capsys)
    assert [d["name"] for d in data["inputs"]] == ["x", "side"] and data["totals"]["converted_layers"] == 3
    assert main(["report", f"{user_module}:two", "--input", "x=2x16", "--input", "side=2x8", "--json"]) == 0
    assert _json(capsys)["totals"]["macs_before"] == 2 * (16 * 32 + 8 * 32 + 32 * 32 + 32 * 2)


def test_cli_export_takes_input(user_module, capsys, tmp_path):
    from xsurgery.cli import main

    ckpt, onnx_path = str(tmp_path / "mlp.xs"), str(tmp_path / "mlp.onnx")
    assert main(["convert", f"{user_module}:mlp", "--compress", "4", "-o", ckpt, "--json"]) == 0  # no input
    capsys.readouterr()
    assert main(["export", ckpt, "--model", f"{user_module}:mlp", "-o", onnx_path, "--layout", "dense"]) == 2
    assert "--input SHAPE" in capsys.readouterr().err
    assert main(["export", ckpt, "--model", f"{user_module}:mlp", "--input", "3x40", "-o", onnx_path,
                 "--layout", "gather", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_names"] == ["input"] and data["max_rel_err"] < 1e-4 and os.path.exists(onnx_path)


def test_cli_no_check(user_module, capsys):
    from xsurgery.cli import main

    argv = ["convert", f"{user_module}:weight_shaped", "--input", "2x16", "--include-stem", "--json"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output[1]: shape" in err[0] and "--no-check" in err[0]
    assert main([*argv, "--no-check"]) == 0
    assert _json(capsys)["totals"]["converted_layers"] == 2


@pytest.mark.parametrize("extra, match", [
    (["--input", "2x41"], "does not run on the example input ([2, 41] float32): RuntimeError: mat1"),
    (["--input", "2x40:int64"], "int64"),
    (["--input-size", "3", "32", "32"], "must end in 40"),
    (["--input", "2x40", "--input-size", "40"], "not both"),
    (["--input", "x=2x40", "--input", "2x40"], "positional inputs come first"),
    (["--exclude", "0", "2", "4"], "0 of 3 layers converted"),
])
def test_cli_input_errors_one_line(user_module, capsys, extra, match):
    from xsurgery.cli import main

    assert main(["convert", f"{user_module}:mlp", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xsurgery: error:") and match in err[0], err


@pytest.mark.parametrize("spec", ["abc", "2x0", "2x40:complex"])
def test_cli_bad_input_spec_one_line(user_module, capsys, spec):
    from xsurgery.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["convert", f"{user_module}:mlp", "--input", spec])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xsurgery: error: argument --input")
