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
import math
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .._util.progress import Board
from ..errors import UserError
from ._build import build_model, build_teacher, check_outputs, check_teacher, distill_loss
from ._distributed import Dist
from ._recipe import Recipe, ScheduleSpec, recipe_to_yaml
from ._results import best_epoch, checkpoint_writer, eval_loader, evaluate, write_result
from ._state import BEST, RECIPE_FILE, RESULT, STATE_JSON, Run, load_optim_state, set_rng_state, write_text

__all__ = ["build_model", "lr_at", "train"]

# fields that may change between a run and its --resume
RESUMABLE_CHANGES = ("epochs", "workers", "eval_batch_size", "output")

LossHook = Callable[[int, int, torch.Tensor], torch.Tensor]


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
    from .._util.io import read_limited
    from .._util.text import load_yaml

    if not os.path.isfile(run.recipe):
        return
    raw = read_limited(run.recipe, 1 << 20, "saved recipe")
    saved = load_yaml(raw.decode("utf-8", errors="replace"), f"saved recipe {run.recipe}") or {}
    if not isinstance(saved, dict):
        raise UserError(f"cannot resume {run.folder}: {RECIPE_FILE} is not a recipe mapping; start again with --force")
    now = recipe.to_dict()
    try:  # fields added since the run started hold their defaults
        saved = Recipe.from_dict(saved).to_dict()
    except (UserError, TypeError, ValueError):
        pass
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise UserError(f"cannot resume {run.folder}: the recipe changed in {', '.join(changed)} "
                        f"(only {', '.join(RESUMABLE_CHANGES)} may change); start again with --force")


def _open(recipe: Recipe, resume: bool, force: bool) -> tuple[Run, bool]:
    """Before any process group: the output folder may be written (and resumed) as asked;
    returns it and whether there is an epoch to resume from."""
    run = Run(recipe.output_dir)
    if resume and force:
        raise UserError("--resume and --force exclude each other")
    # rank 0 holds the folder's lock; the other ranks would see it as another run's
    run.check_folder(resume=resume, force=force, check_lock=int(os.environ.get("RANK", "0")) == 0)
    if resume and not run.has_checkpoint():
        if run.unfinished():  # killed before its first commit: --resume starts it from epoch 1
            print(f"xsurgery: {run.folder} has no finished epoch yet; starting from the first", file=sys.stderr)
            return run, False
        raise UserError(f"nothing to resume: {run.folder} has no finished epoch ({STATE_JSON})")
    if resume:
        _check_resume(recipe, run)
    return run, resume


class _Trainer:
    """The phases of one :func:`train` call and the state they share: :meth:`set_up`,
    :meth:`resume`, :meth:`prepare`, then :meth:`epoch` per epoch, then :meth:`finish`."""

    def __init__(self, recipe: Recipe, run: Run, dist: Dist, *, amp: bool, quiet: bool,
                 loss_hook: LossHook | None) -> None:
        self.recipe, self.run, self.dist, self.use_amp, self.loss_hook = recipe, run, dist, amp, loss_hook
        self.show = dist.main and not quiet
        self.bars = self.show and sys.stderr.isatty()
        self.amp_dtype = torch.float16 if dist.device.type == "cuda" else torch.bfloat16
        self.start_epoch, self.global_step, self.wall = 0, 0, 0.0
        self.history: list[dict[str, Any]] = []

    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def set_up(self, held: contextlib.ExitStack, force: bool) -> None:
        """Lock (and with ``force`` clear) the folder; datasets, model, optimizer, scaler."""
        from .data import build_splits

        recipe, run, dist = self.recipe, self.run, self.dist
        if dist.main:
            held.enter_context(run.lock(force=force, log=lambda m: print(m, file=sys.stderr)))
            if force:
                run.clear()
        if recipe.batch_size % dist.world:
            raise UserError(f"batch_size {recipe.batch_size} is not divisible by the {dist.world} processes")
        self.train_set, self.val_set, self.test_set, self.num_classes = build_splits(recipe.data, recipe.seed)
        # the set each epoch is scored on (and best.xs chosen by): validation, else test
        self.score_name, self.score_set = ("val", self.val_set) if self.val_set is not None else ("test", self.test_set)
        self.model = model = build_model(recipe).to(dist.device)
        check_outputs(model, self.test_set if len(self.test_set) else self.train_set, self.num_classes, recipe,
                       dist.device)
        self.teacher = build_teacher(recipe, dist.device)
        if self.teacher is not None:
            check_teacher(model, self.teacher, self.test_set if len(self.test_set) else self.train_set, dist.device)
        self.opt = torch.optim.SGD(model.parameters(), lr=recipe.optim.lr, momentum=recipe.optim.momentum,
                                   nesterov=recipe.optim.nesterov, weight_decay=recipe.optim.weight_decay)
        masks = getattr(model, "_xsurgery_masks", None)
        if masks:  # unstructured: masked-out weights stay zero after every step
            from ._masks import apply_masks

            self.opt.register_step_post_hook(lambda *_: apply_masks(model, masks))
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)

    def resume(self) -> bool:
        """Load the last finished epoch; True when training is over already (then finished)."""
        from ..checkpoint import load

        recipe, run = self.recipe, self.run
        record, tensors = run.load()
        self.model.load_state_dict(load(run.checkpoint).state_dict())
        load_optim_state(self.opt, tensors, record["optimizer"])
        if record.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(record["scaler"])
        set_rng_state(tensors, record["rng"])
        self.start_epoch, self.global_step, self.wall = record["epoch"], record["global_step"], record["wall_time_s"]
        self.history = record["history"]
        if self.start_epoch < recipe.epochs:
            return False
        if self.show:
            print(f"{run.folder}: already trained {self.start_epoch}/{recipe.epochs} epochs", file=sys.stderr)
        if not os.path.isfile(os.path.join(run.folder, RESULT)):
            self.finish(Board(quiet=True))
        return True

    def prepare(self, resume: bool) -> None:
        """The folder's recipe and outputs, the (DDP) network, the loaders, the opening line."""
        from torch.utils.data import DataLoader, DistributedSampler

        recipe, run, dist = self.recipe, self.run, self.dist
        if dist.main:
            os.makedirs(run.folder, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # a finished run given more epochs: no longer final
                os.unlink(os.path.join(run.folder, RESULT))
            write_text(run.recipe, recipe_to_yaml(recipe))
            if not resume and os.path.exists(run.metrics):
                os.unlink(run.metrics)
        self.net: nn.Module = self.model
        if dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

        per_rank = recipe.batch_size // dist.world
        self.sampler = DistributedSampler(self.train_set, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                          seed=recipe.seed, drop_last=False)
        pin = dist.device.type == "cuda"
        self.train_loader = DataLoader(self.train_set, per_rank, sampler=self.sampler, num_workers=recipe.workers,
                                       pin_memory=pin, drop_last=False)
        self.score_loader = eval_loader(self.score_set, recipe, dist, per_rank)
        self.steps = len(self.train_loader)
        if self.steps == 0:
            raise UserError("the training set is empty")
        if self.show:
            print(self._opening_line(), file=sys.stderr)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    def _opening_line(self) -> str:
        recipe, dist, sg = self.recipe, self.dist, self.recipe.surgery
        n_params = sum(p.numel() for p in self.model.parameters())
        what = "dense" if sg is None else (
            f"X ({f'compress {sg.compress:g}' if sg.compress else f'degree {sg.degree}'}, graph {sg.graph}"
            f"{', plan' if sg.plan else ''})")
        return (f"xsurgery train {recipe.name}: {recipe.model.source} {what}, {n_params:,} params, "
                f"{len(self.train_set)} train / {f'{len(self.val_set)} validation / ' if self.val_set is not None else ''}"
                f"{len(self.test_set)} test images, {dist.world} process(es) on "
                f"{dist.device.type}, output {self.run.folder}")

    def epoch(self, epoch: int, board: Board) -> None:
        """Train one epoch, score it, and (rank 0) commit it; every rank then meets at a barrier."""
        _seed_all(self.recipe.seed, epoch, self.dist.rank)
        self.sampler.set_epoch(epoch)
        self.net.train()
        t0 = time.perf_counter()
        seen, correct, loss_sum, lr = self._steps(epoch, board, t0)
        self._commit(epoch, board, t0, seen, correct, loss_sum, lr)
        self.dist.barrier()

    def _steps(self, epoch: int, board: Board, t0: float) -> tuple[float, float, float, float]:
        """The epoch's optimizer steps; returns this rank's images, correct ones, summed loss, last lr."""
        recipe, dist, steps, opt, scaler = self.recipe, self.dist, self.steps, self.opt, self.scaler
        seen = correct = loss_sum = 0.0
        self.parts = [0.0, 0.0]  # summed task and distillation losses (with a teacher)
        lr = recipe.optim.lr
        step_bar = board.track(self.train_loader, steps, f"epoch {epoch + 1}/{recipe.epochs}", leave=False)
        for step, (x, y) in enumerate(step_bar):
            lr = lr_at(recipe.optim.lr, recipe.schedule, recipe.epochs, epoch + (step + 1) / steps)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
            with self.autocast():
                logits = self.net(x)
                loss = task = self.criterion(logits.float(), y)
                if self.teacher is not None:
                    with torch.no_grad():
                        target = self.teacher(x).float()
                    kd = distill_loss(logits.float(), target, recipe.distill.temperature)
                    loss = (1 - recipe.distill.alpha) * task + recipe.distill.alpha * kd
                    self.parts[0] += task.item() * len(y)
                    self.parts[1] += kd.item() * len(y)
            if step == 0 and epoch == self.start_epoch and logits.shape[-1] < self.num_classes:
                raise UserError(f"the model has {logits.shape[-1]} outputs but {recipe.data.name} has "
                                f"{self.num_classes} classes; set model.kwargs.num_classes={self.num_classes}")
            if self.loss_hook is not None:
                loss = self.loss_hook(epoch + 1, step, loss)
            value = loss.item()
            bad = dist.all_sum([0.0 if math.isfinite(value) else 1.0])[0] if dist.enabled else float(not math.isfinite(value))
            if bad:
                done = len(self.history)
                kept = (f"the last good checkpoint is {self.run.checkpoint} (epoch {done})" if done
                        else "no checkpoint was written yet")
                raise UserError(f"loss became {value} at epoch {epoch + 1} step {step + 1}; training stopped and "
                                f"{kept}; lower optim.lr (now {lr:g}) or add schedule.warmup_epochs")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            self.global_step += 1
            n = len(y)
            seen += n
            loss_sum += value * n
            correct += (logits.detach().argmax(1) == y).sum().item()
            if self.bars:
                elapsed = time.perf_counter() - t0
                step_bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%",
                                     img_s=f"{seen * dist.world / max(elapsed, 1e-9):.0f}", lr=f"{lr:.3g}")
        return seen, correct, loss_sum, lr

    def _commit(self, epoch: int, board: Board, t0: float, seen: float, correct: float, loss_sum: float,
                lr: float) -> None:
        """Score the epoch, add it to the history and (rank 0) save it, ``best.xs`` when it is the best."""
        recipe, dist, score_name = self.recipe, self.dist, self.score_name
        train_time = time.perf_counter() - t0
        seen, correct, loss_sum, task_sum, kd_sum = dist.all_sum([seen, correct, loss_sum, *self.parts])
        # the bare model: shards may differ in batch count, and DDP's forward is a collective
        top1, top5, score_loss = evaluate(self.model, self.score_loader, dist, self.autocast, board, self.num_classes)
        epoch_time = time.perf_counter() - t0
        self.wall += epoch_time
        rec = {
            "epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
            f"{score_name}_top1": top1, f"{score_name}_top5": top5, f"{score_name}_loss": score_loss, "lr": lr,
            "images_per_s": seen / max(train_time, 1e-9), "epoch_time_s": epoch_time, "wall_time_s": self.wall,
        }
        if self.teacher is not None:
            rec.update(train_task_loss=task_sum / seen, train_distill_loss=kd_sum / seen)
        best = best_epoch(self.history, score_name)
        self.history.append(rec)
        if not dist.main:
            return
        scalars = {"epoch": epoch + 1, "global_step": self.global_step, "wall_time_s": self.wall}
        artifacts = {}
        if best is None or top1 > best[f"{score_name}_top1"]:  # ties keep the earlier epoch
            artifacts[BEST] = checkpoint_writer(self.model, epoch + 1, score_name, top1)
        self.run.save(self.model, self.opt, self.scaler, scalars, self.history, artifacts=artifacts)
        if self.show:
            parts = (f" (task {rec['train_task_loss']:.4f}, distill {rec['train_distill_loss']:.4f})"
                     if self.teacher is not None else "")
            line = (f"epoch {epoch + 1}/{recipe.epochs}  loss {rec['train_loss']:.4f}{parts}  train {100 * rec['train_acc']:.2f}%  "
                    f"{score_name} {100 * top1:.2f}% (top-5 {100 * top5:.2f}%){'  *best' if artifacts else ''}  "
                    f"lr {lr:.4g}  {rec['images_per_s']:.0f} img/s  {epoch_time:.1f}s")
            board.write(line)

    def finish(self, board: Board) -> dict[str, Any]:
        return write_result(self.recipe, self.run, self.history, self.score_name, self.test_set, self.dist, self.autocast,
                       board, self.num_classes)


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
    run, resume = _open(recipe, resume, force)
    dist = Dist(device)
    held = contextlib.ExitStack()
    try:
        t = _Trainer(recipe, run, dist, amp=amp, quiet=quiet, loss_hook=loss_hook)
        t.set_up(held, force)
        if resume and t.resume():
            return t.history
        t.prepare(resume)
        board = held.enter_context(Board(quiet=not t.bars))
        for epoch in board.track(range(t.start_epoch, recipe.epochs), recipe.epochs - t.start_epoch, "epochs"):
            t.epoch(epoch, board)
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        if len(t.history) >= recipe.epochs:
            t.finish(board)
        return t.history
    finally:
        held.close()
        dist.close()
