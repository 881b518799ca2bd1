"""A training run's state on disk: checkpoint, optimizer/RNG state, metrics; no pickle.

Every file is written atomically; ``train_state.json`` is written last and records the
sha256 of the other two, so a kill while saving is detected on ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._errors import UserError

STATE_VERSION = 1
CHECKPOINT = "last.xs"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
METRICS = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"


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


class Run:
    """Paths and on-disk state of one output folder."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.checkpoint = os.path.join(folder, CHECKPOINT)
        self.tensors = os.path.join(folder, STATE_TENSORS)
        self.json = os.path.join(folder, STATE_JSON)
        self.metrics = os.path.join(folder, METRICS)
        self.recipe = os.path.join(folder, RECIPE_FILE)

    def has_checkpoint(self) -> bool:
        return any(os.path.exists(p) for p in (self.checkpoint, self.json))

    def save(self, model: nn.Module, opt, scaler, scalars: dict[str, Any], history: list[dict[str, Any]]) -> None:
        from safetensors.torch import save_file

        from .checkpoint import save

        tensors, opt_scalars = optim_state(opt)
        rng_tensors, rng_scalars = rng_state()
        tensors.update(rng_tensors)
        atomic_write(self.tensors, lambda tmp: save_file(tensors, tmp))
        save(model, self.checkpoint, force=True, extra={"epoch": scalars["epoch"]})
        # the JSON is written last and names the digests of the other two: a kill between the
        # writes leaves a mismatch that --resume reports instead of silently mixing epochs
        record = {
            "version": STATE_VERSION, **scalars, "optimizer": opt_scalars, "rng": rng_scalars,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "history": history,
            "sha256": {CHECKPOINT: sha256(self.checkpoint), STATE_TENSORS: sha256(self.tensors)},
        }
        write_text(self.json, json.dumps(record, indent=1))
        write_text(self.metrics, "".join(json.dumps(h) + "\n" for h in history))

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        for p in (self.checkpoint, self.tensors, self.json):
            if not os.path.isfile(p):
                raise UserError(f"cannot resume: {p} is missing; start again with --force")
        with open(self.json, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("version") != STATE_VERSION:
            raise UserError(f"{self.json} has state version {record.get('version')}; this xsurgery reads {STATE_VERSION}")
        for name, digest in record["sha256"].items():
            if sha256(os.path.join(self.folder, name)) != digest:
                raise UserError(f"cannot resume: {name} in {self.folder} does not match {STATE_JSON} "
                                f"(the run was killed while saving); start again with --force")
        return record, load_file(self.tensors)
