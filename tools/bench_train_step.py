"""The torch training step (forward + backward + SGD step) of X-models against dense, on CPU.

Models: a 4-layer 512-wide MLP (batch 128, C = 32), ResNet-50 (batch 16, 128 px, C = 4) and
Hugging Face BERT-base (batch 8, sequence 128, C = 4; built from its config, no download).
Variants: ``dense``; ``grouped`` (``graph="grouped"``, contiguous blocks, no gather);
``default`` (``convert(model, compress=C)``, nothing else); ``fast`` (``mixing=1``, the default since the frontier); ``k2`` (``mixing=2``); optional ``x-gather`` / ``x-masked`` (the default graph with that execution
forced, the two ``execution="auto"`` chooses between). One step: ``zero_grad(set_to_none)``, forward in train mode, loss (cross
entropy on random labels; BERT: the mean of the last hidden state), backward, ``SGD(lr=1e-3,
momentum=0.9).step()``.

Every variant of one model is timed in one process, interleaved (each variant one step per
round, after warm-up steps), with ``torch.set_num_threads(--threads)``; the table gives the
median of the per-round ratios to dense (robust to a shared machine's drift), the dense
median in ms, and the MACs ratio (forward, X-layers compact). ``--compile`` also times each
variant's step under ``torch.compile`` (inductor) against compiled dense.

    python tools/bench_train_step.py                 # all three models, 20 rounds
    python tools/bench_train_step.py --quick         # ResNet-50 b4 64 px, BERT b2 seq 32, 5 rounds
    python tools/bench_train_step.py --models mlp --compile --json step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = {"dense": None, "grouped": {"graph": "grouped", "mixing": 1}, "default": {}, "fast": {"mixing": 1},
            "k2": {"mixing": 2}, "k1-chain": {"mixing": 1, "mix_points": "chain"},
            # the default graph forced to one execution (what execution="auto"'s rule chooses between)
            "x-gather": {"execution": "gather"}, "x-masked": {"execution": "masked"}}
DEFAULT_VARIANTS = ["dense", "grouped", "default", "fast"]


def _mlp():
    from torch import nn

    layers = []
    for _ in range(4):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


def _case(name: str, quick: bool):
    """(dense model, example, loss(output, labels) -> scalar, labels, compression)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        return _mlp(), torch.randn(128, 512, generator=gen), torch.randint(0, 10, (128,), generator=gen), 32
    if name == "resnet50":
        from xsurgery.models import create_model

        b, px = (4, 64) if quick else (16, 128)
        return (create_model("resnet50"), torch.randn(b, 3, px, px, generator=gen),
                torch.randint(0, 1000, (b,), generator=gen), 4)
    if name == "bert":
        from xsurgery.models import create_model

        b, seq = (2, 32) if quick else (8, 128)
        model = create_model("hf/bert")
        ids = torch.randint(0, model.config.vocab_size, (b, seq), generator=gen)
        return model, ((), {"input_ids": ids, "attention_mask": torch.ones(b, seq, dtype=torch.int64)}), None, 4
    raise SystemExit(f"unknown model {name!r}; use mlp, resnet50, bert")


def _call(model, x):
    if isinstance(x, tuple):
        return model(*x[0], **x[1])
    return model(x)


def _step_fn(model, x, labels, compiled: bool):
    import torch
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fwd = torch.compile(model) if compiled else model

    def loss_of(out):
        if labels is None:  # an HF model: the first output
            out = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
            return out.float().mean()
        return F.cross_entropy(out, labels)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(_call(fwd, x)).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "resnet50", "bert"])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help="default: dense grouped default fast; x-gather / x-masked force the default's execution")
    p.add_argument("--compress", type=float, default=None, help="override each model's C")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    p.add_argument("--quick", action="store_true", help="smaller ResNet-50 / BERT inputs, 5 rounds")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 5, 2
    if "dense" not in args.variants:
        args.variants.insert(0, "dense")
    warnings.filterwarnings("ignore")
    import torch

    from xsurgery.bench import count_macs, machine_info
    from xsurgery.surgery import convert

    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"{info.get('cpu')}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for name in args.models:
        dense, x, labels, c = _case(name, args.quick)
        c = args.compress or c
        ex = x if isinstance(x, tuple) else ((x,), {})
        dense_macs = count_macs(dense, ex)
        models = {}
        for v in args.variants:
            opts = VARIANTS[v]
            models[v] = dense if opts is None else convert(dense, compress=c, example_inputs=ex, check=False,
                                                           **opts)[0]
        modes = [False, True] if args.compile else [False]
        for compiled in modes:
            steps = {v: _step_fn(m, x, labels, compiled) for v, m in models.items()}
            for fn in steps.values():
                for _ in range(args.warmup + (2 if compiled else 0)):
                    fn()
            samples = {v: [] for v in steps}
            for _ in range(args.rounds):
                for v, fn in steps.items():
                    t = time.perf_counter()
                    fn()
                    samples[v].append(time.perf_counter() - t)
            d = samples["dense"]
            for v, t in samples.items():
                row = {"model": name, "compiled": compiled, "variant": v, "compress": 1.0 if v == "dense" else c,
                       "median_ms": 1e3 * statistics.median(t),
                       "ratio": statistics.median(a / b for a, b in zip(t, d)), "ratio_min": min(t) / min(d),
                       "macs_ratio": count_macs(models[v], ex) / dense_macs, "rounds": len(t)}
                rows.append(row)
                print(f"{name:9s} {'compiled' if compiled else 'eager':8s} {v:8s} {row['median_ms']:9.2f} ms "
                      f"ratio {row['ratio']:.3f} (minima {row['ratio_min']:.3f}) MACs {row['macs_ratio']:.3f}",
                      flush=True)
    print()
    print(_markdown(rows, args.variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": rows}, f, indent=1)
    return 0


def _markdown(rows: list[dict], variants: list[str]) -> str:
    others = [v for v in variants if v != "dense"]
    lines = ["| model | step | C | dense ms | " + " | ".join(others) + " | MACs |",
             "|---|---|---|---|" + "---|" * (len(others) + 1)]
    keys = dict.fromkeys((r["model"], r["compiled"]) for r in rows)
    by = {(r["model"], r["compiled"], r["variant"]): r for r in rows}
    for m, comp in keys:
        d = by[(m, comp, "dense")]
        c = next((by[(m, comp, v)]["compress"] for v in others if (m, comp, v) in by), 1.0)
        macs = next((by[(m, comp, v)]["macs_ratio"] for v in others if (m, comp, v) in by), 1.0)
        cells = [f"{by[(m, comp, v)]['ratio']:.2f}" if (m, comp, v) in by else "-" for v in others]
        lines.append(f"| {m} | {'compiled' if comp else 'eager'} | {c:g} | {d['median_ms']:.1f} | "
                     + " | ".join(cells) + f" | {macs:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
