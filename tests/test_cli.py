import json
import os
import subprocess
import sys

import pytest

from xsurgery.cli import main

SMALL = ["--input-size", "32", "--model-kwargs", '{"num_classes": 10}']


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
    ],
)
def test_user_errors_are_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) if "--model-kwargs" in argv else _nullcontext():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and err.startswith("xsurgery: error:")


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
