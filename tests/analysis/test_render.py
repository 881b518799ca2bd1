"""The report for people: any width, collapsing, formats, executed MACs, pictures."""

import csv
import io
import json
import re
import struct

import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from xsurgery import XConv1d, XConv2d, XLinear, convert
from xsurgery.analysis import LayerRow, Report, collapse_rows, human, report, report_csv, report_markdown
from xsurgery.cli import main


@pytest.fixture(scope="module")
def resnet50_report() -> Report:
    # a long model (54 counted layers) at a small input: collapsing and width matter here
    torch.manual_seed(0)
    # mixing 2: every layer keeps its graph, so same-shaped rows collapse into ranges
    _, rep = convert(torchvision.models.resnet50(weights=None), compress=2, mixing=2, input_size=(3, 32, 32),
                     check=False)
    return rep


def _render(rep: Report, width: int | None, *, terminal: bool = True, **kw) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width or 80, force_terminal=terminal, color_system=None)
    rep.render(console, width=None if terminal else width, **kw)
    return buf.getvalue()


def _table_names(text: str) -> list[str]:
    """First cell of every table line between the header rule and the blank line after it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("─")) + 1
    out = []
    for line in lines[start:]:
        if not line.strip():
            break
        out.append(line.split("  ")[0].strip())
    return out


def _expand(label: str) -> list[str]:
    """``layer3.[1-3,5].conv2`` -> the names it stands for."""
    m = re.fullmatch(r"(.*)\[([0-9,\-]+)\](.*)", label)
    if not m:
        return [label]
    nums: list[int] = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        nums += range(int(lo), int(hi or lo) + 1)
    return [f"{m.group(1)}{n}{m.group(3)}" for n in nums]


@pytest.mark.parametrize("width,terminal", [(60, True), (80, True), (120, True), (None, False)])
def test_every_converted_layer_named_in_full_at_any_width(resnet50_report, width, terminal):
    rep = resnet50_report
    text = _render(rep, width, terminal=terminal)
    assert "…" not in text
    shown = _table_names(text)
    named = {n for label in shown for n in _expand(label.split("  x")[0].strip())}
    # every layer (converted or not) is named in full, directly or inside a collapsed range
    assert {r.name for r in rep.layers} <= named
    for line in text.splitlines()[:len(shown) + 3]:
        if width and terminal:
            # lines fit the width unless one cell alone is wider (names are never cut)
            assert len(line) <= max(width, max(len(s) for s in shown) + 30)
    full = _render(rep, None, terminal=False, show_all=True)
    assert {r.name for r in rep.layers if r.converted} <= set(_table_names(full))
    assert "x5" not in full and "layer3.[1-5].conv1  x5" in text


def test_collapsing_never_hides_a_row_that_differs():
    def row(name, **kw):
        base = dict(kind="conv", converted=True, in_channels=64, out_channels=64, kernel=[3, 3], degree=32,
                    blocks=4, graph="random", params_before=100, params_after=50, macs_before=1000,
                    macs_after=500, calls=1, execution="gather", macs_executed=500)
        base.update(kw)
        return LayerRow(name=name, **base)

    rows = [row(f"stage.{i}.conv", spectral_gap=0.2 + i / 100) for i in range(6)]
    rows[3] = row("stage.3.conv", macs_after=499, macs_executed=499)  # differs in one shown value
    rows.append(row("stage.6.conv", execution="masked", macs_executed=1000))
    rows.append(row("other.0.conv", degree=16))
    groups = collapse_rows(rows)
    covered = [r for _, members in groups for r in members]
    assert sorted(id(r) for r in covered) == sorted(id(r) for r in rows)  # each row exactly once
    for label, members in groups:
        sig = {(m.kind, m.in_channels, m.degree, m.macs_after, m.execution, m.macs_executed) for m in members}
        assert len(sig) == 1, label
        assert {m.name for m in members} == set(_expand(label))
    labels = [label for label, _ in groups]
    assert "stage.[0-2,4-5].conv" in labels and "stage.3.conv" in labels and "stage.6.conv" in labels


def test_max_rows_and_all(resnet50_report):
    rep = resnet50_report
    assert len(_table_names(_render(rep, 120, show_all=True))) == len(rep.layers)
    cut = _render(rep, 120, max_rows=6)
    assert len(_table_names(cut)) == 6 and "more rows not shown" in cut
    few = Report(rep.model, rep.input_size, rep.layers[:10], rep.params_before, rep.params_after)
    assert len(_table_names(_render(few, 120))) == 10  # short models are never collapsed


def test_json_csv_markdown_and_table_totals_agree(resnet50_report):
    rep = resnet50_report
    d = json.loads(rep.to_json())
    t = d["totals"]
    assert t["macs_executed"] == sum(r["macs_executed"] for r in d["layers"])
    assert t["macs_after"] <= t["macs_executed"] <= t["macs_before"]
    text = _render(rep, 80)
    totals = {line.split()[0] if not line.startswith("exec") else "exec": line for line in text.splitlines()
              if re.match(r"^(params|MACs|exec MACs|FLOPs) ", line)}
    for label, b, a in (("params", "params_before", "params_after"), ("MACs", "macs_before", "macs_after"),
                        ("exec", "macs_before", "macs_executed"), ("FLOPs", "flops_before", "flops_after")):
        assert human(t[b], spaced=True) in totals[label] and human(t[a], spaced=True) in totals[label]
    rows = list(csv.DictReader(io.StringIO(report_csv(rep))))
    assert len(rows) == len(rep.layers)
    for key in ("params_after", "macs_before", "macs_after", "macs_executed"):
        assert sum(int(r[key]) for r in rows) == sum(row[key] for row in d["layers"])
    md = report_markdown(rep)
    assert human(t["params_after"], spaced=True) in md and md.count("\n|") > 10
    out = io.StringIO()
    rep.render(Console(file=out), fmt="json")
    assert json.loads(out.getvalue())["totals"] == t


def _mixed():
    torch.manual_seed(0)
    return nn.Sequential(
        XConv2d(16, 32, 3, padding=1, compress=4), nn.ReLU(), XConv2d(32, 32, 1, compress=2),
        nn.Flatten(2), XConv1d(32, 32, 3, compress=4), nn.Flatten(), nn.Linear(32 * 62, 64),
        XLinear(64, 32, compress=4),
    ).eval()


@pytest.mark.parametrize("execution", ["gather", "masked", "auto"])
def test_executed_macs_equal_flop_counter(execution):
    model = _mixed()
    for m in model.modules():
        if isinstance(m, (XConv1d, XConv2d, XLinear)):
            m.execution = execution
    x = torch.randn(2, 16, 8, 8)
    rep = report(model, example_inputs=x)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    assert rep.totals["macs_executed"] == fc.get_total_flops() // 2
    for name, m in model.named_modules():
        if isinstance(m, (XConv1d, XConv2d, XLinear)):
            row = next(r for r in rep.layers if r.name == name)
            assert row.execution == m.resolved_execution()
            assert row.executed_macs == (row.macs_before if row.execution == "masked" else row.macs_after)
    if execution == "masked":
        assert rep.totals["macs_executed"] == rep.totals["macs_before"] > rep.totals["macs_after"]
    if execution == "gather":
        assert rep.totals["macs_executed"] == rep.totals["macs_after"]


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("argv", [
    ["resnet18", "--input-size", "32"],
    ["vit_tiny_patch16_224", "--input-size", "32", "--model-kwargs", '{"img_size": 32, "depth": 2}'],
])
def test_plot_writes_a_png_for_a_cnn_and_a_vit(tmp_path, argv, capsys):
    png = tmp_path / "r.png"
    assert main(["convert", *argv, "--compress", "2", "--no-check", "--plot", str(png), "--quiet"]) == 0
    w, h = _png_size(png)
    assert 400 <= w <= 2000 and 400 <= h <= 1200 and 10_000 < png.stat().st_size < 1_000_000
    assert main(["convert", *argv, "--compress", "2", "--no-check", "--plot", str(png)]) == 2  # no --force
    assert "--force" in capsys.readouterr().err


def test_graph_command_layer_and_network(tmp_path, capsys):
    png = tmp_path / "g.png"
    base = ["graph", "resnet18", "--compress", "4", "--input-size", "32"]
    assert main([*base, "--layer", "layer2.0.conv1", "--plot", str(png), "--json", str(tmp_path / "g.json")]) == 0
    w, h = _png_size(png)
    assert w > 300 and h > 200
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["blocks"] * g["degree"] == sum(len(r) for r in g["index"])
    capsys.readouterr()
    assert main([*base, "--json"]) == 0
    path = json.loads(capsys.readouterr().out)["path"]
    # expanders reach every input within a few layers; the grouped baseline never mixes
    assert path[-1]["reach_min"] == path[0]["inputs"]
    assert all(r["grouped_mean"] == path[0]["degree"] for r in path if r["grouped_mean"] is not None)
    assert main([*base, "--layer", "nope"]) == 2


def test_formats_and_json_convention(tmp_path, capsys):
    base = ["report", "resnet18", "--input-size", "32"]
    assert main([*base, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["name"] for r in rows} >= {"conv1", "fc"}
    assert main([*base, "--format", "markdown"]) == 0
    assert "| layer |" in capsys.readouterr().out
    out = tmp_path / "r.json"
    assert main([*base, "--json", str(out), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert main([*base, "--json", str(out)]) == 2  # exists, no --force
    assert main([*base, "--json", str(out), "--force", "--quiet"]) == 0
    assert main(["plan", "resnet18", "--compress", "2", "--format", "csv"]) == 0
    assert "layer,kind" in capsys.readouterr().out


@pytest.mark.onnx
@pytest.mark.parametrize("layout", ["gather", "dense"])
def test_report_of_an_exported_onnx_file(tmp_path, layout, capsys):
    pytest.importorskip("onnxruntime")
    from xsurgery.export import export_onnx

    model = nn.Sequential(_mixed()[:3], nn.Flatten(), nn.Linear(32 * 64, 10)).eval()
    path = tmp_path / "m.onnx"
    x = torch.randn(1, 16, 8, 8)
    export_onnx(model, str(path), example_inputs=x, layout=layout, verbose=False, threads=1)
    assert main(["report", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    ref = report(model, example_inputs=x).to_dict()
    want = {r["name"]: r for r in ref["layers"]}
    for row in d["layers"]:
        r = want[row["name"]]
        for key in ("macs_before", "macs_after", "params_before", "params_after", "degree", "blocks"):
            assert row[key] == r[key], (row["name"], key)
        if r["converted"]:
            assert row["execution"] == ("masked" if layout == "dense" else "gather")
            assert row["macs_executed"] == (r["macs_before"] if layout == "dense" else r["macs_after"])
            assert row["spectral_gap"] == pytest.approx(r["spectral_gap"]) if layout == "gather" else True
    assert {r["name"] for r in d["layers"]} == set(want)
    assert d["totals"]["params_after"] == ref["totals"]["params_after"]
    assert main(["report", str(tmp_path / "missing.onnx")]) == 2


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_never_when_quiet(monkeypatch):
    from xsurgery._util import progress as _progress

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not _progress.enabled() and not _progress.Bar(3).active
    assert list(_progress.progress(range(3))) == [0, 1, 2]
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    assert _progress.enabled()
    with _progress.Bar(2, desc="steps") as bar:
        assert bar.active
        bar.update(2, info="loss 0.1")
    assert not _progress.enabled(quiet=True)
    _progress.set_quiet(True)
    try:
        assert not _progress.enabled() and not _progress.Bar(2).active
    finally:
        _progress.set_quiet(False)


def test_every_command_takes_quiet_and_the_same_json_option():
    from xsurgery.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"convert", "plan", "report", "graph", "export", "bench", "train"} <= set(sub.choices)
    for name, p in sub.choices.items():
        opts = {o: a for a in p._actions for o in a.option_strings}
        assert "--quiet" in opts, name
        if "--json" in opts and name != "train":
            assert opts["--json"].nargs == "?" and opts["--json"].const == "-", name
        if name in ("convert", "plan", "report", "graph", "bench"):
            # convert's --format hf also writes -o as a Hugging Face folder (issue 25)
            extra = {"hf"} if name == "convert" else set()
            assert set(opts["--format"].choices) == {"table", "markdown", "csv", "json"} | extra, name


@pytest.mark.onnx
def test_export_json_file_like_every_command(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out, js = tmp_path / "m.onnx", tmp_path / "m.json"
    argv = ["export", "resnet18", "--input-size", "32", "--layout", "gather", "--no-verify", "-o", str(out)]
    assert main([*argv, "--json", str(js), "--quiet"]) == 0
    assert json.loads(js.read_text())["layout"] == "gather" and capsys.readouterr().out == ""
    assert main([*argv, "--force", "--json", str(js), "--quiet"]) == 0  # --force covers both files
    assert main([*argv[:-2], "-o", str(tmp_path / "n.onnx"), "--json", str(js)]) == 2  # JSON exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(out)


def test_a_note_explains_gap_0_at_mixing_1():
    net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 1))  # stem, 2 convs, head
    texts = {}
    for mixing in (1, 2):
        _, rep = convert(net, compress=4, mixing=mixing, input_size=(16, 8, 8), check=False)
        assert all((r.spectral_gap == 0) == (mixing == 1) for r in rep.layers if r.converted)
        texts[mixing] = " ".join(_render(rep, 80).split())  # the note wraps: compare on single spaces
    assert "gap 0 at mixing 1: a layer alone does not mix its blocks" in texts[1]
    assert "gap 0 at mixing 1" not in texts[2]
