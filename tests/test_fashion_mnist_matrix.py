"""tools/fashion_mnist_matrix.py: the runs it makes, the recipes they resolve to, its page."""

import importlib.util
import json
import os
import statistics
import sys

import numpy as np
import pytest

from xsurgery.layers import XConv2d
from xsurgery.train import build_model
from xsurgery.train._recipe import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("fashion_mnist_matrix", os.path.join(ROOT, "tools", "fashion_mnist_matrix.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_matrix_is_every_variant_compression_and_seed(tool):
    runs = tool.matrix()
    assert len(runs) == 60 and len({r.name for r in runs}) == 60
    assert len({r.config for r in runs}) == 20  # 4 x 3 + 1 MobileNet, 2 x 3 + 1 ResNet
    # seed by seed: a partial matrix has every configuration at the same number of seeds
    assert [r.seed for r in runs] == [0] * 20 + [1] * 20 + [2] * 20
    assert {r.compress for r in runs if r.net == "mobilenet"} == {None, 2, 4, 8, 16}
    assert {r.compress for r in runs if r.net == "resnet"} == {None, 2, 4}


@pytest.mark.parametrize("net,variant,compress,graph,mixing", [
    ("mobilenet", "grouped", 8, "grouped", 1), ("mobilenet", "x1", 8, "random", 1),
    ("mobilenet", "x2", 16, "random", 2), ("resnet", "x2", 4, "random", 2), ("resnet", "grouped", 2, "grouped", 1),
])
def test_runs_resolve_to_the_intended_recipe(tool, tmp_path, net, variant, compress, graph, mixing):
    run = tool.Run(net, variant, compress, 1)
    cmd = tool._command(run, str(tmp_path), "cpu")
    i = cmd.index("train")
    recipe_file, overrides = cmd[i + 1], [a for a in cmd[i + 2:] if "=" in a and not a.startswith("-")]
    assert cmd[cmd.index("--variant") + 1] == variant and "--force" in cmd  # nothing to resume yet
    r = load_recipe(recipe_file, overrides, variant=variant)
    assert (r.surgery.compress, r.surgery.graph, r.surgery.mixing, r.surgery.seed, r.seed) == (compress, graph, mixing, 1, 1)
    assert r.output_dir == os.path.join(str(tmp_path), run.name)
    dense = load_recipe(recipe_file, tool.Run(net, "dense", None, 1).overrides(str(tmp_path)), variant="dense")
    # one schedule for every variant: only the surgery and the output differ
    same = {k: v for k, v in r.to_dict().items() if k not in ("surgery", "output", "name")}
    assert same == {k: v for k, v in dense.to_dict().items() if k not in ("surgery", "output", "name")}
    assert dense.surgery is None


def test_mobilenet_converts_every_pointwise_conv_and_resnet_every_block_3x3(tool):
    m = build_model(load_recipe(os.path.join(ROOT, tool.NETS["mobilenet"][0]), ["surgery.compress=16"], variant="x2"))
    xs = [x for x in m.modules() if isinstance(x, XConv2d)]
    assert len(xs) == 5 and all(x.kernel_size == (1, 1) for x in xs)
    assert all(x.in_channels // x.degree == 16 for x in xs)
    # grouped 1x1 convs without shuffle are C towers: a last channel reaches 1/C of the first ones
    grouped = build_model(load_recipe(os.path.join(ROOT, tool.NETS["mobilenet"][0]), ["surgery.compress=4"],
                                      variant="grouped"))
    assert tool.reach(grouped) == 0.25 and tool.reach(m) == 1.0
    r = build_model(load_recipe(os.path.join(ROOT, tool.NETS["resnet"][0]), [], variant="grouped"))
    xs = [x for x in r.modules() if isinstance(x, XConv2d)]
    assert len(xs) == 6 and all(x.kernel_size == (3, 3) for x in xs)


def test_page_tables_and_plot(tool, tmp_path):
    runs = tool.matrix(seeds=(0, 1))
    out = tmp_path / "runs"
    rng = np.random.default_rng(0)
    accs = {}
    for run in runs[:-3]:  # three runs unfinished
        folder = out / run.name
        folder.mkdir(parents=True)
        acc = float(rng.uniform(0.8, 0.9))
        accs.setdefault(run.config, []).append(100 * acc)
        (folder / tool.RESULT).write_text(json.dumps({"test_top1": acc, "best_val_top1": acc + 0.01}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"images_per_s": s, "train_acc": 0.5}) + "\n"
                                                      for s in (100, 300, 200)))
    configs = tool.collect(runs, str(out))
    meas = {k: {"params": 1000 * (i + 1), "macs": 5000, "ort_ms": 1.0, "ort_ratio": 1.0, "layout": "-",
                "train_img_s": 500.0, "train_ratio": 1.0, "reach": None}
            for i, k in enumerate(configs)}
    text = tool.tables(configs, meas, len(runs), len(runs) - 3)
    assert "Partial: 37 of 40 runs finished" in text
    g = accs["mobilenet-grouped-c8"]
    row = next(line for line in text.splitlines() if line.startswith("| grouped (no shuffle) | 8 |"))
    assert f"{np.mean(g):.2f} ± {np.std(g, ddof=1):.2f}" in row and "| 200 (1.00) |" in row
    assert "| 50.00 ± 0.00 |" in row  # last epoch train accuracy
    x2, dense = statistics.mean(accs["mobilenet-x2-c8"]), statistics.mean(accs["mobilenet-dense"])
    diff_row = next(line for line in text.splitlines() if line.startswith("| 8 | "))
    assert f"{x2 - np.mean(g):+.2f}" in diff_row and f"{dense - x2:+.2f}" in diff_row
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nhand-written\n\n{tool.BEGIN}\nold\n{tool.END}\n\nafter\n")
    tool.write_page(str(page), text)
    new = page.read_text()
    assert new.startswith("# Title\n\nhand-written") and new.endswith("after\n") and "old" not in new
    assert "Partial: 37" in new
    png = tmp_path / "plot.png"
    tool.plot(configs, meas, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
