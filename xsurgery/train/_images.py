"""Reading images for the datasets of :mod:`xsurgery.train.data`: tensors held in memory,
torchvision transform pipelines, scikit-learn's digits and LeCun's IDX files.

Nothing here knows a dataset's name: ``data`` registers the datasets and calls these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import UserError

IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DIGITS_SPLIT_SEED = 0  # fixed: the digits test set is the same whatever the recipe's seed
DIGITS_TEST_FRACTION = 0.2


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


def train_transforms(input_size, augment: str, tensor_input: bool) -> list[Any]:
    """The augmentation steps of ``augment`` for images of ``input_size`` ``[C, H, W]``."""
    from torchvision import transforms as T

    _, h, w = input_size
    out: list[Any] = []
    if augment in ("crop", "crop-flip"):
        out.append(T.RandomCrop((h, w), padding=max(1, h // 8)))
    elif augment == "random-resized-crop":
        out.append(T.RandomResizedCrop((h, w), antialias=True))
    elif not tensor_input:
        out.append(T.Resize((h, w), antialias=True))
    if augment in ("crop-flip", "random-resized-crop"):
        out.append(T.RandomHorizontalFlip())
    return out


def pil_pipeline(input_size, augment: str, train: bool, mean, std, eval_crop: float | None = None):
    """PIL image -> normalised tensor: augmented for training; for evaluation resized, or
    resized to ``H / eval_crop`` and centre-cropped when ``eval_crop`` is set (ImageNet)."""
    from torchvision import transforms as T

    _, h, w = input_size
    if train:
        steps = train_transforms(input_size, augment, tensor_input=False)
        if augment == "crop" or augment == "crop-flip":
            steps.insert(0, T.Resize((h, w), antialias=True))
    elif eval_crop is not None:
        steps = [T.Resize(int(round(h / eval_crop)), antialias=True), T.CenterCrop((h, w))]
    else:
        steps = [T.Resize((h, w), antialias=True)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def tensor_splits(xtr, ytr, xte, yte, input_size, augment: str):
    """``(train, test, plain_train)`` over in-memory tensors; ``plain_train`` (the training
    images without augmentation) is None when there is no augmentation."""
    aug = train_transforms(input_size, augment, tensor_input=True)
    if aug:
        from torchvision import transforms as T

        return TensorImages(xtr, ytr, T.Compose(aug)), TensorImages(xte, yte), TensorImages(xtr, ytr)
    return TensorImages(xtr, ytr), TensorImages(xte, yte), None


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


def grey_tensors(images, labels, input_size, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[N, H0, W0]`` images -> normalised float ``[N, C, H, W]`` (resized, grey repeated)."""
    c, h, w = input_size
    x = torch.from_numpy(images.astype("float32") / 255.0).unsqueeze(1)
    if x.shape[-2:] != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = ((x - mean) / std).expand(-1, c, -1, -1).contiguous()
    return x, torch.from_numpy(labels.astype("int64"))
