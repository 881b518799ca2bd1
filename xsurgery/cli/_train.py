"""``xsurgery train``: a recipe, trained from scratch (resumable; torchrun for many devices)."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import UserError
from ..train import CHECKPOINT, RESULT, build_model, final_line, load_recipe, recipe_to_yaml, train


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise UserError(f"put options such as {flags[0]} before the key=value overrides")
    if args.weights is not None:
        overrides.append(f"model.weights={args.weights}")
    recipe = load_recipe(args.recipe, overrides, variant=args.variant)
    if args.dry_run:
        model = build_model(recipe)
        n = sum(p.numel() for p in model.parameters())
        print(recipe_to_yaml(recipe), end="")
        print(f"# {recipe.name}: {recipe.model.source}, {n:,} parameters, output {recipe.output_dir}")
        return 0
    history = train(recipe, resume=args.resume, force=args.force, device=args.device, amp=args.amp,
                    stop_after_epoch=args.stop_after)
    if history and int(os.environ.get("RANK", "0")) == 0:
        result_path = os.path.join(recipe.output_dir, RESULT)
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as f:
                print(final_line(json.load(f), recipe.output_dir))
        else:  # stopped early (--stop-after)
            print(f"stopped after epoch {history[-1]['epoch']}/{recipe.epochs}; continue with --resume "
                  f"(checkpoint {os.path.join(recipe.output_dir, CHECKPOINT)})")
    return 0


def add_cli(subparsers) -> None:
    """Register ``xsurgery train``."""
    p = subparsers.add_parser("train", help="train a recipe from scratch (resumable; run under torchrun for many devices)")
    p.add_argument("recipe", help="recipe YAML file (recipes/<name>.yaml, or just <name>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=0.05 epochs=3")
    p.add_argument("--variant", default=None, help="one of the recipe file's variants (e.g. dense)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="dense weights loaded before the surgery (same as model.weights=FILE)")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    p.add_argument("--force", action="store_true", help="start over even if the output folder has a run")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch is saved (continue later with --resume)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the model size; do not train")
    p.set_defaults(func=_cmd_train)
    p.__class__ = intermixed(type(p))


def intermixed(base: type) -> type:
    """``base`` parser class that also takes ``key=value`` overrides given after options.

    argparse stops filling a ``nargs="*"`` positional at the first option, so
    ``train r.yaml a=1 --resume b=2`` would reject ``b=2``; here it joins the overrides.
    """

    class _TrainParser(base):
        def parse_known_args(self, args=None, namespace=None):
            ns, extras = super().parse_known_args(args, namespace)
            late = [e for e in extras if "=" in e and not e.startswith("-")]
            ns.overrides = list(getattr(ns, "overrides", None) or []) + late
            return ns, [e for e in extras if e not in late]

    return _TrainParser
