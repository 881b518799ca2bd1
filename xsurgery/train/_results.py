"""Scoring a training run: evaluation passes, the best epoch, ``best.xs`` and ``result.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._util.progress import Board
from ..errors import UserError
from ._distributed import Dist, ShardSampler
from ._recipe import Recipe
from ._state import BEST, CHECKPOINT, RESULT, Run, write_text

__all__ = ["best_epoch", "checkpoint_writer", "eval_loader", "evaluate", "final_line", "write_result"]


def evaluate(model, loader, dist: Dist, autocast, board: Board, num_classes: int) -> tuple[float, float, float]:
    model.eval()
    k = min(5, num_classes)
    total = correct1 = correct5 = loss_sum = 0.0
    with torch.no_grad():
        for x, y in board.track(loader, len(loader), "eval", leave=False):
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
            with autocast():
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            total += len(y)
    total, correct1, correct5, loss_sum = dist.all_sum([total, correct1, correct5, loss_sum])
    total = max(total, 1.0)
    return correct1 / total, correct5 / total, loss_sum / total


def eval_loader(dataset, recipe: Recipe, dist: Dist, per_rank: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, recipe.eval_batch_size or per_rank, sampler=ShardSampler(len(dataset), dist.rank, dist.world),
                      num_workers=recipe.workers, pin_memory=dist.device.type == "cuda")


def best_epoch(history: list[dict[str, Any]], score_name: str) -> dict[str, Any] | None:
    """The epoch record with the best ``<score_name>_top1`` (the first of equals)."""
    key = f"{score_name}_top1"
    scored = [h for h in history if key in h]
    return max(scored, key=lambda h: h[key]) if scored else None


def checkpoint_writer(model: nn.Module, epoch: int, score_name: str, top1: float) -> Callable[[str], None]:
    from ..checkpoint import save

    def write(path: str) -> None:
        save(model, path, force=True, extra={"epoch": epoch, f"{score_name}_top1": top1})

    return write


def write_result(recipe: Recipe, run: Run, history: list[dict[str, Any]], score_name: str, test_set, dist: Dist,
             autocast, board: Board, num_classes: int) -> dict[str, Any]:
    """After the last epoch: the test set, read once, scores ``best.xs``; ``result.json``.

    Without a validation split the epochs were scored on the test set already: the best of
    them is the result (selected on test, as the paper's CIFAR protocol; said in the file).
    """
    best = best_epoch(history, score_name)
    if best is None:
        raise UserError(f"{run.folder} has no scored epoch; start again with --force")
    result: dict[str, Any] = {"epochs": len(history), "best_epoch": best["epoch"], "selected_on": score_name,
                              "last_epoch_" + score_name + "_top1": history[-1][f"{score_name}_top1"]}
    if score_name == "val":
        from ..checkpoint import load

        # every rank reads the file rank 0 wrote (the epoch loop ends on a barrier)
        scorer = load(os.path.join(run.folder, BEST)).to(dist.device)
        per_rank = recipe.batch_size // dist.world
        top1, top5, loss = evaluate(scorer, eval_loader(test_set, recipe, dist, per_rank), dist, autocast, board,
                                     num_classes)
        result.update(best_val_top1=best["val_top1"], best_val_top5=best["val_top5"],
                      test_top1=top1, test_top5=top5, test_loss=loss, test_images=len(test_set))
    else:
        result.update(test_top1=best["test_top1"], test_top5=best["test_top5"], test_loss=best["test_loss"],
                      test_images=len(test_set))
    if recipe.distill is not None:  # the last epoch's two training losses and the distillation's settings
        result.update(distill={"alpha": recipe.distill.alpha, "temperature": recipe.distill.temperature},
                      train_task_loss=history[-1].get("train_task_loss"),
                      train_distill_loss=history[-1].get("train_distill_loss"))
    if dist.main:
        write_text(os.path.join(run.folder, RESULT), json.dumps(result, indent=1) + "\n")
    return result


def final_line(result: dict[str, Any], folder: str) -> str:
    """The run's last line for people: best validation and test accuracy, and where the models are."""
    where = f"{os.path.join(folder, BEST)} (epoch {result['best_epoch']}) and {os.path.join(folder, CHECKPOINT)}"
    if result.get("selected_on") == "val":
        return (f"done: best val top-1 {100 * result['best_val_top1']:.2f}% at epoch {result['best_epoch']}/"
                f"{result['epochs']}, test top-1 {100 * result['test_top1']:.2f}% (best.xs, {result['test_images']} "
                f"images, read once); models {where}")
    return (f"done: best test top-1 {100 * result['test_top1']:.2f}% at epoch {result['best_epoch']}/{result['epochs']} "
            f"(no validation split: selected on the test set; set data.val_size to hold one out); models {where}")
