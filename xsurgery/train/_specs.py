"""Training recipes as typed specs: a frozen dataclass tree that round-trips to a plain dict.

:meth:`Recipe.from_dict` types and validates a plain mapping (from YAML) by the dataclass
fields; :meth:`Recipe.to_dict` writes it back. The data spec, :class:`DataSpec`, lives with
the datasets (:mod:`xsurgery.train.data`); files and overrides are :mod:`._recipe`'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from .._util.text import safe_repr
from ..errors import UserError
from .data import DataSpec

__all__ = ["RECIPE_VERSION", "DataSpec", "DistillSpec", "ModelSpec", "OptimSpec", "PruneSpec", "Recipe", "ScheduleSpec",
           "TeacherSpec"]

RECIPE_VERSION = 1
SCHEDULES = ("step", "cosine", "constant")


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from (see :func:`xsurgery.models.sources.create_model`); ``weights``:
    a local file of dense weights (safetensors, a dense run's ``best.xs``, or a torch file read
    with ``weights_only=True``) loaded before the surgery."""

    source: str = "digits_cnn"
    kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None


@dataclass(frozen=True)
class TeacherSpec:
    """The dense model to distil from: an xsurgery ``checkpoint`` (e.g. a dense run's ``best.xs``;
    a recipe's ``teacher: path`` means this), or a ``source`` with its ``kwargs`` and ``weights``."""

    checkpoint: str | None = None
    source: str | None = None
    kwargs: dict = field(default_factory=dict)
    weights: str | None = None

    def __post_init__(self) -> None:
        if bool(self.checkpoint) == bool(self.source):
            raise UserError("teacher: give a checkpoint path (teacher: runs/dense/best.xs) or "
                            "{source, kwargs, weights}, not both or neither")
        if self.checkpoint and (self.kwargs or self.weights):
            raise UserError("teacher: a checkpoint carries its own model and weights; drop teacher.kwargs/weights")


@dataclass(frozen=True)
class DistillSpec:
    """Distillation from the teacher: ``loss = (1 - alpha) * task + alpha * T^2 * KL(softmax(t/T) ||
    softmax(s/T))`` (see :mod:`xsurgery.train._build`)."""

    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise UserError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise UserError(f"distill.temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class OptimSpec:
    """SGD with (Nesterov) momentum; weight decay on every parameter, as the paper's code."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.name != "sgd":
            raise UserError(f"optim.name {safe_repr(self.name)} is not supported; use sgd")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0:
            raise UserError("optim.lr must be > 0 and optim.momentum, optim.weight_decay >= 0")
        if self.nesterov and self.momentum == 0:
            raise UserError("optim.nesterov needs optim.momentum > 0")


@dataclass(frozen=True)
class ScheduleSpec:
    """Learning-rate schedule, evaluated at every step.

    Attributes:
        name: ``step`` (multiply by ``gamma`` at each epoch in ``milestones``), ``cosine``
            (from ``optim.lr`` to ``min_lr``) or ``constant``.
        milestones: epochs (0-based: the epoch index from which the new rate holds).
        gamma: step factor.
        warmup_epochs: linear warm-up length (may be fractional); 0 = none.
        min_lr: floor of the step schedule, end point of the cosine one.
    """

    name: str = "step"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise UserError(f"schedule.name {safe_repr(self.name)} is not one of {', '.join(SCHEDULES)}")
        if list(self.milestones) != sorted(self.milestones):
            raise UserError(f"schedule.milestones must be increasing, got {list(self.milestones)}")
        if self.warmup_epochs < 0 or self.min_lr < 0 or self.gamma <= 0:
            raise UserError("schedule.warmup_epochs, schedule.min_lr must be >= 0 and schedule.gamma > 0")


@dataclass(frozen=True)
class PruneSpec:
    """Prune the (dense, loaded) model to a MACs budget before training: Torch-Pruning's L2
    magnitude pruner, one ratio for every layer, the classifier kept (``round_to``: widths a
    multiple of it). With the dense weights of a trained run this is prune + fine-tune."""

    target_macs: int = 0
    round_to: int | None = None

    def __post_init__(self) -> None:
        if self.target_macs < 1:
            raise UserError("prune.target_macs must be a positive number of MACs")
        if self.round_to is not None and self.round_to < 1:
            raise UserError("prune.round_to must be >= 1 or null")


def _surgery_type():
    from ..surgery import SurgerySpec

    return SurgerySpec


@dataclass(frozen=True)
class Recipe:
    """Everything a training run needs; ``surgery: None`` is the dense baseline.

    ``prune`` prunes the dense model to a MACs budget instead of converting it (no ``surgery``).
    ``unstructured: true`` keeps the layers the surgery selects dense and trains them masked:
    each keeps a seeded random set of its weights, as many as its X-layer would have (the
    unstructured reference of the literature; the saved model is dense with zeros).

    ``surgery`` holds a :class:`xsurgery.surgery.SurgerySpec` (the keyword arguments of
    :func:`xsurgery.convert`). ``batch_size`` is global: it is split evenly across processes
    under ``torchrun``. ``output`` defaults to ``runs/<name>``.
    """

    name: str = "run"
    model: ModelSpec = field(default_factory=ModelSpec)
    surgery: Any = None
    prune: PruneSpec | None = None
    unstructured: bool = False
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int | None = None
    workers: int = 0
    seed: int = 0
    label_smoothing: float = 0.0
    output: str = ""
    calibration_batches: int = 8
    teacher: TeacherSpec | None = None
    distill: DistillSpec | None = None
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise UserError(f"recipe version {self.version} is not supported (this xsurgery reads {RECIPE_VERSION})")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0:
            raise UserError("epochs and batch_size must be >= 1 and workers >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.prune is not None and self.surgery is not None:
            raise UserError("a recipe prunes (prune:) or converts (surgery:), not both; set surgery: null")
        if self.unstructured and self.surgery is None:
            raise UserError("unstructured: true takes its layers and densities from surgery:; give one")
        if self.calibration_batches < 1:
            raise UserError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.distill is not None and self.teacher is None:
            raise UserError("distill needs a teacher: set teacher: PATH.xs (or {source, kwargs, weights})")
        if self.teacher is not None and self.distill is None:
            object.__setattr__(self, "distill", DistillSpec())  # the defaults: alpha 0.5, temperature 4

    @property
    def output_dir(self) -> str:
        return self.output or os.path.join("runs", self.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) that :meth:`from_dict` reads back."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """Typed and validated; unknown keys raise a :class:`UserError` naming the valid ones.
        ``teacher: PATH`` is short for ``teacher: {checkpoint: PATH}``."""
        if isinstance(d, dict) and isinstance(d.get("teacher"), str) and d["teacher"].lower() not in ("none", "null"):
            d = {**d, "teacher": {"checkpoint": d["teacher"]}}
        return _build(cls, d, "")

    def calibration_data(self, batches: int | None = None) -> list:
        """Batches for ``init="project"``: ``batches`` (default ``calibration_batches``) batches of
        ``batch_size`` images of the training split (validation images excluded), a random subset
        drawn with ``seed``, with the training transform; the global RNG is left as it was."""
        import torch

        from .data import build_splits

        n = self.calibration_batches if batches is None else batches
        if n < 1:
            raise UserError(f"calibration_batches must be >= 1, got {n}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            train = build_splits(self.data, self.seed).train
            if not len(train):
                raise UserError("the training split is empty: no calibration data for surgery.init: project")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            take = order[:n * self.batch_size]
            return [torch.stack([train[i][0] for i in take[j:j + self.batch_size]])
                    for j in range(0, len(take), self.batch_size)]


def _to_plain(obj: Any) -> Any:
    if hasattr(obj, "to_dict") and not isinstance(obj, Recipe):
        return _to_plain(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    if cls is Recipe:
        hints["surgery"] = _surgery_type() | None
    return hints


def _where(path: str) -> str:
    return path.rstrip(".") or "recipe"


def _build(cls: type, d: Any, path: str) -> Any:
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise UserError(f"{_where(path)} must be a mapping, got {safe_repr(d)}")
    if hasattr(cls, "from_dict") and cls is not Recipe:  # SurgerySpec validates itself
        try:
            return cls.from_dict(d)
        except TypeError as exc:
            raise UserError(f"{_where(path)}: {exc}") from exc
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(path + k for k in unknown)}; valid: {', '.join(path + n for n in names)}")
    kwargs = {k: _coerce(v, hints[k], path + k) for k, v in d.items()}
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {safe_repr(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{key} must be an integer, got {safe_repr(value)}")
        if isinstance(value, int):
            if abs(value) >= 2**63:
                raise UserError(f"{key} must be an integer below 2**63, got {safe_repr(value)}")
            return value
        try:
            f = float(value)
        except (ValueError, OverflowError):
            raise UserError(f"{key} must be an integer, got {safe_repr(value)}") from None
        if not f.is_integer() or abs(f) >= 2**63:
            raise UserError(f"{key} must be an integer below 2**63, got {safe_repr(value)}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{key} must be a number, got {safe_repr(value)}")
        try:
            f = float(value)  # PyYAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{key} must be a number, got {safe_repr(value)}") from None
        if not math.isfinite(f):
            raise UserError(f"{key} must be a finite number, got {safe_repr(value)}")
        return f
    if tp is str:
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise UserError(f"{key} must be a string, got {safe_repr(value)}")
        return str(value)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {safe_repr(value)}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {safe_repr(value)}")
        return dict(value)
    return value
