"""Fine-tuning matrix: from a trained dense model to sparse ones, by method, compression and seed.

    .venv/bin/python tools/finetune_matrix.py recipes/fashion_mnist_mobilenet.yaml \\
        --dense runs/fmnist-dense/best.xs --compress 2 4 8 --seeds 0 1 2 --epochs 3 \\
        --methods scratch keep project project+distill -o finetune/ optim.lr=0.02
    .venv/bin/python tools/finetune_matrix.py ... --report-only    # the page from finished runs

Every (compression C, method, seed) is one ``xsurgery train`` of the recipe (its ``variants:``
dropped) with ``surgery.compress=C``, ``epochs=--epochs`` (the fine-tune budget, the same for
every method), ``seed`` and any ``key=value`` overrides given after the options, plus:

* ``scratch``: ``surgery.init=kaiming``, no weights (the sparse net trained from scratch for
  the same budget);
* ``keep``: ``model.weights=DENSE``, ``surgery.init=keep`` (the dense weights of the kept
  connections);
* ``project``: ``model.weights=DENSE``, ``surgery.init=project`` (ridge least squares per block
  on the recipe's own training batches, ``calibration_batches``);
* ``project+distill``: as ``project``, with ``teacher=DENSE`` and ``distill.alpha`` /
  ``distill.temperature`` (``--alpha``, ``--temperature``).

Runs are trained by the sweep's trainer (``xsurgery.bench.train_runs``): ``--jobs`` at a time,
each a subprocess of ``--threads`` threads; a finished run is skipped, a started one continued
with ``--resume``, a finished run of another recipe refused. Then, per run, the converted model
before any fine-tuning is scored on the validation split (epoch 0, cached in the run's folder),
and ``-o/README.md`` gets the table (dense top-1; per C and method the test top-1 of ``best.xs``,
mean ± std over seeds) and ``finetune.png`` (validation top-1 against fine-tune epoch, from each
run's ``metrics.jsonl``, mean over seeds), with ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("scratch", "keep", "project", "project+distill")
EPOCH0 = "epoch0.json"


def method_overrides(method: str, dense: str, alpha: float, temperature: float) -> dict[str, Any]:
    """The recipe overrides that make ``method`` (see the module docstring)."""
    if method == "scratch":
        return {"surgery.init": "kaiming"}
    out: dict[str, Any] = {"model.weights": dense, "surgery.init": "keep" if method == "keep" else "project"}
    if method == "project+distill":
        out.update({"teacher": dense, "distill.alpha": alpha, "distill.temperature": temperature})
    elif method not in METHODS:
        raise SystemExit(f"finetune_matrix: unknown method {method!r}; choose from {', '.join(METHODS)}")
    return out


def plan(args: argparse.Namespace) -> list:
    """Every (C, method, seed) as a :class:`xsurgery.bench.SweepRun` with its resolved recipe."""
    from xsurgery.bench import SweepRun, Variant, check_finished
    from xsurgery.train import Recipe, apply_overrides, read_recipe_file

    raw = read_recipe_file(args.recipe)
    base = apply_overrides({k: v for k, v in raw.items() if k != "variants"}, list(args.overrides))
    if base.get("surgery") is None:
        raise SystemExit("finetune_matrix: the recipe has no surgery (surgery: null); give a sparse recipe")
    dense = os.path.abspath(args.dense)
    runs = []
    for c in args.compress:
        for method in args.methods:
            over = {"surgery.compress": c, "epochs": args.epochs, **method_overrides(method, dense, args.alpha,
                                                                                      args.temperature)}
            name = f"{method}@{c:g}"
            slug = name.replace("+", "-").replace("@", "-c")
            for seed in args.seeds:
                folder = os.path.join(args.out, "runs", slug, f"s{seed}")
                r = apply_overrides(base, {**over, "seed": seed, "output": folder,
                                           "name": f"{base.get('name', 'run')}-{slug}-s{seed}"})
                Recipe.from_dict(r)  # every mistake before the first training
                run = SweepRun(Variant(name, method, over, None, float(c)), seed, folder, r)
                check_finished(run)
                runs.append(run)
    return runs


def epoch0(run) -> float | None:
    """Validation (else test) top-1 of the converted model before fine-tuning (cached)."""
    import torch

    from xsurgery.train import Recipe, build_model
    from xsurgery.train.data import build_splits

    path = os.path.join(run.folder, EPOCH0)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)["top1"]
    recipe = Recipe.from_dict(run.recipe)
    splits = build_splits(recipe.data, recipe.seed)
    data = splits.val if splits.val is not None else splits.test
    model = build_model(recipe).eval()
    loader = torch.utils.data.DataLoader(data, recipe.eval_batch_size or recipe.batch_size)
    hit = total = 0
    with torch.no_grad():
        for x, y in loader:
            hit += int((model(x).argmax(1) == y).sum())
            total += len(y)
    top1 = hit / max(total, 1)
    os.makedirs(run.folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"top1": top1, "images": total}, f)
    return top1


def curve(run) -> list[float]:
    out = []
    with open(os.path.join(run.folder, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.append(rec.get("val_top1", rec.get("test_top1")))
    return out


def _stat(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f} (n={len(values)})"


def dense_result(dense: str) -> dict[str, Any] | None:
    path = os.path.join(os.path.dirname(os.path.abspath(dense)), "result.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def report(args: argparse.Namespace, runs: list) -> str:
    """Write ``README.md``, ``finetune.png`` and ``summary.json`` under ``args.out``; returns the table."""
    rows = []
    for r in runs:
        if not r.done:
            continue
        with open(os.path.join(r.folder, "result.json"), encoding="utf-8") as f:
            res = json.load(f)
        rows.append({"method": r.variant.family, "compress": r.variant.value, "seed": r.seed,
                     "test_top1": res["test_top1"], "on": res.get("selected_on", "val"),
                     "curve": [epoch0(r), *curve(r)]})
    dres = dense_result(args.dense)
    dense_top1 = dres.get("test_top1") if dres else None
    dense_val = dres.get("best_val_top1", dense_top1) if dres else None
    head = "| C | " + " | ".join(args.methods) + " |"
    lines = [head, "|---|" + "---|" * len(args.methods)]
    for c in args.compress:
        cells = [_stat([x["test_top1"] for x in rows if x["compress"] == c and x["method"] == m]) for m in args.methods]
        lines.append(f"| {c:g} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    plot_name = plot(args, rows, dense_val)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"recipe": args.recipe, "dense": args.dense, "dense_test_top1": dense_top1, "epochs": args.epochs,
                   "seeds": args.seeds, "overrides": list(args.overrides), "runs": rows}, f, indent=1)
    dense_line = f"{100 * dense_top1:.2f}" if dense_top1 is not None else "– (no result.json beside the checkpoint)"
    page = [
        "# Fine-tuning from a trained dense model",
        "",
        f"Recipe `{args.recipe}`, dense checkpoint `{args.dense}`, fine-tune budget {args.epochs} epoch(s) for every "
        f"method, seeds {', '.join(map(str, args.seeds))}, overrides `{' '.join(args.overrides) or 'none'}`; "
        f"distillation alpha {args.alpha:g}, temperature {args.temperature:g}. Written by `tools/finetune_matrix.py`.",
        "",
        f"Dense test top-1: **{dense_line}**.",
        "",
        "Test top-1 (%) of each run's `best.xs` (chosen on the validation split; on the test set where the recipe "
        "has none), mean ± std over seeds:",
        "",
        table,
        "",
        "Methods: `scratch` = the sparse net trained from a fresh initialisation for the same budget; `keep` = the "
        "dense weights of the kept connections; `project` = ridge least-squares projection per block on the "
        "recipe's training batches; `project+distill` = project, then fine-tuned with the dense model as teacher.",
        "",
    ]
    if plot_name:
        page += [f"![validation top-1 against fine-tune epoch]({plot_name})", "",
                 "Epoch 0: the converted model before any fine-tuning; every point the mean over seeds of the "
                 "validation split's top-1 (the test set's where the recipe has no validation split)."]
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(page) + "\n")
    return table


def plot(args: argparse.Namespace, rows: list[dict[str, Any]], dense_val: float | None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cs = [c for c in args.compress if any(r["compress"] == c for r in rows)]
    if not cs:
        return None
    fig, axes = plt.subplots(1, len(cs), figsize=(4.2 * len(cs), 3.4), squeeze=False, sharey=True)
    for ax, c in zip(axes[0], cs):
        for m in args.methods:
            curves = [r["curve"] for r in rows if r["compress"] == c and r["method"] == m]
            if not curves:
                continue
            n = min(len(cv) for cv in curves)
            mean = [100 * statistics.mean(cv[i] for cv in curves) for i in range(n)]
            ax.plot(range(n), mean, marker="o", label=m)
        if dense_val is not None:
            ax.axhline(100 * dense_val, color="k", ls="--", lw=1, label="dense")
        ax.set_title(f"C = {c:g}")
        ax.set_xlabel("fine-tune epoch")
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("validation top-1 (%)" if any(r.get("on") == "val" for r in rows) else "test top-1 (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    name = "finetune.png"
    fig.savefig(os.path.join(args.out, name), dpi=120)
    plt.close(fig)
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="a sparse training recipe (its variants are dropped)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for every run, e.g. optim.lr=0.02")
    p.add_argument("--dense", required=True, metavar="BEST.xs", help="the trained dense checkpoint (a dense run's best.xs)")
    p.add_argument("--compress", type=float, nargs="+", default=[2, 4, 8])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="fine-tune epochs (the same budget for every method)")
    p.add_argument("--alpha", type=float, default=0.5, help="project+distill: distill.alpha")
    p.add_argument("--temperature", type=float, default=4.0, help="project+distill: distill.temperature")
    p.add_argument("-o", "--out", required=True, metavar="FOLDER")
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time (one thread pool worker each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--device", default="cpu")
    p.add_argument("--report-only", action="store_true", help="write the page from the finished runs; train nothing")
    args = p.parse_intermixed_args(argv)
    import torch

    from xsurgery.bench import train_runs
    from xsurgery.errors import UserError

    torch.set_num_threads(args.threads)
    try:
        os.makedirs(args.out, exist_ok=True)
        runs = plan(args)
        if not args.report_only:
            failures = train_runs(runs, args.out, args.jobs, args.threads, args.device, print)
            if failures:
                print(f"finetune_matrix: {len(failures)} run(s) failed: " + "; ".join(failures[:3]), file=sys.stderr)
        print(report(args, runs))
        print(f"wrote {os.path.join(args.out, 'README.md')}")
    except UserError as exc:
        print(f"finetune_matrix: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
