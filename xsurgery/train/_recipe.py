"""Training recipes: a frozen dataclass tree that round-trips to dict/YAML, plus overrides.

A recipe file is YAML with the fields of :class:`Recipe` and, optionally, ``variants``: a
mapping from a variant name to dotted ``key: value`` overrides (e.g. ``dense: {surgery: null}``),
picked with ``--variant``. Command-line ``key=value`` overrides come last; their values are
parsed as YAML and typed by the dataclass fields, so ``optim.lr=0.05 epochs=3`` just works.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import UserError

__all__ = [
    "RECIPE_VERSION",
    "DataSpec",
    "ModelSpec",
    "OptimSpec",
    "Recipe",
    "ScheduleSpec",
    "apply_overrides",
    "load_recipe",
    "read_recipe_file",
    "recipe_to_yaml",
]

RECIPE_VERSION = 1
DATASETS = ("cifar10", "cifar100", "imagenet", "digits", "fashion_mnist", "fake")
AUGMENTS = ("none", "crop", "crop-flip", "random-resized-crop")
SCHEDULES = ("step", "cosine", "constant")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_VAL = 5000


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from (see :func:`xsurgery.models.sources.create_model`)."""

    source: str = "digits_cnn"
    kwargs: dict = field(default_factory=dict)
    pretrained: bool = False


@dataclass(frozen=True)
class DataSpec:
    """Dataset, input size and augmentation.

    Attributes:
        name: ``cifar10``, ``cifar100``, ``imagenet`` (an ImageFolder root with ``train/``
            and ``val/``), ``digits`` (scikit-learn's 8x8 digits), ``fashion_mnist`` (the four
            IDX ``.gz`` files; Debian: ``apt-get install dataset-fashion-mnist``) or ``fake``
            (FakeData).
        root: folder holding the files; default ``data``, for ``fashion_mnist`` the Debian
            location ``/usr/share/datasets/fashion-mnist``.
        download: let torchvision download CIFAR into ``root`` (the only network use).
        input_size: ``[C, H, W]`` fed to the model.
        augment: ``none``, ``crop`` (random crop, padding H/8), ``crop-flip`` (+ horizontal
            flip) or ``random-resized-crop`` (+ flip; ImageNet).
        num_classes: classes of ``fake`` (others know their own).
        limit_train, limit_test: use only the first N images (smoke runs).
        val_size: images carved from the training set (a seeded random subset) to validate
            on every epoch and select ``best.xs`` by; the test set is then evaluated once, at
            the end. ``None``: the dataset's default (5,000 for ``fashion_mnist``, else 0:
            every epoch evaluates the test set, as the paper's CIFAR protocol).
        split_seed: seed of that validation split, independent of the run's seed so every
            run of an experiment validates on the same images.
    """

    name: str = "digits"
    root: str | None = None
    download: bool = False
    input_size: tuple[int, ...] = (1, 16, 16)
    augment: str = "none"
    num_classes: int = 10
    limit_train: int | None = None
    limit_test: int | None = None
    val_size: int | None = None
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise UserError(f"data.name {self.name!r} is not one of {', '.join(DATASETS)}")
        if self.augment not in AUGMENTS:
            raise UserError(f"data.augment {self.augment!r} is not one of {', '.join(AUGMENTS)}")
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise UserError(f"data.input_size must be [C, H, W], got {list(self.input_size)}")
        if self.val_size is not None and self.val_size < 0:
            raise UserError(f"data.val_size must be >= 0, got {self.val_size}")

    @property
    def data_root(self) -> str:
        """``root``, or the dataset's default folder when it is unset."""
        if self.root:
            return self.root
        return FASHION_MNIST_ROOT if self.name == "fashion_mnist" else "data"

    @property
    def validation_size(self) -> int:
        """``val_size``, or the dataset's default when it is unset."""
        if self.val_size is not None:
            return self.val_size
        return FASHION_MNIST_VAL if self.name == "fashion_mnist" else 0


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
            raise UserError(f"optim.name {self.name!r} is not supported; use sgd")
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
            raise UserError(f"schedule.name {self.name!r} is not one of {', '.join(SCHEDULES)}")
        if list(self.milestones) != sorted(self.milestones):
            raise UserError(f"schedule.milestones must be increasing, got {list(self.milestones)}")
        if self.warmup_epochs < 0 or self.min_lr < 0 or self.gamma <= 0:
            raise UserError("schedule.warmup_epochs, schedule.min_lr must be >= 0 and schedule.gamma > 0")


def _surgery_type():
    from ..surgery import SurgerySpec

    return SurgerySpec


@dataclass(frozen=True)
class Recipe:
    """Everything a training run needs; ``surgery: None`` is the dense baseline.

    ``surgery`` holds a :class:`xsurgery.surgery.SurgerySpec` (the keyword arguments of
    :func:`xsurgery.convert`). ``batch_size`` is global: it is split evenly across processes
    under ``torchrun``. ``output`` defaults to ``runs/<name>``.
    """

    name: str = "run"
    model: ModelSpec = field(default_factory=ModelSpec)
    surgery: Any = None
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
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise UserError(f"recipe version {self.version} is not supported (this xsurgery reads {RECIPE_VERSION})")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0:
            raise UserError("epochs and batch_size must be >= 1 and workers >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def output_dir(self) -> str:
        return self.output or os.path.join("runs", self.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) that :meth:`from_dict` reads back."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """Typed and validated; unknown keys raise a :class:`UserError` naming the valid ones."""
        return _build(cls, d, "")


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
        raise UserError(f"{_where(path)} must be a mapping, got {d!r}")
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
        raise UserError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{key} must be an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise UserError(f"{key} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise UserError(f"{key} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)  # PyYAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise UserError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise UserError(f"{key} must be a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    return value


# ------------------------------------------------------------------ overrides and files


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested plain dict, checking every level against the dataclasses."""
    parts = key.split(".")
    cls: Any = Recipe
    node = d
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        prefix = here + "." if here else ""
        if cls is None:  # inside a free-form dict (model.kwargs, surgery.plan, ...)
            if i == len(parts) - 1:
                node[part] = value
                return
            node = node.setdefault(part, {})
            continue
        names = [f.name for f in fields(cls)]
        if part not in names:
            raise UserError(f"unknown key {key!r}; valid: {', '.join(prefix + n for n in names)}")
        if i == len(parts) - 1:
            node[part] = value
            if cls is _surgery_type():  # compress and degree exclude each other
                other = {"compress": "degree", "degree": "compress"}.get(part)
                if other and value is not None:
                    node[other] = None
            return
        tp = _hints(cls)[part]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        target = inner[0]
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        cls = target if dataclasses.is_dataclass(target) else None


def apply_overrides(d: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (or a ``{dotted key: value}`` mapping) to a recipe dict copy."""
    import copy

    out = copy.deepcopy(d)
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        for text in overrides:
            key, sep, raw = text.partition("=")
            if not sep or not key:
                raise UserError(f"override {text!r} is not key=value (e.g. optim.lr=0.05 epochs=3)")
            items.append((key.strip(), _parse_value(raw)))
    for key, value in items:
        _set_dotted(out, key, value)
    return out


def read_recipe_file(path: str) -> dict[str, Any]:
    """The raw mapping of a recipe YAML file (``variants`` included)."""
    import yaml

    if not os.path.isfile(path):
        alt = os.path.join("recipes", f"{path}.yaml")
        if os.path.isfile(alt):
            path = alt
        else:
            raise UserError(f"recipe {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(d, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of recipe fields")
    return d


def load_recipe(path: str, overrides: list[str] | dict[str, Any] = (), variant: str | None = None) -> Recipe:
    """Read a recipe file, apply a variant's overrides, then the command-line ones.

    A selected variant appends ``-<variant>`` to the recipe's name (and so to its default
    output folder) unless it sets ``name`` itself.
    """
    d = read_recipe_file(path)
    variants = d.pop("variants", None) or {}
    if not isinstance(variants, dict):
        raise UserError(f"recipe {path}: variants must map a name to overrides")
    if variant is not None:
        if variant not in variants:
            have = ", ".join(variants) or "none"
            raise UserError(f"recipe {path} has no variant {variant!r}; its variants: {have}")
        chosen = variants[variant] or {}
        if not isinstance(chosen, dict):
            raise UserError(f"recipe {path}: variant {variant!r} must map dotted keys to values")
        d = apply_overrides(d, chosen)
        if "name" not in chosen:
            d["name"] = f"{d.get('name', 'run')}-{variant}"
    d = apply_overrides(d, list(overrides) if not isinstance(overrides, dict) else overrides)
    return Recipe.from_dict(d)


def list_variants(path: str) -> list[str]:
    """Variant names a recipe file defines."""
    return list((read_recipe_file(path).get("variants") or {}).keys())


def recipe_to_yaml(recipe: Recipe) -> str:
    """YAML text of the resolved recipe (what ``recipe.yaml`` beside the outputs holds)."""
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
