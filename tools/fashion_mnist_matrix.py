"""Fashion-MNIST matrix: X vs grouped vs dense, trained from scratch, written to a results page.

    .venv/bin/python tools/fashion_mnist_matrix.py                  # the whole matrix (resumable)
    .venv/bin/python tools/fashion_mnist_matrix.py --jobs 2         # two trainings at a time
    .venv/bin/python tools/fashion_mnist_matrix.py --report-only    # page + plot from finished runs
    .venv/bin/python tools/fashion_mnist_matrix.py --dry-run        # list the runs and their state

Runs: ``recipes/fashion_mnist_mobilenet.yaml`` at C = 2, 4, 8, 16 and
``recipes/fashion_mnist_resnet.yaml`` at C = 2, 4, each with the variants ``grouped`` (no
shuffle), ``x1`` and ``x2`` (X with mixing 1 and 2), plus ``dense`` once per net; seeds 0, 1, 2
(the seed sets the run's initialisation and data order and the expander graphs). Every run is
``xsurgery train`` in a subprocess with its own output folder under ``--out``: a finished run
(``result.json`` present) is skipped, a killed one is continued with ``--resume``, so the
command can be re-run until everything is done. Runs go seed by seed, so a partial matrix has
every configuration at the same number of seeds, give or take one.

Afterwards (and with ``--report-only``) it measures per configuration, on the seed-0
``best.xs``: parameters and MACs (the report's counter at 1x28x28), the *reach* of the
MobileNet's chain of 1x1 convs, and, all configurations of one net timed interleaved in one
process in thread CPU time (robust to other processes on a shared machine), a training step
(batch 128) and ONNX Runtime inference (batch 1, X-layers exported as Gather + grouped Conv)
as ratios to dense; it also reports the training images/s the runs logged (wall clock). It
writes the tables between the markers of ``--page`` (text outside them is kept) and the plot
``--plot`` (test accuracy against parameters, one line per variant, dense as a star).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NETS = {  # net -> (recipe, compressions)
    "mobilenet": ("recipes/fashion_mnist_mobilenet.yaml", (2, 4, 8, 16)),
    "resnet": ("recipes/fashion_mnist_resnet.yaml", (2, 4)),
}
VARIANTS = ("grouped", "x1", "x2")
LABELS = {"dense": "dense", "grouped": "grouped (no shuffle)", "x1": "X, mixing 1", "x2": "X, mixing 2"}
SEEDS = (0, 1, 2)
BEGIN, END = "<!-- matrix:begin (written by tools/fashion_mnist_matrix.py) -->", "<!-- matrix:end -->"
RESULT = "result.json"
TRAIN_BATCH = 128  # the recipes' batch size


@dataclass(frozen=True)
class Run:
    net: str
    variant: str
    compress: int | None  # None: dense
    seed: int

    @property
    def config(self) -> str:
        return f"{self.net}-{self.variant}" + (f"-c{self.compress}" if self.compress else "")

    @property
    def name(self) -> str:
        return f"{self.config}-s{self.seed}"

    def overrides(self, folder: str) -> list[str]:
        out = [f"seed={self.seed}", f"output={folder}"]
        if self.compress:
            out += [f"surgery.compress={self.compress}", f"surgery.seed={self.seed}"]
        return out


def matrix(seeds=SEEDS, nets=tuple(NETS)) -> list[Run]:
    """Every run, seed by seed (all configurations at seed 0 first)."""
    runs = []
    for seed in seeds:
        for net in nets:
            runs.append(Run(net, "dense", None, seed))
            for c in NETS[net][1]:
                runs += [Run(net, v, c, seed) for v in VARIANTS]
    return runs


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def state(run: Run, out: str) -> str:
    folder = os.path.join(out, run.name)
    if os.path.isfile(os.path.join(folder, RESULT)):
        return "done"
    if os.path.isfile(os.path.join(folder, "train_state.json")):
        return "partial"
    return "todo"


# --------------------------------------------------------------------------- training


def _command(run: Run, out: str, device: str) -> list[str]:
    recipe = os.path.join(ROOT, NETS[run.net][0])
    folder = os.path.join(out, run.name)
    how = ["--resume"] if state(run, out) == "partial" else ["--force"]
    return [sys.executable, "-m", "xsurgery.cli", "train", recipe, "--variant", run.variant, "--device", device,
            *how, *run.overrides(folder)]


def train_all(runs: list[Run], out: str, *, jobs: int, threads: int, device: str) -> int:
    """Train the runs not done yet, ``jobs`` at a time; returns the number that failed."""
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    pending = [r for r in runs if state(r, out) != "done"]
    total, failed, running = len(pending), 0, {}
    journal = os.path.join(out, "runs.jsonl")
    print(f"{len(runs) - total} of {len(runs)} runs already done; {total} to train, {jobs} at a time, "
          f"{threads} thread(s) each", flush=True)
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            log = open(os.path.join(logs, f"{run.name}.log"), "a", encoding="utf-8")  # noqa: SIM115
            cmd = _command(run, out, device)
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running[proc.pid] = (run, proc, log, time.time())
        time.sleep(1.0)
        for pid, (run, proc, log, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            log.close()
            del running[pid]
            t1 = time.time()
            with open(journal, "a", encoding="utf-8") as f:
                f.write(json.dumps({"run": run.name, "start": t0, "end": t1, "rc": rc}) + "\n")
            done = total - len(pending) - len(running)
            result = _read_json(os.path.join(out, run.name, RESULT)) or {}
            acc = f"test {100 * result['test_top1']:.2f}%" if "test_top1" in result else f"FAILED (rc {rc})"
            print(f"[{done}/{total}] {run.name}: {acc} in {t1 - t0:.0f}s "
                  f"({time.strftime('%H:%M:%S', time.gmtime(t1))} UTC)", flush=True)
            failed += rc != 0
    return failed


# ------------------------------------------------------------------------ measurements


def _history(folder: str) -> list[dict[str, Any]]:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(runs: list[Run], out: str) -> dict[str, dict[str, Any]]:
    """Per configuration: finished seeds' test/val accuracy and training images/s."""
    configs: dict[str, dict[str, Any]] = {}
    for run in runs:
        c = configs.setdefault(run.config, {"net": run.net, "variant": run.variant, "compress": run.compress,
                                            "test": [], "val": [], "train": [], "img_s": [], "seeds": []})
        folder = os.path.join(out, run.name)
        result = _read_json(os.path.join(folder, RESULT))
        if not result:
            continue
        c["seeds"].append(run.seed)
        c["test"].append(100 * result["test_top1"])
        c["val"].append(100 * result["best_val_top1"])
        history = _history(folder)
        speeds = [h["images_per_s"] for h in history]
        if history and "train_acc" in history[-1]:
            c["train"].append(100 * history[-1]["train_acc"])
        if speeds:
            c["img_s"].append(statistics.median(speeds))
    return configs


def reach(model) -> float | None:
    """Fraction of (last, first) channel pairs of the chain of X-layers joined by a path.

    Only for a plain chain (each X-layer reads the previous one's outputs, as the MobileNet's
    pointwise convs do through channel-wise depthwise convs); ``None`` otherwise, or for dense.
    Grouped convs without shuffle give ``1 / C`` (C separate towers); Theorem 3.1 of the paper
    says X-layers reach 1 after a few layers.
    """
    import torch

    from xsurgery.layers import XConv2d

    layers = [m for m in model.modules() if isinstance(m, XConv2d)]
    if not layers or any(a.out_channels != b.in_channels for a, b in zip(layers, layers[1:])):
        return None
    paths = None
    for layer in layers:
        m = layer.graph.mask().to(torch.float64)  # [out, in]
        paths = m if paths is None else (m @ paths > 0).to(torch.float64)
    return float(paths.mean())


def cpu_times(runners: dict[str, Any], *, warmup: int, repeat: int, min_sample_ms: float) -> dict[str, float]:
    """Median CPU time per call (ms) of each runner, interleaved round by round.

    CPU time of this thread (``time.thread_time``), not wall time: on a machine shared with
    other work, wall time counts the time other processes held the core; with one torch /
    ONNX Runtime thread the work runs on the calling thread, so its CPU time is the cost.
    """
    inner = {}
    for k, fn in runners.items():
        t0 = time.thread_time()
        fn()
        once = max((time.thread_time() - t0) * 1e3, 1e-3)
        inner[k] = max(1, int(min_sample_ms / once) + 1)
    for _ in range(warmup):
        for k, fn in runners.items():
            for _ in range(inner[k]):
                fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeat):
        for k, fn in runners.items():
            t0 = time.thread_time()
            for _ in range(inner[k]):
                fn()
            samples[k].append((time.thread_time() - t0) * 1e3 / inner[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def measure(configs: dict[str, dict[str, Any]], out: str, *, threads: int, force: bool = False) -> dict[str, Any]:
    """Params, MACs, reach, ORT latency (batch 1) and a training step (batch 128) of each
    configuration's seed-0 ``best.xs``, every configuration of a net timed together; cached
    in ``<out>/measurements.json`` (ONNX files in ``<out>/onnx/``)."""
    import warnings

    import torch

    import xsurgery
    from xsurgery.bench import count_macs, ort_runner, train_runner
    from xsurgery.export import export_onnx

    cache_path = os.path.join(out, "measurements.json")
    cache = (_read_json(cache_path) or {}) if not force else {}
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    onnx_dir = os.path.join(out, "onnx")
    os.makedirs(onnx_dir, exist_ok=True)
    for net in NETS:
        names = [k for k, c in configs.items() if c["net"] == net and 0 in c["seeds"]]
        if not names or all("clock" in cache.get(k, {}) for k in names):
            continue
        runners, steps, rows = {}, {}, {}
        for k in names:
            model = xsurgery.load(os.path.join(out, f"{k}-s0", "best.xs")).eval()
            x = torch.randn(1, 1, 28, 28)
            onnx_path = os.path.join(onnx_dir, f"{k}.onnx")
            dense = configs[k]["variant"] == "dense"
            if not os.path.isfile(onnx_path):
                # X-layers as Gather + grouped Conv (the sparse form; "auto" would pick per layer
                # from wall-clock timings, a coin flip on a shared machine)
                export_onnx(model, onnx_path, input_size=(1, 28, 28), threads=threads, verbose=False,
                            **({} if dense else {"layout": "gather"}))
            rows[k] = {"params": sum(p.numel() for p in model.parameters()), "macs": count_macs(model, x),
                       # the ResNet is no chain: its dense 1x1 shortcuts mix every channel
                       "reach": reach(model) if not dense and net == "mobilenet" else None,
                       "layout": "-" if dense else "gather"}
            runners[k] = ort_runner(onnx_path, x, threads=threads)
            steps[k] = train_runner(model, torch.randn(TRAIN_BATCH, 1, 28, 28))
        ort = cpu_times(runners, warmup=5, repeat=30, min_sample_ms=20)
        step = cpu_times(steps, warmup=1, repeat=5, min_sample_ms=1)
        dense = f"{net}-dense"
        for k in names:
            rows[k].update(clock="thread CPU time", ort_ms=ort[k], ort_ratio=ort[k] / ort[dense] if dense in ort else None,
                           train_img_s=TRAIN_BATCH * 1e3 / step[k],
                           train_ratio=step[dense] / step[k] if dense in step else None)
            cache[k] = rows[k]
        _write_text(cache_path, json.dumps(cache, indent=1))
        print(f"measured {net}: params, MACs, ORT latency, training step of {len(names)} configurations", flush=True)
    return cache


# ------------------------------------------------------------------------------- page


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _human(n: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f}"


def _reach(m: dict[str, Any]) -> str:
    return f"{m['reach']:.3g}" if m.get("reach") is not None else "-"


def _order(configs: dict[str, dict[str, Any]], net: str) -> list[str]:
    keys = [k for k, c in configs.items() if c["net"] == net]
    return sorted(keys, key=lambda k: (configs[k]["compress"] or 0, ("dense", *VARIANTS).index(configs[k]["variant"])))


def tables(configs: dict[str, dict[str, Any]], meas: dict[str, Any], n_runs: int, n_done: int) -> str:
    lines = []
    if n_done < n_runs:
        lines += [f"**Partial: {n_done} of {n_runs} runs finished.**", ""]
    for net in NETS:
        keys = _order(configs, net)
        dense = configs.get(f"{net}-dense", {})
        dense_speed = statistics.mean(dense["img_s"]) if dense.get("img_s") else None
        lines += [f"### {net} ({NETS[net][0]})", "",
                  "| variant | C | test top-1 % (mean ± std) | seeds | best val % | train % (last epoch) | params | MACs | reach | "
                  "train img/s in runs (÷ dense) | train step speed ÷ dense | ORT latency ÷ dense |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in keys:
            c, m = configs[k], meas.get(k, {})
            speed = "-"
            if c["img_s"]:
                s = statistics.mean(c["img_s"])
                speed = f"{s:.0f}" + (f" ({s / dense_speed:.2f})" if dense_speed else "")
            ort = "-"
            if m.get("ort_ratio") is not None:
                ort = f"{m['ort_ratio']:.2f}" if c["variant"] != "dense" else f"1 ({m['ort_ms']:.3f} ms)"
            step = "-"
            if m.get("train_ratio") is not None:
                step = f"{m['train_ratio']:.2f}" if c["variant"] != "dense" else f"1 ({m['train_img_s']:.0f} img/s)"
            lines.append(f"| {LABELS[c['variant']]} | {c['compress'] or 1} | {_mean_std(c['test'])} | {len(c['test'])} | "
                         f"{_mean_std(c['val'])} | {_mean_std(c['train'])} | {_human(m['params']) if m else '-'} | "
                         f"{_human(m['macs']) if m else '-'} | {_reach(m)} | {speed} | {step} | {ort} |")
        lines += ["", f"Differences in test top-1 (points, mean over seeds; {net}):", "",
                  "| C | X mixing 1 − grouped | X mixing 2 − grouped | X mixing 2 − mixing 1 | dense − X mixing 2 | dense − grouped |",
                  "|---|---|---|---|---|---|"]

        def mean(key: str) -> float | None:
            vals = configs.get(key, {}).get("test")
            return statistics.mean(vals) if vals else None

        d = mean(f"{net}-dense")
        for comp in NETS[net][1]:
            g, x1, x2 = (mean(f"{net}-{v}-c{comp}") for v in VARIANTS)

            def diff(a, b):
                return f"{a - b:+.2f}" if a is not None and b is not None else "-"

            lines.append(f"| {comp} | {diff(x1, g)} | {diff(x2, g)} | {diff(x2, x1)} | {diff(d, x2)} | {diff(d, g)} |")
        lines.append("")
    return "\n".join(lines)


def plot(configs: dict[str, dict[str, Any]], meas: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(NETS), figsize=(6 * len(NETS), 4.2), squeeze=False)
    markers = {"grouped": "s", "x1": "^", "x2": "o"}
    for ax, net in zip(axes[0], NETS):
        for v in VARIANTS:
            pts = sorted((meas[k]["params"], statistics.mean(c["test"]), statistics.stdev(c["test"]) if len(c["test"]) > 1
                          else 0.0, c["compress"]) for k, c in configs.items()
                         if c["net"] == net and c["variant"] == v and c["test"] and k in meas)
            if not pts:
                continue
            p, acc, err, comp = zip(*pts)
            ax.errorbar(p, acc, yerr=err, marker=markers[v], capsize=3, label=LABELS[v])
            if v == "x2":
                for px, py, cc in zip(p, acc, comp):
                    ax.annotate(f"C={cc}", (px, py), textcoords="offset points", xytext=(4, -12), fontsize="x-small")
        dk = f"{net}-dense"
        if dk in meas and configs.get(dk, {}).get("test"):
            t = configs[dk]["test"]
            ax.errorbar([meas[dk]["params"]], [statistics.mean(t)], yerr=[statistics.stdev(t) if len(t) > 1 else 0],
                        marker="*", markersize=12, color="black", linestyle="none", capsize=3, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"Fashion-MNIST, {net} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)


def _timing(out: str) -> str:
    path = os.path.join(out, "runs.jsonl")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ok = [r for r in rows if r["rc"] == 0]
    if not ok:
        return ""
    busy = sum(r["end"] - r["start"] for r in ok)
    first, last = min(r["start"] for r in rows), max(r["end"] for r in rows)
    fmt = "%Y-%m-%d %H:%M UTC"
    return (f"Training: {len(ok)} runs took {busy / 60:.0f} min of run time in total, from "
            f"{time.strftime(fmt, time.gmtime(first))} to {time.strftime(fmt, time.gmtime(last))} "
            f"({(last - first) / 60:.0f} min of wall time, restarts included).")


def write_page(page: str, body: str) -> None:
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if os.path.isfile(page):
        with open(page, encoding="utf-8") as f:
            text = f.read()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = f"# Fashion-MNIST: X vs grouped vs dense\n\n{block}\n"
    _write_text(page, text)


# -------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "fashion_mnist"), help="run folders (default runs/fashion_mnist)")
    p.add_argument("--page", default=os.path.join(ROOT, "docs", "results", "fashion_mnist.md"))
    p.add_argument("--plot", default=None, help="default: the page's name with .png")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training and for the ORT timing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--report-only", action="store_true", help="no training: page and plot from the finished runs")
    p.add_argument("--remeasure", action="store_true", help="redo the params/MACs/latency measurements")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    runs = matrix(tuple(args.seeds), tuple(args.nets))
    out = os.path.abspath(args.out)
    if args.dry_run:
        for r in runs:
            print(f"{state(r, out):8} {r.name}")
        return 0
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    failed = 0 if args.report_only else train_all(runs, out, jobs=args.jobs, threads=args.threads, device=args.device)
    if not args.report_only:
        print(f"training finished in {(time.time() - t0) / 60:.1f} min, {failed} failed", flush=True)
    configs = collect(runs, out)
    done = sum(state(r, out) == "done" for r in runs)
    if not done:
        print("no finished run to report", file=sys.stderr)
        return 1
    meas = measure(configs, out, threads=args.threads, force=args.remeasure)
    body = tables(configs, meas, len(runs), done)
    timing = _timing(out)
    page = os.path.abspath(args.page)
    plot_path = args.plot or os.path.splitext(page)[0] + ".png"
    os.makedirs(os.path.dirname(page), exist_ok=True)
    plot(configs, meas, plot_path)
    write_page(page, (timing + "\n\n" if timing else "") + body)
    print(f"wrote {page} and {plot_path} ({done}/{len(runs)} runs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
