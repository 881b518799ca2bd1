"""Datasets: IDX reading, Fashion-MNIST from generated IDX files, validation splits."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from xsurgery.errors import UserError
from xsurgery.train._recipe import DataSpec
from xsurgery.train.data import FASHION_MNIST_FILES, NORMALIZATION, build_datasets, build_splits, read_idx

CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
         np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path, array: np.ndarray) -> None:
    """LeCun's IDX format, written independently of the reader: 0, 0, type, ndim, dims, data."""
    header = bytes([0, 0, CODES[array.dtype], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + np.ascontiguousarray(array).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def fake_fashion_mnist(root, n_train=40, n_test=12, seed=0):
    """The four Fashion-MNIST files with random 28x28 images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    os.makedirs(root, exist_ok=True)
    for key, name in FASHION_MNIST_FILES.items():
        write_idx(os.path.join(root, name), arrays[key])
    return arrays


@pytest.mark.parametrize("dtype,shape", [("u1", (5, 3, 2)), ("u1", (7,)), (">i4", (2, 3)), (">f4", (4, 2)),
                                         ("i1", (3,)), (">f8", (2, 2, 2))])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips(tmp_path, dtype, shape, gz):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, a)
    b = read_idx(str(path))
    assert b.shape == a.shape and b.dtype == a.dtype
    np.testing.assert_array_equal(b, a)


def test_read_idx_refuses_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read"):
        read_idx(str(bad))
    header = tmp_path / "header.idx"
    header.write_bytes(bytes([1, 2, 3, 4]) + b"\0" * 8)
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(str(header))
    good = tmp_path / "good.idx"
    write_idx(good, np.zeros((4, 5), np.uint8))
    short = tmp_path / "short.idx"
    short.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(UserError, match="holds 17 data bytes") as info:
        read_idx(str(short))
    assert "\n" not in str(info.value)
    no_dims = tmp_path / "nodims.idx"
    no_dims.write_bytes(bytes([0, 0, 8, 3]) + b"\0\0\0\1")
    with pytest.raises(UserError, match="truncated"):
        read_idx(str(no_dims))


def test_fashion_mnist_missing_is_one_line_error_naming_the_package(tmp_path):
    spec = DataSpec(name="fashion_mnist", root=str(tmp_path), input_size=(1, 28, 28))
    with pytest.raises(UserError) as info:
        build_splits(spec)
    msg = str(info.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg and str(tmp_path) in msg
    assert all(name in msg for name in FASHION_MNIST_FILES.values())
    # the default root is Debian's location
    assert DataSpec(name="fashion_mnist").data_root == "/usr/share/datasets/fashion-mnist"
    assert DataSpec(name="digits").data_root == "data"


def test_fashion_mnist_reads_normalises_and_splits(tmp_path):
    arrays = fake_fashion_mnist(tmp_path)
    spec = DataSpec(name="fashion_mnist", root=str(tmp_path), input_size=(1, 28, 28), val_size=10, split_seed=3)
    s = build_splits(spec, seed=0)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (30, 10, 12, 10)
    (mean,), (std,) = NORMALIZATION["fashion_mnist"]

    def expect(split, i):
        img = arrays[f"{split}_images"][i].astype(np.float64) / 255.0
        return torch.from_numpy((img - mean) / std)[None], int(arrays[f"{split}_labels"][i])

    # every image is where its label says, train and validation are disjoint and cover the training set
    train_idx, val_idx = list(s.train.indices), list(s.val.indices)
    assert sorted(train_idx + val_idx) == list(range(40)) and not set(train_idx) & set(val_idx)
    for ds, idx in ((s.train, train_idx), (s.val, val_idx)):
        for j in (0, len(ds) - 1):
            x, y = ds[j]
            ex, ey = expect("train", idx[j])
            assert y == ey and x.shape == (1, 28, 28)
            torch.testing.assert_close(x.double(), ex, rtol=0, atol=1e-6)
    x, y = s.test[5]
    ex, ey = expect("test", 5)
    assert y == ey
    torch.testing.assert_close(x.double(), ex, rtol=0, atol=1e-6)
    # the split depends on split_seed only, not on the run's seed
    assert list(build_splits(spec, seed=7).val.indices) == val_idx
    other = DataSpec(name="fashion_mnist", root=str(tmp_path), input_size=(1, 28, 28), val_size=10, split_seed=4)
    assert list(build_splits(other).val.indices) != val_idx
    # build_datasets keeps its (train, test, classes) shape
    train, test, n = build_datasets(spec)
    assert (len(train), len(test), n) == (30, 12, 10)


def test_fashion_mnist_default_validation_and_limits(tmp_path):
    fake_fashion_mnist(tmp_path, n_train=5010, n_test=3)
    spec = DataSpec(name="fashion_mnist", root=str(tmp_path), input_size=(3, 14, 14), limit_train=4, limit_test=2)
    s = build_splits(spec)
    assert len(s.val) == 5000 and len(s.train) == 4 and len(s.test) == 2  # 5,000 validation images by default
    assert s.train[0][0].shape == (3, 14, 14)  # resized, grey repeated to C
    assert torch.equal(s.train[0][0][0], s.train[0][0][2])
    with pytest.raises(UserError, match="leaves no training images"):
        build_splits(DataSpec(name="fashion_mnist", root=str(tmp_path), input_size=(1, 28, 28), val_size=5010))
    with pytest.raises(UserError, match="val_size must be >= 0"):
        DataSpec(name="fashion_mnist", val_size=-1)


def test_validation_images_are_not_augmented(tmp_path):
    fake_fashion_mnist(tmp_path)
    spec = DataSpec(name="fashion_mnist", root=str(tmp_path), input_size=(1, 28, 28), val_size=8, augment="crop")
    s = build_splits(spec)
    torch.manual_seed(0)
    assert all(torch.equal(s.val[i][0], s.val[i][0]) for i in range(len(s.val)))
    # the training images are (random crops differ between reads of one image)
    assert any(not torch.equal(s.train[i][0], s.train[i][0]) for i in range(len(s.train)))


def test_fashion_mnist_inconsistent_files_are_refused(tmp_path):
    arrays = fake_fashion_mnist(tmp_path)
    write_idx(tmp_path / FASHION_MNIST_FILES["train_labels"], arrays["train_labels"][:-1])
    with pytest.raises(UserError, match="train files .* disagree"):
        build_splits(DataSpec(name="fashion_mnist", root=str(tmp_path), input_size=(1, 28, 28)))
    bad = arrays["train_labels"].copy()
    bad[0] = 12
    write_idx(tmp_path / FASHION_MNIST_FILES["train_labels"], bad)
    with pytest.raises(UserError, match="outside 0..9"):
        build_splits(DataSpec(name="fashion_mnist", root=str(tmp_path), input_size=(1, 28, 28)))
