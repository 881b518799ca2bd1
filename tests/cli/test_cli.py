import json
import os
import subprocess
import sys

import pytest

from xsurgery.cli import main

SMALL = ["--input-size", "32", "--model-kwargs", '{"num_classes": 10}']
DIGITS = ["convert", "digits_cnn", "--input-size", "1", "16", "16"]
PLANS = {
    "regex": "- pattern: 're:[('\n  compress: 4\n",
    "compress0": "- pattern: 'features.*'\n  compress: 0\n",
    "mixing": "- pattern: 'features.*'\n  mixing: 2.5\n",
    "degree": "- pattern: 'features.*'\n  degree: 999\n",
    "skip": "- pattern: 'features.*'\n  skip: yes please\n",
}
TINY_MODELS = """
import torch.nn as nn


def net(width=24):
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(),
                         nn.Conv2d(width, width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
"""


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A digits checkpoint and an importable module of tiny models."""
    import xsurgery

    folder = tmp_path_factory.mktemp("cli")
    (folder / "tiny_cli_models.py").write_text(TINY_MODELS)
    model, _ = xsurgery.convert("digits_cnn", input_size=(1, 16, 16))
    ckpt = str(folder / "digits.xs")
    xsurgery.save(model, ckpt)
    return {"folder": str(folder), "ckpt": ckpt}


def test_convert_json_and_output(tmp_path, capsys):
    out = str(tmp_path / "r18.xs")
    assert main(["convert", "resnet18", "--compress", "2", *SMALL, "--json", "-o", out]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"model", "input_size", "totals", "layers"} <= set(data)
    assert set(data["totals"]) >= {"params_before", "params_after", "macs_before", "macs_after", "flops_before", "flops_after"}
    assert data["totals"]["flops_after"] == 2 * data["totals"]["macs_after"]
    assert os.path.exists(out)
    assert main(["report", out, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["totals"]["params_after"] == data["totals"]["params_after"]
    assert again["totals"]["macs_after"] == data["totals"]["macs_after"]


def test_convert_table_labels(capsys):
    assert main(["convert", "resnet18", "--compress", "4", "--mixing", "1", *SMALL]) == 0
    text = capsys.readouterr().out
    assert "MACs" in text and "FLOPs" in text and "params" in text


def test_plan_dry_run(capsys):
    assert main(["plan", "resnet18", "--compress", "2", "--layers", "pointwise", *SMALL[2:], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    conv = [r for r in data["layers"] if r["converted"]]
    assert conv and all(r["kind"] == "pointwise" for r in conv)
    assert main(["plan", "resnet18", "--compress", "2"]) == 0
    assert "would be converted" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["convert", "resnet5o"], "unknown model 'resnet5o'"),
        (["convert", "resnet18", "--compress", "0"], "--compress must be a number >= 1"),
        (["convert", "resnet18", "--compress", "-2"], "--compress must be a number >= 1"),
        (["convert", "resnet18", "--degree", "4096"], "larger than the input channels"),
        (["convert", "resnet18", "--include", "nope*"], "matches no conv/linear layer"),
        (["convert", "resnet18", "--model-kwargs", "{bad"], "--model-kwargs must be a JSON object"),
        (["report", "missing.xs"], "does not exist"),
        (["convert", "resnet18", "--graph", "hexagon"], "unknown --graph"),
        # issue 10: every mistake below was a traceback or a silent exit 0
        ([*DIGITS, "--include", "re:features.[("], "--include: 're:features.[(' is not a valid regular expression"),
        ([*DIGITS, "--exclude", "re:*"], "is not a valid regular expression"),
        ([*DIGITS, "--plan", "{tmp}/regex.yaml"], "plan rule 're:[(': 're:[(' is not a valid regular expression"),
        ([*DIGITS, "--plan", "{tmp}/compress0.yaml"], "plan rule 'features.*': compress must be a number >= 1"),
        ([*DIGITS, "--plan", "{tmp}/mixing.yaml"], "plan rule 'features.*': mixing must be a positive integer, got 2.5"),
        ([*DIGITS, "--plan", "{tmp}/degree.yaml"], "plan rule 'features.*': degree 999 is larger than the input"),
        ([*DIGITS, "--plan", "{tmp}/skip.yaml"], "plan rule 'features.*': skip must be true or false, got 'yes please'"),
        ([*DIGITS, "--plan", "/dev/zero"], "plan file /dev/zero is not a regular file"),
        (["convert", "tiny_cli_models:net", "--input-size", "3", "16", "16", "--graph", "cayley", "-o", "{tmp}/c.xs"],
         "the cayley graph needs power-of-two sizes"),
        (["convert", "tiny_cli_models:net", "--model-kwargs", '{"depth": 3}'], "rejected --model-kwargs {\"depth\": 3}"),
        (["convert", "tiny_cli_models:net", "--model-kwargs", '{"width": -3}'], "rejected --model-kwargs"),
        (["report", "{ckpt}", "--input-size", "3", "16", "16"], "expected input[1, 3, 16, 16] to have 1 channels"),
        (["report", "resnet18", "--input-size", "100000"], "is 120.0 GB; running a model on it needs"),
        ([*DIGITS[:2], "--input-size", "1", "100000", "100000"], "positive sizes of at most"),
        (["export", "{ckpt}", "-o", "{tmp}/s.onnx", "--static-batch", "100000000"], "[100000000, 1, 16, 16] is 102.4 GB"),
    ],
)
def test_user_errors_are_one_line(argv, match, capsys, tmp_path, monkeypatch, cli_files):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", cli_files["ckpt"]) for a in argv]
    for name, text in PLANS.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    monkeypatch.syspath_prepend(cli_files["folder"])
    with pytest.raises(SystemExit) if "--model-kwargs" in argv and "{bad" in argv else _nullcontext():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and err.startswith("xsurgery: error:"), err
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".xs", ".onnx")) or p.startswith(".tmp")]


def test_plan_values_checked_like_command_line_values():
    """The same bad value gives the same refusal from a plan rule and from the command line."""
    import xsurgery
    from xsurgery.errors import UserError

    for key, value, flag in (("compress", 0, "compress must be a number >= 1"),
                             ("compress", "2", "compress must be a number >= 1"),
                             ("degree", 0, "degree must be a positive integer"),
                             ("mixing", 2.5, "mixing must be a positive integer"),
                             ("graph", "nope", "unknown"), ):
        with pytest.raises(UserError, match=flag) as cli:
            xsurgery.convert("digits_cnn", input_size=(1, 16, 16), **{key: value})
        with pytest.raises(UserError, match=flag) as rule:
            xsurgery.convert("digits_cnn", input_size=(1, 16, 16), plan=[{"pattern": "features.*", key: value}])
        assert str(cli.value).startswith("--") or "--graph" in str(cli.value)
        assert str(rule.value).startswith("plan rule 'features.*': ")
    with pytest.raises(UserError, match="skip must be true or false"):
        xsurgery.convert("digits_cnn", plan=[{"pattern": "features.4", "skip": "no"}])
    with pytest.raises(UserError, match="compress or degree, not both"):
        xsurgery.convert("digits_cnn", plan=[{"pattern": "features.4", "compress": 2, "degree": 4}])
    # a valid rule still works, and a degree that fits one matched layer is accepted
    model, _ = xsurgery.convert("digits_cnn", input_size=(1, 16, 16), plan=[{"pattern": "features.*", "degree": 24}])
    assert {n: m.graph.degree for n, m in model.named_modules() if hasattr(m, "graph")} == {"features.7": 24,
                                                                                            "features.11": 24}


def test_same_command_twice_writes_identical_bytes(tmp_path):
    a, b, c = (str(tmp_path / f"{n}.xs") for n in "abc")
    for out in (a, b):
        assert main([*DIGITS, "-o", out]) == 0
    assert main([*DIGITS, "--seed", "1", "-o", c]) == 0
    assert open(a, "rb").read() == open(b, "rb").read()
    assert open(a, "rb").read() != open(c, "rb").read()  # the init follows --seed


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unreadable_checkpoint_and_existing_output_subprocess(tmp_path):
    junk = tmp_path / "junk.xs"
    junk.write_bytes(b"not a checkpoint")
    exe = [sys.executable, "-m", "xsurgery.cli"]
    r = subprocess.run([*exe, "report", str(junk)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not an xsurgery checkpoint" in r.stderr
    existing = tmp_path / "out.xs"
    existing.write_bytes(b"keep me")
    r = subprocess.run([*exe, "convert", "resnet18", *SMALL, "-o", str(existing)], capture_output=True, text=True)
    assert r.returncode == 2 and "exists; pass --force" in r.stderr and "Traceback" not in r.stderr
    assert existing.read_bytes() == b"keep me"
