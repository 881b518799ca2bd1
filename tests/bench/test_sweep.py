"""``xsurgery sweep``: variants, the Pareto front, an end-to-end tiny sweep, resuming."""

import json
import math
import os
import subprocess
import sys

import pytest

from xsurgery.bench import pareto_front, plan_sweep, sweep
from xsurgery.bench._frontier import still_rising
from xsurgery.errors import UserError
from xsurgery.train import load_recipe, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "recipes", "digits.yaml")


def test_pareto_front_matches_a_hand_made_table():
    # (cost, top-1): lower cost and higher top-1 win
    table = [
        ((1.00, 90.0), True),   # the most accurate
        ((0.50, 85.0), True),   # cheaper, less accurate: a trade-off
        ((0.60, 84.0), False),  # dominated by (0.50, 85)
        ((0.50, 85.0), True),   # a tie with a front point is not dominated
        ((0.30, 70.0), True),   # the cheapest
        ((0.30, 60.0), False),  # same cost, worse
        ((1.20, 90.0), False),  # as accurate as the first, dearer
        ((math.nan, 99.0), False),  # not measured: never on the front
    ]
    assert pareto_front([p for p, _ in table]) == [on for _, on in table]


def test_still_rising_reads_the_end_of_the_curve():
    flat = [0.50, 0.70, 0.80, 0.84, 0.850, 0.851, 0.852, 0.853]  # the last two gain 0.2 points
    rising = [0.50, 0.70, 0.80, 0.84, 0.850, 0.855, 0.860, 0.866]  # 1.1 points
    assert not still_rising(flat) and still_rising(rising)
    assert still_rising([0.5, 0.6]) and not still_rising([0.6]) and not still_rising([0.6, 0.6, 0.59])


def test_variants_resolve_to_recipe_overrides(tmp_path):
    runs = plan_sweep(DIGITS, ["dense", "dense@0.5", "x@4:mixing=1,mix_points=chain", "grouped@2"], [0, 1],
                      ["epochs=1"], str(tmp_path))
    assert len(runs) == 8 and {r.seed for r in runs} == {0, 1}
    by = {r.variant.name: r.recipe for r in runs if r.seed == 0}
    assert by["dense"]["surgery"] is None
    assert by["dense@0.5"]["surgery"] is None and by["dense@0.5"]["model"]["kwargs"]["width"] == 8  # 16 * 0.5
    x = by["x@4:mixing=1,mix_points=chain"]["surgery"]
    assert (x["compress"], x["mixing"], x["mix_points"]) == (4.0, 1, "chain")
    assert by["grouped@2"]["surgery"]["graph"] == "grouped" and by["grouped@2"]["epochs"] == 1
    assert len({r.folder for r in runs}) == 8  # every run its own folder
    for bad, match in (("x@0.5", "compression"), ("nosuch", "unknown variant"), ("x@2:speed=9", "not one of")):
        with pytest.raises(UserError, match=match):
            plan_sweep(DIGITS, [bad], [0], [], str(tmp_path))


def test_wide_x_is_converted_back_to_the_dense_macs(tmp_path):
    from xsurgery.analysis import report
    from xsurgery.train import Recipe, build_model

    (run,) = plan_sweep(DIGITS, ["wide-x@2"], [0], [], str(tmp_path))
    assert run.recipe["model"]["kwargs"]["width"] == 32
    dense = build_model(load_recipe(DIGITS, variant="dense"))
    wide = build_model(Recipe.from_dict(run.recipe))
    size = (1, 16, 16)
    macs = report(dense, input_size=size).totals["macs_after"]
    got = report(wide, input_size=size).totals["macs_after"]
    assert abs(got - macs) / macs <= 0.05  # the nearest degree step of a tiny net (the budget's 2% where it can)


def test_tiny_sweep_end_to_end_then_resume_skips_finished_runs(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "xsurgery.cli", "sweep", DIGITS, "--variants", "dense", "x@2", "--seeds", "0",
           "epochs=1", "-o", str(out)]
    # --batch takes several values and the key=value overrides may follow it
    proc = subprocess.run(cmd[:10] + ["--batch", "1", "4"] + cmd[10:], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "dense/s0 done" in proc.stderr and "x@2/s0 done" in proc.stderr
    page = (out / "README.md").read_text()
    for name in ("top1_vs_latency.png", "top1_vs_macs.png", "top1_vs_params.png", "curves.png"):
        assert (out / name).stat().st_size > 1000 and f"]({name})" in page
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["variants"]}
    assert set(rows) == {"dense", "x@2"} and rows["dense"]["latency"] == 1.0
    assert math.isfinite(rows["x@2"]["latency"]) and rows["x@2"]["latency"] > 0  # measured, not judged here
    assert rows["x@2"]["latency_by_batch"]["1"] == rows["x@2"]["latency"] and rows["dense"]["latency_by_batch"]["4"] == 1
    assert summary["meta"]["batches"] == [1, 4] and "| batch 4 |" in page
    assert rows["x@2"]["macs"] < rows["dense"]["macs"]
    per_run = json.loads((out / "results" / "x_2-s0.json").read_text())
    result = json.loads((out / "runs" / "x_2" / "s0" / "result.json").read_text())
    assert per_run["test_top1"] == result["test_top1"]
    assert f"| x@2 | {100 * result['test_top1']:.2f} ± 0.00 |" in page
    # a second sweep reuses both finished runs (no training) and only trains the new variant
    stamp = os.path.getmtime(out / "runs" / "dense" / "s0" / "result.json")
    proc = subprocess.run(cmd[:7] + ["grouped@2"] + cmd[7:] + ["--runtime", "none"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "2 of 3 runs already finished (skipped)" in proc.stderr
    assert "dense/s0 done" not in proc.stderr and "grouped@2/s0 done" in proc.stderr
    assert os.path.getmtime(out / "runs" / "dense" / "s0" / "result.json") == stamp
    # a finished run of another recipe is refused, not silently reused
    proc = subprocess.run(cmd[:-3] + ["epochs=2", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "epochs differ" in proc.stderr and "Traceback" not in proc.stderr


def test_an_interrupted_run_is_resumed(tmp_path):
    out = str(tmp_path / "sweep")
    (run,) = plan_sweep(DIGITS, ["x@2"], [0], ["epochs=2"], out)
    from xsurgery.train import Recipe

    train(Recipe.from_dict(run.recipe), stop_after_epoch=1, quiet=True)  # as if killed after epoch 1
    assert not run.done
    result = sweep(DIGITS, ["x@2"], seeds=[0], overrides=["epochs=2"], out=out, runtime=None, log=lambda _: None)
    assert run.done and result["runs"][0]["epochs"] == 2
    with open(os.path.join(run.folder, "metrics.jsonl"), encoding="utf-8") as f:
        epochs = [json.loads(line)["epoch"] for line in f if line.strip()]
    assert epochs == [1, 2]  # epoch 1 was not trained again


def test_a_tp_run_trains_once_its_dense_run_has_finished(tmp_path):
    out = str(tmp_path / "sweep")
    lines: list[str] = []
    result = sweep(DIGITS, ["dense", "tp@2:epochs=1"], seeds=[0], overrides=["epochs=1"], out=out, runtime=None,
                   log=lines.append)
    assert not result["meta"]["failures"]
    done = [line for line in lines if " done in " in line]
    assert [line.split()[1] for line in done] == ["dense/s0", "tp@2:epochs=1/s0"]  # dense first, tp after it
    by = {r["variant"]: r for r in result["runs"]}
    assert by["tp@2:epochs=1"]["macs"] < by["dense"]["macs"]


def test_a_run_killed_before_its_first_epoch_starts_over(tmp_path):
    out = str(tmp_path / "sweep")
    (run,) = plan_sweep(DIGITS, ["x@2"], [0], ["epochs=1"], out)
    os.makedirs(run.folder)
    with open(os.path.join(run.folder, "recipe.yaml"), "w") as f:  # what a kill during epoch 1 leaves
        f.write("name: x\n")
    result = sweep(DIGITS, ["x@2"], seeds=[0], overrides=["epochs=1"], out=out, runtime=None, log=lambda _: None)
    assert run.done and not result["meta"]["failures"]


def test_an_interrupted_sweep_stops_its_trainings_and_starts_no_more(tmp_path):
    import signal
    import time

    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "xsurgery.cli", "sweep", DIGITS, "--variants", "dense", "x@2",
                             "grouped@2", "--runtime", "none", "epochs=50", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "runs" / "dense" / "s0" / "metrics.jsonl").exists():  # the first training is under way
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err

    def trainings() -> list[str]:
        found = []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "xsurgery.cli train" in cmd and str(out) in cmd:
                found.append(cmd)
        return found

    for _ in range(50):  # the training child ends with its parent's signal, within seconds
        if not trainings():
            break
        time.sleep(0.2)
    assert not trainings()
    assert not (out / "runs" / "x_2").exists() and not (out / "runs" / "grouped_2").exists()  # none started after


def test_the_defaults_rule_reads_gaps_off_the_latency_front():
    import importlib.util

    spec = importlib.util.spec_from_file_location("frontier_page", os.path.join(ROOT, "tools", "frontier_page.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rows = [  # latency ratio, top-1; the front: dense (1.0, 92), thin (0.5, 90), tiny (0.25, 85)
        {"variant": "dense", "latency": 1.0, "top1": 92.0, "front_latency": True},
        {"variant": "thin", "latency": 0.5, "top1": 90.0, "front_latency": True},
        {"variant": "tiny", "latency": 0.25, "top1": 85.0, "front_latency": True},
        {"variant": "x@4", "latency": 0.75, "top1": 90.5, "front_latency": False},  # front there: 91.0
        {"variant": "x@4:mixing=1", "latency": 0.2, "top1": 84.0, "front_latency": False},  # below the cheapest: 85
        {"variant": "slow", "latency": 1.5, "top1": 91.0, "front_latency": False},  # above the dearest: 92
        {"variant": "untimed", "latency": None, "top1": 99.0, "front_latency": False},
    ]
    g = tool.gaps(rows)
    assert g["dense"] == g["thin"] == g["tiny"] == 0.0
    assert g["x@4"] == pytest.approx(0.5) and g["x@4:mixing=1"] == pytest.approx(1.0) and g["slow"] == pytest.approx(1.0)
    assert "untimed" not in g and tool.gaps([dict(r, latency=None) for r in rows]) == {}
    # the rule's choice: smallest mean gap; within 0.1 of it the lower mean latency wins
    a, b, c, d = tool.CANDIDATES
    nets = {n: [{"variant": v, "latency": lat} for v, lat in ((a, 0.9), (b, 0.5), (c, 0.6), (d, 0.8))]
            for n in ("n1", "n2")}
    per_net = {"n1": {a: 0.0, b: 0.4, c: 0.2, d: 0.1}, "n2": {a: 0.2, b: 0.4, c: 0.1, d: 0.0}}
    # mean gaps a 0.1, b 0.4, c 0.15, d 0.05: a and c are within 0.1 of d; c has the lowest latency
    assert tool.pick(per_net, nets) == c
    per_net["n1"][c] = 0.5  # c's mean 0.3 is out of the tie: d (0.05) against a (0.1, slower)
    assert tool.pick(per_net, nets) == d
    del per_net["n2"][d]  # a candidate not measured on every net: no choice yet
    assert tool.pick(per_net, nets) is None
    # several timing runs: the median latency per variant, the front marked anew on it
    def run(lat: float) -> list[dict]:
        return [{"variant": "dense", "latency": 1.0, "top1": 92.0}, {"variant": "x", "latency": lat, "top1": 91.0},
                {"variant": "thin", "latency": 0.6, "top1": 91.0},
                {"variant": "u", "latency": None, "top1": 99.0, "accuracy_only": True}]

    med = {r["variant"]: r for r in tool.median_latency([run(0.5), run(0.7), run(0.55)])}
    assert med["x"]["latency"] == pytest.approx(0.55) and med["x"]["front_latency"]  # 0.55 < thin's 0.6
    assert not med["thin"]["front_latency"] and med["dense"]["front_latency"] and not med["u"]["front_latency"]
    med = {r["variant"]: r for r in tool.median_latency([run(0.5), run(0.7), run(0.65)])}
    assert med["x"]["latency"] == pytest.approx(0.65) and not med["x"]["front_latency"] and med["thin"]["front_latency"]


def test_tp_and_unstructured_variants_plan_from_the_dense_run(tmp_path):
    from xsurgery.analysis import report
    from xsurgery.train import Recipe, build_model

    with pytest.raises(UserError, match="add dense@1"):
        plan_sweep(DIGITS, ["tp@4"], [0], [], str(tmp_path))
    runs = plan_sweep(DIGITS, ["dense", "x@4", "tp@4:epochs=2", "unstructured@4"], [0, 1], ["epochs=8"],
                      str(tmp_path))
    by = {(r.variant.name, r.seed): r for r in runs}
    tp = by[("tp@4:epochs=2", 1)]
    assert tp.recipe["surgery"] is None and tp.recipe["epochs"] == 2
    assert tp.needs == by[("dense", 1)].folder and tp.recipe["model"]["weights"].startswith(tp.needs)
    assert tp.recipe["optim"]["lr"] == pytest.approx(0.05 / 10)  # a tenth of the recipe's rate
    x_macs = report(build_model(Recipe.from_dict(by[("x@4", 0)].recipe)), input_size=(1, 16, 16)).totals["macs_after"]
    assert tp.recipe["prune"]["target_macs"] == x_macs
    assert by[("tp@4:epochs=2", 0)].recipe["model"]["weights"] != tp.recipe["model"]["weights"]  # per seed
    un = by[("unstructured@4", 0)]
    assert un.variant.accuracy_only and un.recipe["unstructured"] is True and un.recipe["surgery"]["compress"] == 4.0
    with pytest.raises(UserError, match="not one of"):
        plan_sweep(DIGITS, ["dense", "tp@4:mixing=2"], [0], [], str(tmp_path))


def test_an_accuracy_only_row_is_on_no_front():
    from xsurgery.bench._frontier import summarize

    base = {"seed": 0, "test_top1": 0.5, "params": 10, "macs": 10, "curve": []}
    rows = summarize([{**base, "variant": "dense", "test_top1": 0.9, "params": 100, "macs": 100},
                      {**base, "variant": "unstructured@4", "test_top1": 0.95, "params": 25, "macs": math.nan,
                       "accuracy_only": True}], {"dense": 1.0})
    assert [r["front_params"] for r in rows] == [True, False] and [r["front_latency"] for r in rows] == [True, False]


def test_extra_finished_seeds_in_the_folder_are_included(tmp_path):
    from xsurgery.train import RESULT

    runs = plan_sweep(DIGITS, ["dense"], [0], [], str(tmp_path))
    other = os.path.join(os.path.dirname(runs[0].folder), "s7")
    os.makedirs(other)
    assert [r.seed for r in plan_sweep(DIGITS, ["dense"], [0], [], str(tmp_path))] == [0]  # not finished: not a run
    with open(os.path.join(other, RESULT), "w") as f:
        f.write("{}")
    assert [r.seed for r in plan_sweep(DIGITS, ["dense"], [0], [], str(tmp_path))] == [0, 7]
