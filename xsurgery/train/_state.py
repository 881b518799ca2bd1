"""A training run's state on disk: checkpoint, optimizer/RNG state, metrics; no pickle.

One commit point per save, so a kill at any instant loses at most the epoch being saved:

1. every file of epoch N (``last.xs``, ``train_state.safetensors``, any extra artifact such
   as ``best.xs``) is written, each atomically, into a fresh stage folder
   ``.xsurgery/epoch-000N/``; artifacts not rewritten this epoch are hard-linked from the
   previous stage;
2. **commit**: ``train_state.json`` (scalars, history, the stage's name and the sha256 of
   each of its files) atomically replaces the previous one;
3. publish: the stage's files are hard-linked over the top-level names (``last.xs``, ...),
   ``metrics.jsonl`` is rewritten, and older stages are removed.

``--resume`` reads only ``train_state.json`` and the stage it names (checking every digest),
re-publishes it (a kill during step 3 is repaired) and removes uncommitted stages. The folder
is locked while a run writes it (``.xsurgery/lock``: pid and host).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .._util import io as _io
from ..errors import UserError
from ._lock import LOCK, FolderLock

STATE_VERSION = 2
CHECKPOINT = "last.xs"
BEST = "best.xs"  # the best-scored epoch's model (an artifact of save())
RESULT = "result.json"  # written once training is over (best epoch, test accuracy)
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
METRICS = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
PRIVATE = ".xsurgery"
_STAGE = re.compile(r"epoch-\d{4,}")
# top-level names a run writes; anything else in the folder is not the run's
RUN_FILES = {CHECKPOINT, STATE_JSON, METRICS, RECIPE_FILE, PRIVATE, BEST, RESULT}


def write_text(path: str, text: str) -> None:
    _io.write_text(path, text, force=True)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, pystate, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(pystate, dtype=torch.int64)
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, gauss_next]}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = scalars["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, gauss_next = scalars["python"]
    random.setstate((version, tuple(int(v) for v in tensors["rng.python"].tolist()), gauss_next))


def optim_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state split into tensors (for safetensors) and JSON scalars."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, entry in sd["state"].items():
        plain = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain[k] = v
        scalars["state"][str(pid)] = plain
    return tensors, scalars


def load_optim_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in scalars["state"].items()}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


class Run(FolderLock):
    """Paths and on-disk state of one output folder (see the module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.checkpoint = os.path.join(folder, CHECKPOINT)
        self.json = os.path.join(folder, STATE_JSON)
        self.metrics = os.path.join(folder, METRICS)
        self.recipe = os.path.join(folder, RECIPE_FILE)
        self.private = os.path.join(folder, PRIVATE)
        self.lock_path = os.path.join(self.private, LOCK)
        self._locked = False

    # ------------------------------------------------------------------ folder and lock

    def has_checkpoint(self) -> bool:
        return os.path.isfile(self.json)

    def unfinished(self) -> bool:
        """The folder holds only the traces of a run killed before its first epoch was
        committed (its private folder, maybe its ``recipe.yaml``): nothing a run must keep."""
        if not os.path.isdir(self.private) or self.has_checkpoint():
            return False
        entries = {e for e in os.listdir(self.folder) if not e.startswith(_io.TMP_PREFIX)}
        return entries <= {PRIVATE, RECIPE_FILE}

    def check_folder(self, *, resume: bool, force: bool, check_lock: bool = True) -> None:
        """Refuse an output that is a file, a folder another live run writes, or (without
        ``force``) a folder holding files this run did not write."""
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise UserError(f"output {self.folder} is a file; set output= to a folder")
        if check_lock:
            self._check_lock(force=force)
        if resume or force or not os.path.isdir(self.folder):
            return
        # our own temp files (a killed write) and a private folder without a committed epoch
        # (a run that stopped during set-up) hold nothing to keep
        if self.unfinished():
            return  # a run that stopped before its first commit: nothing to keep, start over
        entries = sorted(e for e in os.listdir(self.folder) if not e.startswith(_io.TMP_PREFIX))
        if PRIVATE in entries and not self.has_checkpoint():
            entries.remove(PRIVATE)
        foreign = [e for e in entries if e not in RUN_FILES]
        if foreign:
            raise UserError(f"output folder {self.folder} holds files this run did not write "
                            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose an empty "
                            f"folder or pass --force (those files are kept)")
        if self.has_checkpoint():
            raise UserError(f"{self.folder} already holds a run ({STATE_JSON}); pass --resume to continue it "
                            f"or --force to start over")
        if entries:
            raise UserError(f"{self.folder} holds an unfinished run or another run's files "
                            f"({', '.join(entries[:3])}); pass --force to start over")

    def remove_temp_files(self) -> None:
        """Temp files of a killed write (ours by prefix; the lock says no other run writes here)."""
        for folder in (self.folder, self.private):
            with contextlib.suppress(OSError):
                for entry in os.listdir(folder):
                    if entry.startswith(_io.TMP_PREFIX):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(folder, entry))

    def clear(self) -> None:
        """--force: remove what a run writes (files this run did not write stay)."""
        for name in (CHECKPOINT, STATE_JSON, METRICS, BEST, RESULT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.folder, name))
        if os.path.isdir(self.private):
            for entry in os.listdir(self.private):
                if _STAGE.fullmatch(entry):
                    shutil.rmtree(os.path.join(self.private, entry), ignore_errors=True)

    # --------------------------------------------------------------------- save / load

    def _stage(self, name: str) -> str:
        return os.path.join(self.private, name)

    def _committed(self) -> dict[str, Any] | None:
        if not os.path.isfile(self.json):
            return None
        try:
            with open(self.json, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot resume: {self.json} is unreadable ({type(exc).__name__}); "
                            f"start again with --force") from exc
        if not isinstance(record, dict) or record.get("version") != STATE_VERSION:
            version = record.get("version") if isinstance(record, dict) else None
            raise UserError(f"{self.json} has state version {version}; this xsurgery reads {STATE_VERSION}; "
                            f"start again with --force")
        if not _STAGE.fullmatch(str(record.get("stage"))) or not isinstance(record.get("files"), dict):
            raise UserError(f"cannot resume: {self.json} names no valid stage; start again with --force")
        return record

    def save(self, model: nn.Module, opt, scaler, scalars: dict[str, Any], history: list[dict[str, Any]],
             artifacts: dict[str, Callable[[str], None]] | None = None) -> None:
        """Save one epoch with a single commit point.

        Args:
            artifacts: extra top-level files of this epoch, name -> ``write(path)`` (e.g.
                ``{"best.xs": lambda p: save(best, p, force=True)}``); an artifact of an earlier
                epoch that is not passed again is carried over unchanged.
        """
        try:
            self._save(model, opt, scaler, scalars, history, artifacts)
        except OSError as exc:  # e.g. removing an old stage on a disk that just failed: one line
            raise _io.os_error(exc.filename or self.folder, exc) from exc

    def _save(self, model, opt, scaler, scalars, history, artifacts) -> None:
        from ..checkpoint import save

        previous = self._committed()
        stage_name = f"epoch-{int(scalars['epoch']):04d}"
        stage = self._stage(stage_name)
        if previous is not None and previous["stage"] == stage_name:
            raise RuntimeError(f"epoch {scalars['epoch']} is already committed")
        shutil.rmtree(stage, ignore_errors=True)  # an uncommitted attempt
        try:
            os.makedirs(stage)
        except OSError as exc:
            raise _io.os_error(stage, exc) from exc
        tensors, opt_scalars = optim_state(opt)
        rng_tensors, rng_scalars = rng_state()
        tensors.update(rng_tensors)
        _io.write_safetensors(os.path.join(stage, STATE_TENSORS), tensors, force=True)
        save(model, os.path.join(stage, CHECKPOINT), force=True, extra={"epoch": scalars["epoch"]})
        for name, write in (artifacts or {}).items():
            if name not in RUN_FILES or name in (STATE_JSON, METRICS, RECIPE_FILE, PRIVATE, CHECKPOINT, RESULT):
                raise ValueError(f"artifact {name!r} is not one of the run's file names {sorted(RUN_FILES)}")
            _io.write_atomic(os.path.join(stage, name), write, force=True)
        if previous is not None:  # carry over artifacts this epoch did not rewrite
            for name in previous["files"]:
                target = os.path.join(stage, name)
                if not os.path.exists(target):
                    _io.link_atomic(os.path.join(self._stage(previous["stage"]), name), target)
        files = {name: sha256(os.path.join(stage, name)) for name in sorted(os.listdir(stage))
                 if not name.startswith(_io.TMP_PREFIX)}
        record = {
            "version": STATE_VERSION, **scalars, "optimizer": opt_scalars, "rng": rng_scalars,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "history": history, "stage": stage_name, "files": files,
        }
        _io.write_text(self.json, json.dumps(record, indent=1), force=True)  # the commit point
        self._publish(record)

    def _publish(self, record: dict[str, Any]) -> None:
        """Top-level names from the committed stage; older stages removed (idempotent)."""
        stage = self._stage(record["stage"])
        for name in record["files"]:
            if name != STATE_TENSORS:
                _io.link_atomic(os.path.join(stage, name), os.path.join(self.folder, name))
        _io.write_text(self.metrics, "".join(json.dumps(h) + "\n" for h in record["history"]), force=True)
        for entry in os.listdir(self.private):
            if _STAGE.fullmatch(entry) and entry != record["stage"]:
                shutil.rmtree(self._stage(entry), ignore_errors=True)

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The last committed state (digests checked), re-published."""
        from safetensors.torch import load_file

        record = self._committed()
        if record is None:
            raise UserError(f"nothing to resume: {self.folder} has no finished epoch ({STATE_JSON})")
        stage = self._stage(record["stage"])
        for name, digest in record["files"].items():
            p = os.path.join(stage, name)
            if os.path.basename(name) != name or not os.path.isfile(p):
                raise UserError(f"cannot resume: {p} is missing; start again with --force")
            if sha256(p) != digest:
                raise UserError(f"cannot resume: {name} in {stage} does not match {STATE_JSON} "
                                f"(the file was altered); start again with --force")
        self._publish(record)
        return record, load_file(os.path.join(stage, STATE_TENSORS))
