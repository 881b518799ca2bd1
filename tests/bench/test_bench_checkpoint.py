"""Issue 23: ``xsurgery bench`` takes a checkpoint, as its help says: the dense architecture
the checkpoint was converted from is the baseline its X variants are timed against."""

from __future__ import annotations

import json

import xsurgery
from xsurgery.cli import main


def test_bench_accepts_a_checkpoint(tmp_path, capsys):
    model, _ = xsurgery.convert("digits_cnn", compress=2, check=False)
    path = str(tmp_path / "d.xs")
    xsurgery.save(model, path)
    capsys.readouterr()
    code = main(["bench", path, "--compress", "2", "--backends", "torch", "--repeat", "1", "--warmup", "0",
                 "--json", "-"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["model"] == path and {r["variant"] for r in result["results"]} >= {"dense"}
