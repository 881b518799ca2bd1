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
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ._frontier import summarize, sweep_page, sweep_plots
from ._variants import Variant, parse_variant

__all__ = ["SweepRun", "check_finished", "json_ready", "plan_sweep", "sweep", "train_runs"]


@dataclass(frozen=True)
class SweepRun:
    """One training of the sweep: a variant at a seed, with its resolved recipe and folder."""

    variant: Variant
    seed: int
    folder: str
    recipe: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.variant.name}/s{self.seed}"

    @property
    def done(self) -> bool:
        from ..train import RESULT

        return os.path.isfile(os.path.join(self.folder, RESULT))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _dense_macs(recipe: dict[str, Any]) -> int:
    """MACs of the recipe's dense model at its input size (the ``wide-x`` budget)."""
    from ..analysis import report
    from ..models import create_model

    m = recipe["model"]
    model = create_model(m["source"], dict(m.get("kwargs") or {}), False)
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


def plan_sweep(recipe_path: str, variants: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
               out: str) -> list[SweepRun]:
    """Every (variant, seed) run with its resolved recipe dict (checked by building a ``Recipe``)."""
    from ..train import Recipe, apply_overrides, read_recipe_file

    if not variants:
        raise UserError("give at least one variant, e.g. --variants dense x@2")
    if len(set(variants)) < len(variants):
        raise UserError("a variant is named twice in --variants")
    raw = read_recipe_file(recipe_path)
    base = apply_overrides({k: v for k, v in raw.items() if k != "variants"}, list(overrides))
    parsed = [parse_variant(v, raw) for v in variants]
    dense_macs = None
    runs = []
    for v in parsed:
        d = apply_overrides(base, v.overrides)
        if v.target == "dense-macs":
            dense_macs = dense_macs or _dense_macs(base)
            d["surgery"]["compress"] = _iso_mac_compress(d, dense_macs)
        for seed in seeds:
            folder = os.path.join(out, "runs", _slug(v.name), f"s{seed}")
            r = apply_overrides(d, {"seed": seed, "output": folder,
                                    "name": f"{base.get('name', 'run')}-{_slug(v.name)}-s{seed}"})
            Recipe.from_dict(r)  # every mistake before the first training
            runs.append(SweepRun(v, seed, folder, r))
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


class _Children:
    """The training subprocesses running now, so that an interrupted sweep stops them too."""

    def __init__(self) -> None:
        import threading

        self.lock, self.procs, self.stopping = threading.Lock(), set(), False

    def run(self, cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
        with self.lock:
            if self.stopping:
                return -1, "interrupted"
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.procs.add(proc)
        out, err = proc.communicate()
        with self.lock:
            self.procs.discard(proc)
        tail = (err.strip().splitlines() or out.strip().splitlines() or [""])[-1]
        return proc.returncode, tail

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.procs:
                proc.terminate()  # training saves nothing half-written: --resume continues it


def _train_one(run: SweepRun, out: str, threads: int, device: str,
               children: _Children) -> tuple[SweepRun, int, str, float]:
    """``xsurgery train`` on the run's recipe in a subprocess (``--resume`` where it started)."""
    from .._util.io import write_text
    from ..train import Recipe, recipe_to_yaml

    recipes = os.path.join(out, "recipes")
    os.makedirs(recipes, exist_ok=True)
    path = os.path.join(recipes, f"{_slug(run.variant.name)}-s{run.seed}.yaml")
    write_text(path, recipe_to_yaml(Recipe.from_dict(run.recipe)), force=True)
    cmd = [sys.executable, "-m", "xsurgery.cli", "train", path, "--device", device, "--quiet"]
    if os.path.isdir(run.folder) and os.listdir(run.folder):
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.monotonic()
    code, tail = children.run(cmd, env)
    return run, code, tail, time.monotonic() - t0


def train_runs(runs: list[SweepRun], out: str, jobs: int, threads: int, device: str,
               log: Callable[[str], None]) -> list[str]:
    """Train the unfinished runs, ``jobs`` at a time (``xsurgery train`` subprocesses of ``threads``
    threads, ``--resume`` where one started); a line per finished run; the failures. Also the
    fine-tuning matrix's trainer (``tools/finetune_matrix.py``)."""
    from .._util.progress import Bar

    todo = [r for r in runs if not r.done]
    if len(todo) < len(runs):
        log(f"sweep: {len(runs) - len(todo)} of {len(runs)} runs already finished (skipped)")
    failures: list[str] = []
    children = _Children()
    pool = ThreadPoolExecutor(max(1, jobs))
    try:
        with Bar(total=len(todo), desc="sweep: training") as bar:
            futures = [pool.submit(_train_one, r, out, threads, device, children) for r in todo]
            for fut in as_completed(futures):
                run, code, tail, seconds = fut.result()
                if code == 0 and run.done:
                    res = _result(run)
                    log(f"sweep: {run.key} done in {seconds:.0f} s: test top-1 {100 * res['test_top1']:.2f}%")
                else:
                    failures.append(f"{run.key}: {tail}")
                    log(f"sweep: {run.key} FAILED (exit {code}): {tail}")
                bar.update(1, info=run.key)
    except BaseException:  # Ctrl-C, SIGTERM: no queued run starts, the running ones stop (resumable)
        children.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return failures


def _curve(run: SweepRun) -> list[float]:
    """The run's validation (else test) top-1 per epoch, from its ``metrics.jsonl``."""
    path = os.path.join(run.folder, "metrics.jsonl")
    curve = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                curve.append(rec.get("val_top1", rec.get("test_top1")))
    return [float(v) for v in curve if v is not None]


def _result(run: SweepRun) -> dict[str, Any]:
    from ..train import RESULT

    with open(os.path.join(run.folder, RESULT), encoding="utf-8") as f:
        return json.load(f)


def _measure_runs(runs: list[SweepRun], out: str, runtime: str | None, batch: int, threads: int,
                  repeat: int, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, float] | None]:
    """Per run: top-1, params, MACs; per variant: its seed-0 (first) file's latency / dense."""
    import torch

    from ..analysis import report
    from ..checkpoint import load
    from ..train import BEST

    rows, models = [], {}
    for run in runs:
        if not run.done:
            continue
        model = load(os.path.join(run.folder, BEST))
        size = tuple(run.recipe["data"]["input_size"])
        totals = report(model, input_size=size).totals
        rows.append({"variant": run.variant.name, "family": run.variant.family, "seed": run.seed,
                     "folder": run.folder, "params": int(totals["params_after"]), "macs": int(totals["macs_after"]),
                     "curve": _curve(run), **_result(run)})
        models.setdefault(run.variant.name, (model, size, run.variant))
    if runtime is None or not models:
        return rows, None
    dense = _reference(models)
    if dense is None:
        log("sweep: no dense variant finished; latency is not measured (add 'dense' or 'dense@1')")
        return rows, None
    from .._util.progress import Bar
    from ..export import export_onnx
    from ._measure import measure, runtime_runner

    folder = os.path.join(out, "onnx")
    os.makedirs(folder, exist_ok=True)
    runners = {}
    with Bar(total=len(models), desc="sweep: exporting") as bar:
        for name, (model, size, _) in models.items():
            path = os.path.join(folder, f"{_slug(name)}.onnx")
            x = torch.randn(batch, *size)
            export_onnx(model, path, example_inputs=x, force=True, verbose=False, runtime=runtime, threads=threads)
            runners[name] = runtime_runner(runtime, path, x, threads)
            bar.update(1, info=name)
    busy = _busy()
    if busy:
        log(f"sweep: {busy}; latencies taken now are not to be trusted: run the sweep again on a quiet machine "
            f"(finished runs are skipped, only the timing is redone)")
    timings = measure(runners, repeat=repeat)
    ratios = {n: t.median_ms / timings[dense].median_ms for n, t in timings.items()}
    return rows, ratios


def _busy() -> str | None:
    """A description of the load when other work competes for the cores (None: quiet enough)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"the machine is busy (load {load:.1f} on {cores} cores)" if load > 0.75 * cores else None


def _reference(models: dict[str, tuple[Any, Any, Variant]]) -> str | None:
    """The dense model latencies are divided by: ``dense@1``, else a recipe variant ``dense``
    without X-layers."""
    from ..layers import X_LAYERS

    for name, (_model, _, v) in models.items():
        if v.family == "dense" and v.value == 1:
            return name
    for name, (model, _, _v) in models.items():
        if name == "dense" and not any(isinstance(m, X_LAYERS) for m in model.modules()):
            return name
    return None


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
    batch: int = 1,
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
            are timed interleaved in one process, ``batch`` per call, on ``latency_threads``.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    runs = plan_sweep(recipe, variants, seeds, overrides, out)
    failures = train_runs(runs, out, jobs, threads, device, log)
    rows, latency = _measure_runs(runs, out, runtime, batch, latency_threads, repeat, log)
    if not rows:
        raise UserError(f"no run of the sweep finished ({failures[0] if failures else 'nothing trained'})")
    summary_rows = summarize(rows, latency)
    meta = {"recipe": recipe, "variants": list(variants), "seeds": list(seeds), "overrides": list(overrides),
            "runtime": runtime, "batch": batch, "latency_threads": latency_threads,
            "latency_note": (f"{runtime}, batch {batch}, {latency_threads} threads, median of {repeat} interleaved "
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
        write_text(os.path.join(results, f"{_slug(r['variant'])}-s{r['seed']}.json"),
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
