"""Datasets for training recipes: CIFAR-10/100, ImageNet folders, scikit-learn digits,
Fashion-MNIST (IDX files), FakeData.

Nothing here touches the network unless a recipe sets ``data.download: true`` (CIFAR only).
:func:`build_splits` returns train / validation / test map-style datasets yielding
``(image tensor [C, H, W], label)``; the validation set, when the recipe has one
(``data.val_size``), is a seeded subset carved out of the training set.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, Subset

from ..errors import UserError
from ._recipe import DataSpec

__all__ = ["DIGITS_SPLIT_SEED", "FASHION_MNIST_FILES", "NORMALIZATION", "Splits", "TensorImages", "build_datasets",
           "build_splits", "digits_tensors", "read_idx"]

NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fake": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "fashion_mnist": ((0.2860,), (0.3530,)),  # the 60k training images
}
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DIGITS_SPLIT_SEED = 0  # fixed: the digits test set is the same whatever the recipe's seed
DIGITS_TEST_FRACTION = 0.2
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


class TensorImages(Dataset):
    """Images held in one tensor ``[N, C, H, W]`` with labels; optional per-item transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


def _train_transforms(spec: DataSpec, tensor_input: bool) -> list[Any]:
    from torchvision import transforms as T

    _, h, w = spec.input_size
    out: list[Any] = []
    if spec.augment in ("crop", "crop-flip"):
        out.append(T.RandomCrop((h, w), padding=max(1, h // 8)))
    elif spec.augment == "random-resized-crop":
        out.append(T.RandomResizedCrop((h, w), antialias=True))
    elif not tensor_input:
        out.append(T.Resize((h, w), antialias=True))
    if spec.augment in ("crop-flip", "random-resized-crop"):
        out.append(T.RandomHorizontalFlip())
    return out


def _pil_pipeline(spec: DataSpec, train: bool, mean, std):
    from torchvision import transforms as T

    _, h, w = spec.input_size
    if train:
        steps = _train_transforms(spec, tensor_input=False)
        if spec.augment == "crop" or spec.augment == "crop-flip":
            steps.insert(0, T.Resize((h, w), antialias=True))
    elif spec.name == "imagenet":
        steps = [T.Resize(int(round(h / 0.875)), antialias=True), T.CenterCrop((h, w))]
    else:
        steps = [T.Resize((h, w), antialias=True)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def digits_tensors(input_size=(1, 16, 16)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, upscaled (bilinear) and normalised with train statistics.

    The train/test split (80/20) is a fixed seeded permutation (``DIGITS_SPLIT_SEED``).

    Returns:
        ``x_train, y_train, x_test, y_test`` with images ``[N, C, H, W]`` (the grey channel
        repeated to C).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise UserError("the digits dataset needs scikit-learn: pip install 'xsurgery[data]'") from exc
    import numpy as np

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    c, h, w = input_size
    if (h, w) != (8, 8):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = x.expand(-1, c, -1, -1).contiguous()
    perm = torch.from_numpy(np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y)))
    n_test = int(round(len(y) * DIGITS_TEST_FRACTION))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    xtr, xte = x[train_idx], x[test_idx]
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, y[train_idx], (xte - mean) / std, y[test_idx]


def _digits(spec: DataSpec):
    xtr, ytr, xte, yte = digits_tensors(spec.input_size)
    aug = _train_transforms(spec, tensor_input=True)
    if aug:
        from torchvision import transforms as T

        return TensorImages(xtr, ytr, T.Compose(aug)), TensorImages(xte, yte), 10, TensorImages(xtr, ytr)
    return TensorImages(xtr, ytr), TensorImages(xte, yte), 10, None


def read_idx(path: str):
    """A numpy array from an IDX file (gzip-compressed or not), as in LeCun's MNIST format.

    The header is two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions,
    then each dimension as a big-endian uint32; the data follow in C order.

    Raises:
        UserError: the file is not IDX, or is truncated.
    """
    import gzip

    import numpy as np

    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read {path} ({type(exc).__name__}: {exc}); re-install or replace the file") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] < 1:
        raise UserError(f"{path} is not an IDX file (bad header {raw[:4].hex()}); re-install or replace the file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated (no room for its {ndim} dimensions); re-install or replace the file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != need:
        raise UserError(f"{path} holds {len(raw) - header} data bytes, its header {list(shape)} needs {need}; "
                        f"re-install or replace the file")
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=header).reshape(shape)


def _fashion_mnist(spec: DataSpec):
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
    mean, std = NORMALIZATION["fashion_mnist"]
    c, h, w = spec.input_size

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(arrays[f"{split}_images"].astype("float32") / 255.0).unsqueeze(1)
        if x.shape[-2:] != (h, w):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = ((x - mean[0]) / std[0]).expand(-1, c, -1, -1).contiguous()
        return x, torch.from_numpy(arrays[f"{split}_labels"].astype("int64"))

    xtr, ytr = tensors("train")
    xte, yte = tensors("test")
    aug = _train_transforms(spec, tensor_input=True)
    if aug:
        from torchvision import transforms as T

        return TensorImages(xtr, ytr, T.Compose(aug)), TensorImages(xte, yte), 10, TensorImages(xtr, ytr)
    return TensorImages(xtr, ytr), TensorImages(xte, yte), 10, None


def _fake(spec: DataSpec, seed: int):
    from torchvision.datasets import FakeData

    mean, std = NORMALIZATION["fake"]
    mean, std = mean[: spec.input_size[0]], std[: spec.input_size[0]]
    n_train = spec.limit_train or 512
    n_test = spec.limit_test or 128
    tf_train = _pil_pipeline(spec, True, mean, std)
    tf_test = _pil_pipeline(spec, False, mean, std)
    size = tuple(spec.input_size)
    # FakeData seeds image i from (random_offset + i); train and test never overlap
    train = FakeData(n_train, size, spec.num_classes, tf_train, random_offset=seed * 1_000_003)
    test = FakeData(n_test, size, spec.num_classes, tf_test, random_offset=seed * 1_000_003 + n_train)
    return train, test, spec.num_classes


def _cifar(spec: DataSpec):
    from torchvision import datasets

    folder, url = CIFAR_FILES[spec.name]
    cls = datasets.CIFAR10 if spec.name == "cifar10" else datasets.CIFAR100
    mean, std = NORMALIZATION[spec.name]
    if not spec.download and not os.path.isdir(os.path.join(spec.data_root, folder)):
        raise UserError(
            f"{spec.name} not found: put the extracted {folder}/ folder (from {url}) under {os.path.abspath(spec.data_root)}, "
            f"or set data.download=true"
        )
    try:
        train = cls(spec.data_root, train=True, download=spec.download, transform=_pil_pipeline(spec, True, mean, std))
        test = cls(spec.data_root, train=False, download=spec.download, transform=_pil_pipeline(spec, False, mean, std))
    except RuntimeError as exc:
        raise UserError(f"{spec.name} under {os.path.abspath(spec.data_root)} is incomplete or corrupt ({exc}); "
                        f"re-extract {folder}/ from {url} or set data.download=true") from exc
    except OSError as exc:  # failed download (no network, disk full)
        raise UserError(f"could not download {spec.name} into {spec.data_root} ({type(exc).__name__}: {exc}); "
                        f"put the extracted {folder}/ there by hand") from exc
    return train, test, len(train.classes)


def _imagenet(spec: DataSpec):
    from torchvision import datasets

    mean, std = NORMALIZATION["imagenet"]
    dirs = {split: os.path.join(spec.data_root, split) for split in ("train", "val")}
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if missing:
        raise UserError(f"ImageNet not found: {missing[0]} is missing; data.root must hold train/ and val/ with one "
                        f"folder of images per class (torchvision ImageFolder layout)")
    train = datasets.ImageFolder(dirs["train"], transform=_pil_pipeline(spec, True, mean, std))
    test = datasets.ImageFolder(dirs["val"], transform=_pil_pipeline(spec, False, mean, std))
    if train.classes != test.classes:
        raise UserError(f"ImageNet train/ and val/ under {spec.data_root} have different class folders")
    return train, test, len(train.classes)


def _plain_train(spec: DataSpec, seed: int):
    """The training set read as the test set is (no augmentation): what validation images use."""
    from torchvision import datasets

    if spec.name == "fake":
        return _fake(dataclasses.replace(spec, augment="none"), seed)[0]
    if spec.name in CIFAR_FILES:
        cls = datasets.CIFAR10 if spec.name == "cifar10" else datasets.CIFAR100
        return cls(spec.data_root, train=True, download=False,
                   transform=_pil_pipeline(spec, False, *NORMALIZATION[spec.name]))
    if spec.name == "imagenet":
        return datasets.ImageFolder(os.path.join(spec.data_root, "train"),
                                    transform=_pil_pipeline(spec, False, *NORMALIZATION["imagenet"]))
    return None


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
    plain_train = None  # the training images without augmentation, where it differs
    if spec.name == "digits":
        train, test, n, plain_train = _digits(spec)
    elif spec.name == "fake":
        train, test, n = _fake(spec, seed)
    elif spec.name == "fashion_mnist":
        train, test, n, plain_train = _fashion_mnist(spec)
    elif spec.name in CIFAR_FILES:
        train, test, n = _cifar(spec)
    else:
        train, test, n = _imagenet(spec)
    val = None
    n_val = spec.validation_size
    if n_val:
        if n_val >= len(train):
            raise UserError(f"data.val_size {n_val} leaves no training images ({spec.name} has {len(train)}); "
                            f"lower data.val_size")
        if plain_train is None and spec.augment != "none":
            plain_train = _plain_train(spec, seed)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.split_seed)).tolist()
        val = Subset(plain_train if plain_train is not None else train, sorted(perm[:n_val]))
        train = Subset(train, sorted(perm[n_val:]))
    if spec.limit_train is not None and spec.name != "fake":
        train = Subset(train, range(min(spec.limit_train, len(train))))
    if spec.limit_test is not None and spec.name != "fake":
        test = Subset(test, range(min(spec.limit_test, len(test))))
    return Splits(train, val, test, n)


def build_datasets(spec: DataSpec, seed: int = 0) -> tuple[Dataset, Dataset, int]:
    """Train and test datasets and the number of classes (see :func:`build_splits`)."""
    s = build_splits(spec, seed)
    return s.train, s.test, s.num_classes
