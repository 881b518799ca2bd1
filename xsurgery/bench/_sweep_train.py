"""The sweep's training phase: ``xsurgery train`` subprocesses, ``jobs`` at a time, resumable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from ._sweep_runs import SweepRun, finished, result, slug

__all__ = ["train_runs"]


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
    """``xsurgery train`` on the run's recipe in a subprocess (``--resume`` where an epoch finished)."""
    from .._util.io import write_text
    from ..train import STATE_JSON, Recipe, recipe_to_yaml

    recipes = os.path.join(out, "recipes")
    os.makedirs(recipes, exist_ok=True)
    path = os.path.join(recipes, f"{slug(run.variant.name)}-s{run.seed}.yaml")
    write_text(path, recipe_to_yaml(Recipe.from_dict(run.recipe)), force=True)
    cmd = [sys.executable, "-m", "xsurgery.cli", "train", path, "--device", device, "--quiet"]
    if os.path.isfile(os.path.join(run.folder, STATE_JSON)):
        cmd.append("--resume")  # continue from its last finished epoch
    elif os.path.isdir(run.folder) and os.listdir(run.folder):
        cmd.append("--force")  # the sweep's own folder, stopped before its first epoch: nothing to keep
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.monotonic()
    code, tail = children.run(cmd, env)
    return run, code, tail, time.monotonic() - t0


def train_runs(runs: list[SweepRun], out: str, jobs: int, threads: int, device: str,
               log: Callable[[str], None]) -> list[str]:
    """Train the unfinished runs, ``jobs`` at a time (``xsurgery train`` subprocesses of ``threads``
    threads, ``--resume`` where one started; a run that ``needs`` another starts once that one has
    finished); a line per finished run; the failures. Also the fine-tuning matrix's trainer
    (``tools/finetune_matrix.py``)."""
    from .._util.progress import Bar

    todo = [r for r in runs if not r.done]
    if len(todo) < len(runs):
        log(f"sweep: {len(runs) - len(todo)} of {len(runs)} runs already finished (skipped)")
    failures: list[str] = []
    children = _Children()
    pool = ThreadPoolExecutor(max(1, jobs))
    waiting = [r for r in todo if r.needs and not finished(r.needs)]  # start once the run they need is done
    running = {pool.submit(_train_one, r, out, threads, device, children) for r in todo if r not in waiting}
    try:
        with Bar(total=len(todo), desc="sweep: training") as bar:
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    run, code, tail, seconds = fut.result()
                    if code == 0 and run.done:
                        res = result(run)
                        log(f"sweep: {run.key} done in {seconds:.0f} s: test top-1 {100 * res['test_top1']:.2f}%")
                    else:
                        failures.append(f"{run.key}: {tail}")
                        log(f"sweep: {run.key} FAILED (exit {code}): {tail}")
                    bar.update(1, info=run.key)
                ready = [r for r in waiting if finished(r.needs)]
                waiting = [r for r in waiting if r not in ready]
                running |= {pool.submit(_train_one, r, out, threads, device, children) for r in ready}
            for r in waiting:  # what they start from failed
                failures.append(f"{r.key}: the run it starts from ({r.needs}) did not finish")
                log(f"sweep: {r.key} not trained: the run it starts from ({r.needs}) did not finish")
                bar.update(1, info=r.key)
    except BaseException:  # Ctrl-C, SIGTERM: no queued run starts, the running ones stop (resumable)
        children.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return failures
