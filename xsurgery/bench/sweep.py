"""``xsurgery sweep``: train variants of one recipe, measure them, and rank them on a frontier.

Phases: plan the runs (variant x seed, each a resolved recipe under ``OUT/runs/``) -> train
the ones not finished (``xsurgery train`` subprocesses, ``jobs`` at a time, resumable) ->
count and export each run's ``best.xs`` -> time every file as a ratio to dense in one
interleaved run -> write one JSON per run, ``summary.json``, ``README.md`` and the plots.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UserError
from ._frontier import summarize, sweep_page, sweep_plots
from ._sweep_measure import measure_runs
from ._sweep_runs import SweepRun, finished, slug
from ._sweep_train import train_runs
from ._variants import Variant, parse_variant

__all__ = ["SweepRun", "check_finished", "json_ready", "plan_sweep", "sweep", "train_runs"]


def _macs(recipe: dict[str, Any]) -> int:
    """MACs of the model a recipe dict builds, at its input size (a budget: ``wide-x``, ``tp``)."""
    from ..analysis import report
    from ..train import Recipe, build_model

    model = build_model(Recipe.from_dict(recipe))
    return int(report(model, input_size=tuple(recipe["data"]["input_size"])).totals["macs_after"])


def _iso_mac_compress(recipe: dict[str, Any], target: int) -> float:
    """The compression that brings the (widened) recipe model to ``target`` MACs: the budget's
    (within 2%), else, where the degree steps of a small net straddle the target, the nearest step."""
    from ..analysis import report
    from ..surgery import convert

    m, s = recipe["model"], dict(recipe["surgery"])
    s.pop("compress", None), s.pop("version", None)
    common = {"model_kwargs": dict(m.get("kwargs") or {}), "check": False,
              "input_size": tuple(recipe["data"]["input_size"]), **s}
    try:
        converted, _ = convert(m["source"], target_macs=target, **common)
        return float(converted._xsurgery_spec["compress"])
    except UserError as exc:
        if "cannot be met within" not in str(exc):
            raise

    def macs(c: float) -> int:
        model, _ = convert(m["source"], compress=c, **common)
        return int(report(model, input_size=common["input_size"]).totals["macs_after"])

    lo, hi = 1.0, 2.0
    while macs(hi) > target and hi < 4096:
        lo, hi = hi, hi * 2
    for _ in range(24):  # macs(lo) > target >= macs(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) > target else (lo, mid)
    return min((lo, hi), key=lambda c: abs(macs(c) - target))


def _dense_of(parsed: list[Variant]) -> Variant | None:
    """The variant whose trained runs others start from: ``dense@1``, else the recipe's ``dense``."""
    return next((v for v in parsed if v.family == "dense" and v.value == 1),
                next((v for v in parsed if v.family == "recipe" and v.name == "dense"), None))


def _seeds(out: str, v: Variant, seeds: Sequence[int]) -> list[int]:
    """The asked seeds plus every seed of ``v`` already finished in ``out`` (the folder accumulates)."""
    found = set()
    folder = os.path.join(out, "runs", slug(v.name))
    if os.path.isdir(folder):
        for entry in os.listdir(folder):
            if entry[:1] == "s" and entry[1:].isdigit() and finished(os.path.join(folder, entry)):
                found.add(int(entry[1:]))
    return sorted(set(seeds) | found)


def plan_sweep(recipe_path: str, variants: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
               out: str) -> list[SweepRun]:
    """Every (variant, seed) run with its resolved recipe dict (checked by building a ``Recipe``);
    finished runs of the same variants at other seeds in ``out`` are included."""
    from ..train import BEST, Recipe, apply_overrides, read_recipe_file

    if not variants:
        raise UserError("give at least one variant, e.g. --variants dense x@2")
    if len(set(variants)) < len(variants):
        raise UserError("a variant is named twice in --variants")
    raw = read_recipe_file(recipe_path)
    base = apply_overrides({k: v for k, v in raw.items() if k != "variants"}, list(overrides))
    parsed = [parse_variant(v, raw) for v in variants]
    dense = _dense_of(parsed)
    budgets: dict[str, int] = {}
    runs = []
    for v in parsed:
        d = apply_overrides(base, v.overrides)
        if v.target == "dense-macs":
            budgets["dense"] = budgets.get("dense") or _macs(apply_overrides(base, {"surgery": None}))
            d["surgery"]["compress"] = _iso_mac_compress(d, budgets["dense"])
        elif v.target == "x-macs":  # the default X model's MACs at this compression
            key = f"x@{v.value:g}"
            budgets[key] = budgets.get(key) or _macs(apply_overrides(base, parse_variant(key, raw).overrides))
            d["prune"]["target_macs"] = budgets[key]
        if v.after == "dense" and dense is None:
            raise UserError(f"{v.name} starts from the trained dense run: add dense@1 (or the recipe's dense) to --variants")
        for seed in _seeds(out, v, seeds):
            folder = os.path.join(out, "runs", slug(v.name), f"s{seed}")
            extra: dict[str, Any] = {"seed": seed, "output": folder,
                                     "name": f"{base.get('name', 'run')}-{slug(v.name)}-s{seed}"}
            needs = None
            if v.after == "dense":
                needs = os.path.join(out, "runs", slug(dense.name), f"s{seed}")
                extra["model.weights"] = os.path.join(needs, BEST)
            r = apply_overrides(d, extra)
            Recipe.from_dict(r)  # every mistake before the first training
            runs.append(SweepRun(v, seed, folder, r, needs))
    for run in runs:
        check_finished(run)
    return runs


def check_finished(run: SweepRun) -> None:
    """A finished run is reused only when it trained the recipe the sweep asks for now."""
    from .._util.io import read_limited
    from .._util.text import MAX_YAML_BYTES, load_yaml
    from ..train import Recipe

    saved_path = os.path.join(run.folder, "recipe.yaml")
    if not run.done or not os.path.isfile(saved_path):
        return
    saved = load_yaml(read_limited(saved_path, MAX_YAML_BYTES, saved_path), saved_path) or {}
    now = Recipe.from_dict(run.recipe).to_dict()
    try:  # fields added to recipes since the run finished hold their defaults
        saved = Recipe.from_dict(saved).to_dict()
    except (UserError, TypeError, ValueError):
        pass
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise UserError(f"{run.folder} holds a finished run of another recipe ({', '.join(changed)} differ); "
                        f"give the sweep another -o folder")


def sweep(
    recipe: str,
    variants: Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    out: str = "sweep",
    jobs: int = 1,
    threads: int = 1,
    device: str = "cpu",
    runtime: str | None = "onnxruntime",
    batch: int | Sequence[int] = 1,
    latency_threads: int = 2,
    repeat: int = 15,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``variants`` of ``recipe`` at ``seeds`` into ``out`` and rank them; returns the summary.

    Args:
        recipe: a recipe file (``recipes/<name>.yaml`` or ``<name>``).
        variants: names from the recipe's ``variants:`` or built-in families: ``dense@w`` (width
            multiplier w), ``x@C`` / ``grouped@C`` (compression C; ``x@4:mixing=1,mix_points=chain``
            sets surgery options), ``wide-x@w`` (widened by w, converted back to dense MACs).
        seeds: one training per seed and variant.
        overrides: ``key=value`` recipe overrides for every run (``epochs=1``).
        out: the results folder; finished runs in it are skipped, started ones resumed.
        jobs: trainings at a time, each on ``threads`` threads.
        runtime: a registered export runtime for the latency (``None``: not measured); files
            are timed interleaved in one process, ``batch`` per call (several: one timing run
            each; the first batch's latency is the front's), on ``latency_threads``.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    batches = [batch] if isinstance(batch, int) else list(batch)
    if not batches or any(b < 1 for b in batches) or len(set(batches)) < len(batches):
        raise UserError("give the latency batch sizes as distinct integers >= 1, e.g. --batch 1 8")
    runs = plan_sweep(recipe, variants, seeds, overrides, out)
    failures = train_runs(runs, out, jobs, threads, device, log)
    rows, by_batch = measure_runs(runs, out, runtime, batches, latency_threads, repeat, log)
    if not rows:
        raise UserError(f"no run of the sweep finished ({failures[0] if failures else 'nothing trained'})")
    latency = by_batch.get(batches[0])
    summary_rows = summarize(rows, latency)
    for r in summary_rows:
        r["latency_by_batch"] = {str(b): ratios.get(r["variant"], math.nan) for b, ratios in by_batch.items()}
    meta = {"recipe": recipe, "variants": list(variants), "seeds": list(seeds), "overrides": list(overrides),
            "runtime": runtime, "batch": batches[0], "batches": batches, "latency_threads": latency_threads,
            "latency_note": (f"{runtime}, batch {' and '.join(map(str, batches))} (the front: batch {batches[0]}), "
                             f"{latency_threads} threads, median of {repeat} interleaved "
                             f"rounds, ratio to the dense variant" if latency else "not measured"),
            "load_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "failures": failures}
    _write(out, rows, summary_rows, meta)
    return {"meta": meta, "variants": summary_rows, "runs": rows}


def _write(out: str, rows: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from .._util.io import write_text

    results = os.path.join(out, "results")
    os.makedirs(results, exist_ok=True)
    for r in rows:
        write_text(os.path.join(results, f"{slug(r['variant'])}-s{r['seed']}.json"),
                   json.dumps(json_ready(r), indent=1, default=_plain) + "\n", force=True)
    write_text(os.path.join(out, "summary.json"),
               json.dumps(json_ready({"meta": meta, "variants": summary}), indent=1, default=_plain) + "\n", force=True)
    try:
        plots = sweep_plots(summary, out)
    except ImportError:
        plots = []
    title = f"Sweep: {os.path.basename(meta['recipe'])}"
    write_text(os.path.join(out, "README.md"), sweep_page(title, summary, meta, plots), force=True)


def _plain(v: Any) -> Any:
    return str(v)


def json_ready(obj: Any) -> Any:
    """JSON has no NaN: a value not measured is ``null``."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
