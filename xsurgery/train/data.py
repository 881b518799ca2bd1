"""Datasets for training recipes: a registry of named datasets and the recipe's ``data`` spec.

Built in: CIFAR-10/100, ImageNet folders, scikit-learn digits, Fashion-MNIST (IDX files),
FakeData. A dataset is one :func:`register_dataset` entry (its loader, normalisation and
defaults); nothing else names datasets, and :class:`DataSpec` accepts what
:func:`list_datasets` lists.

Nothing here touches the network unless a recipe sets ``data.download: true`` (CIFAR only).
:func:`build_splits` returns train / validation / test map-style datasets yielding
``(image tensor [C, H, W], label)``; the validation set, when the recipe has one
(``data.val_size``), is a seeded subset carved out of the training set.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, Subset

from ..errors import UserError
from ._images import (
    DIGITS_SPLIT_SEED,
    TensorImages,
    digits_tensors,
    grey_tensors,
    pil_pipeline,
    read_idx,
    tensor_splits,
)

__all__ = ["AUGMENTS", "DIGITS_SPLIT_SEED", "FASHION_MNIST_FILES", "NORMALIZATION", "DataSpec", "DatasetEntry", "Loaded",
           "Splits", "TensorImages", "build_datasets", "build_splits", "dataset_entry", "digits_tensors", "list_datasets",
           "read_idx", "register_dataset", "unregister_dataset"]

AUGMENTS = ("none", "crop", "crop-flip", "random-resized-crop")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


# ------------------------------------------------------------------------------ spec


@dataclass(frozen=True)
class DataSpec:
    """Dataset, input size and augmentation.

    Attributes:
        name: a registered dataset (:func:`list_datasets`): ``cifar10``, ``cifar100``,
            ``imagenet`` (an ImageFolder root with ``train/`` and ``val/``), ``digits``
            (scikit-learn's 8x8 digits), ``fashion_mnist`` (the four IDX ``.gz`` files;
            Debian: ``apt-get install dataset-fashion-mnist``) or ``fake`` (FakeData).
        root: folder holding the files; default the dataset's (``data``; for
            ``fashion_mnist`` the Debian location ``/usr/share/datasets/fashion-mnist``).
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
        if self.name not in list_datasets():
            raise UserError(f"data.name {self.name!r} is not one of {', '.join(list_datasets())}")
        if self.augment not in AUGMENTS:
            raise UserError(f"data.augment {self.augment!r} is not one of {', '.join(AUGMENTS)}")
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise UserError(f"data.input_size must be [C, H, W], got {list(self.input_size)}")
        if self.val_size is not None and self.val_size < 0:
            raise UserError(f"data.val_size must be >= 0, got {self.val_size}")

    @property
    def data_root(self) -> str:
        """``root``, or the dataset's default folder when it is unset."""
        return self.root or dataset_entry(self.name).root

    @property
    def validation_size(self) -> int:
        """``val_size``, or the dataset's default when it is unset."""
        return self.val_size if self.val_size is not None else dataset_entry(self.name).val_size


# -------------------------------------------------------------------------- registry


class Loaded(NamedTuple):
    """What a dataset's loader returns; ``plain_train``: the training images without
    augmentation where the loader has them at hand (else the entry's ``plain_train`` reads them)."""

    train: Dataset
    test: Dataset
    num_classes: int
    plain_train: Dataset | None = None


Loader = Callable[[DataSpec, int], Loaded]  # (spec, run seed) -> Loaded


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset.

    Attributes:
        name: what ``data.name`` says.
        load: ``(spec, seed) -> Loaded``: the train and test sets (augmented, normalised).
        normalization: per-channel ``(mean, std)`` (None: the loader normalises by itself).
        root: the default ``data.root``.
        val_size: the default ``data.val_size``.
        input_size: the images' own ``[C, H, W]``; num_classes: their classes (None: set by
            the recipe, ``fake``).
        plain_train: ``(spec, seed) -> Dataset``: the training set read as the test set is,
            for validation images when the loader does not return it (None: none).
        sized_by_limits: ``limit_train`` / ``limit_test`` are the dataset's sizes, not cuts.
        eval_crop: evaluation resizes to ``H / eval_crop`` and centre-crops (ImageNet).
    """

    name: str
    load: Loader
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    root: str = "data"
    val_size: int = 0
    input_size: tuple[int, int, int] | None = None
    num_classes: int | None = None
    plain_train: Callable[[DataSpec, int], Dataset] | None = None
    sized_by_limits: bool = False
    eval_crop: float | None = None

    def pipeline(self, spec: DataSpec, train: bool, channels: int | None = None):
        """The PIL -> tensor transform of ``spec``'s images with this dataset's normalisation
        (its first ``channels`` channels when given)."""
        mean, std = (v[:channels] for v in self.normalization)
        return pil_pipeline(spec.input_size, spec.augment, train, mean, std, self.eval_crop)


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, **defaults: Any) -> Callable[[Loader], Loader]:
    """Decorator registering a loader as dataset ``name``; ``defaults`` are the other
    :class:`DatasetEntry` fields (``normalization`` at least).

    Raises:
        ValueError: ``name`` is registered already.
    """

    def add(load: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is registered already")
        _REGISTRY[name] = DatasetEntry(name, load, **defaults)
        return load

    return add


def unregister_dataset(name: str) -> None:
    """Remove a registered dataset (a test's, a plug-in's); unknown names raise ``KeyError``."""
    del _REGISTRY[name]


def list_datasets() -> list[str]:
    """Registered dataset names, in registration order."""
    return list(_REGISTRY)


def dataset_entry(name: str) -> DatasetEntry:
    """The registered entry of ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"data.name {name!r} is not one of {', '.join(list_datasets())}") from None


class _Normalization(Mapping):
    """``{name: (mean, std)}`` of the registered datasets that have one, read live from the registry."""

    def __getitem__(self, name: str):
        norm = _REGISTRY[name].normalization
        if norm is None:
            raise KeyError(name)
        return norm

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, e in _REGISTRY.items() if e.normalization is not None])

    def __len__(self) -> int:
        return len(list(iter(self)))


NORMALIZATION: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = _Normalization()


# ------------------------------------------------------------------------- built in

# name -> (extracted folder, download URL, torchvision class)
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR10"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100"),
}



def _cifar_plain(spec: DataSpec, seed: int):
    from torchvision import datasets

    cls = getattr(datasets, _CIFAR[spec.name][2])
    return cls(spec.data_root, train=True, download=False, transform=dataset_entry(spec.name).pipeline(spec, False))


def _cifar(spec: DataSpec, seed: int) -> Loaded:
    from torchvision import datasets

    folder, url, cls_name = _CIFAR[spec.name]
    cls = getattr(datasets, cls_name)
    entry = dataset_entry(spec.name)
    if not spec.download and not os.path.isdir(os.path.join(spec.data_root, folder)):
        raise UserError(
            f"{spec.name} not found: put the extracted {folder}/ folder (from {url}) under {os.path.abspath(spec.data_root)}, "
            f"or set data.download=true"
        )
    try:
        train = cls(spec.data_root, train=True, download=spec.download, transform=entry.pipeline(spec, True))
        test = cls(spec.data_root, train=False, download=spec.download, transform=entry.pipeline(spec, False))
    except RuntimeError as exc:
        raise UserError(f"{spec.name} under {os.path.abspath(spec.data_root)} is incomplete or corrupt ({exc}); "
                        f"re-extract {folder}/ from {url} or set data.download=true") from exc
    except OSError as exc:  # failed download (no network, disk full)
        raise UserError(f"could not download {spec.name} into {spec.data_root} ({type(exc).__name__}: {exc}); "
                        f"put the extracted {folder}/ there by hand") from exc
    return Loaded(train, test, len(train.classes))


register_dataset("cifar10", normalization=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), input_size=(3, 32, 32),
                 num_classes=10, plain_train=_cifar_plain)(_cifar)
register_dataset("cifar100", normalization=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), input_size=(3, 32, 32),
                 num_classes=100, plain_train=_cifar_plain)(_cifar)


def _imagenet_plain(spec: DataSpec, seed: int):
    from torchvision import datasets

    return datasets.ImageFolder(os.path.join(spec.data_root, "train"), transform=dataset_entry("imagenet").pipeline(spec, False))


@register_dataset("imagenet", normalization=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), input_size=(3, 224, 224),
                  num_classes=1000, plain_train=_imagenet_plain, eval_crop=0.875)
def _imagenet(spec: DataSpec, seed: int) -> Loaded:
    from torchvision import datasets

    entry = dataset_entry("imagenet")
    dirs = {split: os.path.join(spec.data_root, split) for split in ("train", "val")}
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if missing:
        raise UserError(f"ImageNet not found: {missing[0]} is missing; data.root must hold train/ and val/ with one "
                        f"folder of images per class (torchvision ImageFolder layout)")
    train = datasets.ImageFolder(dirs["train"], transform=entry.pipeline(spec, True))
    test = datasets.ImageFolder(dirs["val"], transform=entry.pipeline(spec, False))
    if train.classes != test.classes:
        raise UserError(f"ImageNet train/ and val/ under {spec.data_root} have different class folders")
    return Loaded(train, test, len(train.classes))


@register_dataset("digits", input_size=(1, 8, 8), num_classes=10)
def _digits(spec: DataSpec, seed: int) -> Loaded:
    """Normalised with its own training statistics (no fixed normalisation)."""
    xtr, ytr, xte, yte = digits_tensors(spec.input_size)
    train, test, plain = tensor_splits(xtr, ytr, xte, yte, spec.input_size, spec.augment)
    return Loaded(train, test, 10, plain)


@register_dataset("fashion_mnist", normalization=((0.2860,), (0.3530,)),  # the 60k training images
                  root="/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
                  val_size=5000, input_size=(1, 28, 28), num_classes=10)
def _fashion_mnist(spec: DataSpec, seed: int) -> Loaded:
    root = spec.data_root
    paths = {k: os.path.join(root, f) for k, f in FASHION_MNIST_FILES.items()}
    missing = [os.path.basename(p) for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise UserError(f"fashion_mnist not found in {os.path.abspath(root)} (missing {', '.join(missing)}): "
                        f"apt-get install dataset-fashion-mnist, or set data.root to a folder holding "
                        f"{', '.join(FASHION_MNIST_FILES.values())}")
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"fashion_mnist {split} files in {root} disagree: images {list(images.shape)}, "
                            f"labels {list(labels.shape)} (expected [N, 28, 28] and [N])")
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise UserError(f"fashion_mnist {split} labels in {root} are outside 0..9")
    (mean,), (std,) = dataset_entry("fashion_mnist").normalization
    xtr, ytr = grey_tensors(arrays["train_images"], arrays["train_labels"], spec.input_size, mean, std)
    xte, yte = grey_tensors(arrays["test_images"], arrays["test_labels"], spec.input_size, mean, std)
    train, test, plain = tensor_splits(xtr, ytr, xte, yte, spec.input_size, spec.augment)
    return Loaded(train, test, 10, plain)


def _fake_plain(spec: DataSpec, seed: int):
    return _fake(dataclasses.replace(spec, augment="none"), seed).train


@register_dataset("fake", normalization=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), plain_train=_fake_plain,
                  sized_by_limits=True)
def _fake(spec: DataSpec, seed: int) -> Loaded:
    from torchvision.datasets import FakeData

    entry = dataset_entry("fake")
    n_train = spec.limit_train or 512
    n_test = spec.limit_test or 128
    size = tuple(spec.input_size)
    # FakeData seeds image i from (random_offset + i); train and test never overlap
    c = spec.input_size[0]
    train = FakeData(n_train, size, spec.num_classes, entry.pipeline(spec, True, c), random_offset=seed * 1_000_003)
    test = FakeData(n_test, size, spec.num_classes, entry.pipeline(spec, False, c), random_offset=seed * 1_000_003 + n_train)
    return Loaded(train, test, spec.num_classes)


# ---------------------------------------------------------------------------- splits


class Splits(NamedTuple):
    """What :func:`build_splits` returns; ``val`` is None when the recipe has no validation split."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int


def build_splits(spec: DataSpec, seed: int = 0) -> Splits:
    """Train, validation and test datasets and the number of classes for a recipe's ``data``.

    The validation set (``spec.validation_size`` images) is a random subset of the training
    set drawn with ``spec.split_seed``; those images are removed from training and read
    without augmentation. ``limit_train`` then cuts the remaining training set.

    Raises:
        UserError: missing or corrupt files, or a validation split as large as the training set.
    """
    entry = dataset_entry(spec.name)
    train, test, n, plain_train = entry.load(spec, seed)
    val = None
    n_val = spec.validation_size
    if n_val:
        if n_val >= len(train):
            raise UserError(f"data.val_size {n_val} leaves no training images ({spec.name} has {len(train)}); "
                            f"lower data.val_size")
        if plain_train is None and spec.augment != "none" and entry.plain_train is not None:
            plain_train = entry.plain_train(spec, seed)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.split_seed)).tolist()
        val = Subset(plain_train if plain_train is not None else train, sorted(perm[:n_val]))
        train = Subset(train, sorted(perm[n_val:]))
    if spec.limit_train is not None and not entry.sized_by_limits:
        train = Subset(train, range(min(spec.limit_train, len(train))))
    if spec.limit_test is not None and not entry.sized_by_limits:
        test = Subset(test, range(min(spec.limit_test, len(test))))
    return Splits(train, val, test, n)


def build_datasets(spec: DataSpec, seed: int = 0) -> tuple[Dataset, Dataset, int]:
    """Train and test datasets and the number of classes (see :func:`build_splits`)."""
    s = build_splits(spec, seed)
    return s.train, s.test, s.num_classes
