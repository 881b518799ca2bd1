"""Train a recipe from scratch: resumable, one process or many (``torchrun``).

``xsurgery train recipes/<name>.yaml [--variant V] [key=value ...] [--resume] [--device D] [--amp]``

Outputs, in the recipe's output folder (rank 0 writes, every file atomically):

* ``recipe.yaml``: the resolved recipe;
* ``last.xs``: the model after the last finished epoch (:func:`xsurgery.checkpoint.save`);
* ``best.xs``: the model of the epoch with the best validation top-1 (with no validation
  split, ``data.val_size: 0``, the best test top-1, as the paper's CIFAR protocol);
* ``result.json``: written once training is over: the best epoch, its validation accuracy and
  the test accuracy of ``best.xs``, measured once, at the end;
* ``train_state.json``: the commit point of the last finished epoch (scalars, metrics so far,
  the digests of the epoch's files kept in ``.xsurgery/epoch-N/``: the model and
  ``train_state.safetensors`` with optimizer tensors and RNG states); no pickle;
* ``metrics.jsonl``: one JSON line per epoch.

A kill at any instant leaves the last finished epoch intact (see :mod:`xsurgery.train._state`);
the folder is locked while a run writes it, and files the run did not write are refused
without ``--force`` (and never deleted).

Determinism: every epoch reseeds torch/numpy/python from (seed, epoch, rank) and the sampler
from (seed, epoch), so a resumed run repeats an uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._util.progress import Board
from ..errors import UserError
from ._distributed import Dist, ShardSampler
from ._recipe import Recipe, ScheduleSpec, recipe_to_yaml
from ._state import BEST, CHECKPOINT, RESULT, STATE_JSON, Run, load_optim_state, set_rng_state, write_text

__all__ = ["build_model", "final_line", "lr_at", "train"]

# fields that may change between a run and its --resume
RESUMABLE_CHANGES = ("epochs", "workers", "eval_batch_size", "output")

LossHook = Callable[[int, int, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------ model


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's model: created from its source, converted unless ``surgery`` is None.

    Seeded from ``recipe.seed`` so that every process (and every resume) builds the same one.
    """
    from ..models import create_model
    from ..surgery import convert

    torch.manual_seed(recipe.seed)
    m = recipe.model
    if recipe.surgery is None:
        model = create_model(m.source, dict(m.kwargs), m.pretrained)
        model._xsurgery_input_size = list(recipe.data.input_size)
        return model
    s = recipe.surgery.to_dict()
    s.pop("version", None)
    model, _ = convert(m.source, model_kwargs=dict(m.kwargs), pretrained=m.pretrained,
                       input_size=tuple(recipe.data.input_size), **s)
    return model


def lr_at(base_lr: float, sched: ScheduleSpec, epochs: int, progress: float) -> float:
    """Learning rate at ``progress`` epochs (fractional) into training."""
    if sched.warmup_epochs > 0 and progress < sched.warmup_epochs:
        return base_lr * progress / sched.warmup_epochs
    if sched.name == "constant":
        return base_lr
    if sched.name == "step":
        drops = sum(1 for m in sched.milestones if int(progress) >= m)
        return max(sched.min_lr, base_lr * sched.gamma**drops)
    span = max(epochs - sched.warmup_epochs, 1e-12)
    t = min(max((progress - sched.warmup_epochs) / span, 0.0), 1.0)
    return sched.min_lr + (base_lr - sched.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- training


def _seed_all(seed: int, epoch: int, rank: int) -> None:
    s = int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).digest()[:4], "little")
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)




def _check_resume(recipe: Recipe, run: Run) -> None:
    import yaml

    if not os.path.isfile(run.recipe):
        return
    with open(run.recipe, encoding="utf-8") as f:
        saved = yaml.safe_load(f) or {}
    now = recipe.to_dict()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise UserError(f"cannot resume {run.folder}: the recipe changed in {', '.join(changed)} "
                        f"(only {', '.join(RESUMABLE_CHANGES)} may change); start again with --force")


@torch.no_grad()
def _check_outputs(model: nn.Module, dataset, num_classes: int, recipe: Recipe, device) -> None:
    """Before any step: the model must have an output per class of the dataset."""
    if not len(dataset):
        return
    x = dataset[0][0]
    was = model.training
    model.eval()
    try:
        out = model(x[None].to(device))
    except Exception as exc:
        raise UserError(f"the model does not run on the data's input {list(x.shape)} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); check data.input_size and "
                        f"model.kwargs") from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError(f"the model must return [batch, classes] logits, got {getattr(out, 'shape', type(out).__name__)}")
    if out.shape[-1] < num_classes:
        raise UserError(f"the model has {out.shape[-1]} outputs but {recipe.data.name} has {num_classes} classes; "
                        f"set model.kwargs.num_classes={num_classes}")


def _evaluate(model, loader, dist: Dist, autocast, board: Board, num_classes: int) -> tuple[float, float, float]:
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


def _eval_loader(dataset, recipe: Recipe, dist: Dist, per_rank: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, recipe.eval_batch_size or per_rank, sampler=ShardSampler(len(dataset), dist.rank, dist.world),
                      num_workers=recipe.workers, pin_memory=dist.device.type == "cuda")


def _best(history: list[dict[str, Any]], score_name: str) -> dict[str, Any] | None:
    """The epoch record with the best ``<score_name>_top1`` (the first of equals)."""
    key = f"{score_name}_top1"
    scored = [h for h in history if key in h]
    return max(scored, key=lambda h: h[key]) if scored else None


def _checkpoint_writer(model: nn.Module, epoch: int, score_name: str, top1: float) -> Callable[[str], None]:
    from ..checkpoint import save

    def write(path: str) -> None:
        save(model, path, force=True, extra={"epoch": epoch, f"{score_name}_top1": top1})

    return write


def _finish(recipe: Recipe, run: Run, history: list[dict[str, Any]], score_name: str, test_set, dist: Dist,
             autocast, board: Board, num_classes: int) -> dict[str, Any]:
    """After the last epoch: the test set, read once, scores ``best.xs``; ``result.json``.

    Without a validation split the epochs were scored on the test set already: the best of
    them is the result (selected on test, as the paper's CIFAR protocol; said in the file).
    """
    best = _best(history, score_name)
    if best is None:
        raise UserError(f"{run.folder} has no scored epoch; start again with --force")
    result: dict[str, Any] = {"epochs": len(history), "best_epoch": best["epoch"], "selected_on": score_name,
                              "last_epoch_" + score_name + "_top1": history[-1][f"{score_name}_top1"]}
    if score_name == "val":
        from ..checkpoint import load

        # every rank reads the file rank 0 wrote (the epoch loop ends on a barrier)
        scorer = load(os.path.join(run.folder, BEST)).to(dist.device)
        per_rank = recipe.batch_size // dist.world
        top1, top5, loss = _evaluate(scorer, _eval_loader(test_set, recipe, dist, per_rank), dist, autocast, board,
                                     num_classes)
        result.update(best_val_top1=best["val_top1"], best_val_top5=best["val_top5"],
                      test_top1=top1, test_top5=top5, test_loss=loss, test_images=len(test_set))
    else:
        result.update(test_top1=best["test_top1"], test_top5=best["test_top5"], test_loss=best["test_loss"],
                      test_images=len(test_set))
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


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    amp: bool = False,
    stop_after_epoch: int | None = None,
    loss_hook: LossHook | None = None,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Train ``recipe``; returns the metrics of every epoch so far (resumed ones included).

    Args:
        recipe: the resolved recipe.
        resume: continue from the output folder's checkpoint.
        force: start over even if the output folder has a checkpoint.
        device: ``auto`` (default: CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: mixed precision (float16 + loss scaling on CUDA, bfloat16 on CPU).
        stop_after_epoch: stop once this epoch (1-based) is saved, as if killed there.
        loss_hook: test hook ``(epoch, step, loss) -> loss`` applied to every training loss.
        quiet: no progress bars or epoch lines.

    Raises:
        UserError: bad set-up, existing outputs, or a non-finite loss (the last good
            checkpoint is kept).
    """
    from torch.utils.data import DataLoader, DistributedSampler

    from .data import build_splits

    run = Run(recipe.output_dir)
    if resume and force:
        raise UserError("--resume and --force exclude each other")
    # rank 0 holds the folder's lock; the other ranks would see it as another run's
    run.check_folder(resume=resume, force=force, check_lock=int(os.environ.get("RANK", "0")) == 0)
    if resume and not run.has_checkpoint():
        raise UserError(f"nothing to resume: {run.folder} has no finished epoch ({STATE_JSON})")
    if resume:
        _check_resume(recipe, run)

    dist = Dist(device)
    held = contextlib.ExitStack()
    try:
        if dist.main:
            held.enter_context(run.lock(force=force, log=lambda m: print(m, file=sys.stderr)))
            if force:
                run.clear()
        if recipe.batch_size % dist.world:
            raise UserError(f"batch_size {recipe.batch_size} is not divisible by the {dist.world} processes")
        show = dist.main and not quiet
        bars = show and sys.stderr.isatty()
        train_set, val_set, test_set, num_classes = build_splits(recipe.data, recipe.seed)
        # the set each epoch is scored on (and best.xs chosen by): validation, else test
        score_name, score_set = ("val", val_set) if val_set is not None else ("test", test_set)
        model = build_model(recipe).to(dist.device)
        _check_outputs(model, test_set if len(test_set) else train_set, num_classes, recipe, dist.device)
        opt = torch.optim.SGD(model.parameters(), lr=recipe.optim.lr, momentum=recipe.optim.momentum,
                              nesterov=recipe.optim.nesterov, weight_decay=recipe.optim.weight_decay)
        use_amp = amp
        amp_dtype = torch.float16 if dist.device.type == "cuda" else torch.bfloat16
        scaler = torch.amp.GradScaler(dist.device.type, enabled=use_amp and amp_dtype == torch.float16)

        def autocast():
            return torch.autocast(dist.device.type, dtype=amp_dtype, enabled=use_amp)

        start_epoch, global_step, wall, history = 0, 0, 0.0, []
        if resume:
            from ..checkpoint import load

            record, tensors = run.load()
            model.load_state_dict(load(run.checkpoint).state_dict())
            load_optim_state(opt, tensors, record["optimizer"])
            if record.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(record["scaler"])
            set_rng_state(tensors, record["rng"])
            start_epoch, global_step, wall = record["epoch"], record["global_step"], record["wall_time_s"]
            history = record["history"]
            if start_epoch >= recipe.epochs:
                if show:
                    print(f"{run.folder}: already trained {start_epoch}/{recipe.epochs} epochs", file=sys.stderr)
                if not os.path.isfile(os.path.join(run.folder, RESULT)):
                    _finish(recipe, run, history, score_name, test_set, dist, autocast, Board(quiet=True), num_classes)
                return history

        if dist.main:
            os.makedirs(run.folder, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # a finished run given more epochs: no longer final
                os.unlink(os.path.join(run.folder, RESULT))
            write_text(run.recipe, recipe_to_yaml(recipe))
            if not resume and os.path.exists(run.metrics):
                os.unlink(run.metrics)
        net: nn.Module = model
        if dist.enabled:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

        per_rank = recipe.batch_size // dist.world
        sampler = DistributedSampler(train_set, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                     seed=recipe.seed, drop_last=False)
        pin = dist.device.type == "cuda"
        train_loader = DataLoader(train_set, per_rank, sampler=sampler, num_workers=recipe.workers,
                                  pin_memory=pin, drop_last=False)
        score_loader = _eval_loader(score_set, recipe, dist, per_rank)
        steps = len(train_loader)
        if steps == 0:
            raise UserError("the training set is empty")
        if show:
            n_params = sum(p.numel() for p in model.parameters())
            sg = recipe.surgery
            what = "dense" if sg is None else (
                f"X ({f'compress {sg.compress:g}' if sg.compress else f'degree {sg.degree}'}, graph {sg.graph}"
                f"{', plan' if sg.plan else ''})")
            print(f"xsurgery train {recipe.name}: {recipe.model.source} {what}, {n_params:,} params, "
                  f"{len(train_set)} train / {f'{len(val_set)} validation / ' if val_set is not None else ''}"
                  f"{len(test_set)} test images, {dist.world} process(es) on "
                  f"{dist.device.type}, output {run.folder}", file=sys.stderr)
        criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

        board = held.enter_context(Board(quiet=not bars))
        epoch_bar = board.track(range(start_epoch, recipe.epochs), recipe.epochs - start_epoch, "epochs")
        for epoch in epoch_bar:
            _seed_all(recipe.seed, epoch, dist.rank)
            sampler.set_epoch(epoch)
            net.train()
            t0 = time.perf_counter()
            seen = correct = loss_sum = 0.0
            lr = recipe.optim.lr
            step_bar = board.track(train_loader, steps, f"epoch {epoch + 1}/{recipe.epochs}", leave=False)
            for step, (x, y) in enumerate(step_bar):
                lr = lr_at(recipe.optim.lr, recipe.schedule, recipe.epochs, epoch + (step + 1) / steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
                with autocast():
                    logits = net(x)
                    loss = criterion(logits.float(), y)
                if step == 0 and epoch == start_epoch and logits.shape[-1] < num_classes:
                    raise UserError(f"the model has {logits.shape[-1]} outputs but {recipe.data.name} has "
                                    f"{num_classes} classes; set model.kwargs.num_classes={num_classes}")
                if loss_hook is not None:
                    loss = loss_hook(epoch + 1, step, loss)
                value = loss.item()
                bad = dist.all_sum([0.0 if math.isfinite(value) else 1.0])[0] if dist.enabled else float(not math.isfinite(value))
                if bad:
                    done = len(history)
                    kept = (f"the last good checkpoint is {run.checkpoint} (epoch {done})" if done
                            else "no checkpoint was written yet")
                    raise UserError(f"loss became {value} at epoch {epoch + 1} step {step + 1}; training stopped and "
                                    f"{kept}; lower optim.lr (now {lr:g}) or add schedule.warmup_epochs")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                global_step += 1
                n = len(y)
                seen += n
                loss_sum += value * n
                correct += (logits.detach().argmax(1) == y).sum().item()
                if bars:
                    elapsed = time.perf_counter() - t0
                    step_bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%",
                                         img_s=f"{seen * dist.world / max(elapsed, 1e-9):.0f}", lr=f"{lr:.3g}")
            train_time = time.perf_counter() - t0
            seen, correct, loss_sum = dist.all_sum([seen, correct, loss_sum])
            # the bare model: shards may differ in batch count, and DDP's forward is a collective
            top1, top5, score_loss = _evaluate(model, score_loader, dist, autocast, board, num_classes)
            epoch_time = time.perf_counter() - t0
            wall += epoch_time
            rec = {
                "epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                f"{score_name}_top1": top1, f"{score_name}_top5": top5, f"{score_name}_loss": score_loss, "lr": lr,
                "images_per_s": seen / max(train_time, 1e-9), "epoch_time_s": epoch_time, "wall_time_s": wall,
            }
            best = _best(history, score_name)
            history.append(rec)
            if dist.main:
                scalars = {"epoch": epoch + 1, "global_step": global_step, "wall_time_s": wall}
                artifacts = {}
                if best is None or top1 > best[f"{score_name}_top1"]:  # ties keep the earlier epoch
                    artifacts[BEST] = _checkpoint_writer(model, epoch + 1, score_name, top1)
                run.save(model, opt, scaler, scalars, history, artifacts=artifacts)
                if show:
                    line = (f"epoch {epoch + 1}/{recipe.epochs}  loss {rec['train_loss']:.4f}  train {100 * rec['train_acc']:.2f}%  "
                            f"{score_name} {100 * top1:.2f}% (top-5 {100 * top5:.2f}%){'  *best' if artifacts else ''}  "
                            f"lr {lr:.4g}  {rec['images_per_s']:.0f} img/s  {epoch_time:.1f}s")
                    board.write(line)
            dist.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        if len(history) >= recipe.epochs:
            _finish(recipe, run, history, score_name, test_set, dist, autocast, board, num_classes)
        return history
    finally:
        held.close()
        dist.close()


# -------------------------------------------------------------------------------- CLI
