"""Convert one small model of every timm family (model module) and report the pass rate.

    .venv/bin/python tools/timm_sweep.py [--json out.json] [--limit N]

A family passes when `xsurgery.convert(name, compress=2)` traces (or falls back), converts
and runs forward with the original's output shape at the model's default input size.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings

import timm
import torch

from xsurgery._util.progress import progress
from xsurgery.surgery import convert

SMALL = re.compile(r"(atto|femto|pico|nano|xxs|xxsmall|xx_small|tiny|xs|_s\d?_|small|b0|_t\d?$|18|mobile|lite|_050|_075|_100)")
SKIP_TAGS = ("giant", "gigantic", "huge", "enormous", "_e_", "_g_", "_h_", "xlarge", "large", "_l_", "base")


def pick_models() -> dict[str, str]:
    """Family (timm.models submodule) -> the name that looks smallest (by name heuristics)."""
    fams: dict[str, list[str]] = {}
    for name in timm.list_models():
        family = timm.models._registry._model_to_module.get(name, "?")
        fams.setdefault(family, []).append(name)
    out = {}
    for family, names in sorted(fams.items()):
        small = [n for n in names if SMALL.search(n) and not any(t in n for t in SKIP_TAGS)]
        pool = small or [n for n in names if not any(t in n for t in SKIP_TAGS)] or names
        out[family] = sorted(pool, key=lambda n: (len(n), n))[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    models = pick_models()
    results = []
    items = list(models.items())[:args.limit]
    for family, name in progress(items, desc="timm sweep", quiet=args.quiet):
        t = time.time()
        try:
            _, rep = convert(f"timm/{name}", compress=2)
            status, detail = "ok", f"{sum(r.converted for r in rep.layers)}/{len(rep.layers)} converted, {rep.method}"
        except Exception as exc:  # the sweep records every failure kind
            status, detail = "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        results.append({"family": family, "model": name, "status": status, "detail": detail,
                        "seconds": round(time.time() - t, 2)})
        print(f"{family:24s} {name:40s} {status:4s} {results[-1]['seconds']:6.1f}s {detail}", flush=True)
    ok = sum(r["status"] == "ok" for r in results)
    print(f"{ok} of {len(results)} timm families convert and run ({timm.__version__})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"timm": timm.__version__, "passed": ok, "total": len(results), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
