"""The dataset registry (xsurgery/train/data.py): one entry per dataset, and nothing else names them."""

import contextlib
import os

import pytest
import torch

from xsurgery.errors import UserError
from xsurgery.train._recipe import DataSpec, load_recipe
from xsurgery.train.data import (
    NORMALIZATION,
    Loaded,
    TensorImages,
    build_datasets,
    build_splits,
    dataset_entry,
    list_datasets,
    register_dataset,
    unregister_dataset,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "recipes", "digits.yaml")
BUILT_IN = ["cifar10", "cifar100", "imagenet", "digits", "fashion_mnist", "fake"]


def _toy_loader(calls):
    """A 3-class dataset of 20 train / 6 test constant images (image i is filled with i)."""

    def load(spec, seed):
        calls.append((spec, seed))
        c, h, w = spec.input_size

        def images(n, offset):
            x = torch.arange(offset, offset + n, dtype=torch.float32)[:, None, None, None].expand(n, c, h, w)
            return TensorImages(x.contiguous(), torch.arange(n) % 3)

        return Loaded(images(20, 0), images(6, 100), 3)

    return load


@contextlib.contextmanager
def registered(name, load, **defaults):
    register_dataset(name, **defaults)(load)
    try:
        yield dataset_entry(name)
    finally:
        unregister_dataset(name)


def test_built_in_datasets_are_registered_in_order():
    assert list_datasets() == BUILT_IN
    assert dataset_entry("fashion_mnist").root == "/usr/share/datasets/fashion-mnist"
    assert dataset_entry("fashion_mnist").val_size == 5000 and dataset_entry("cifar10").val_size == 0
    assert dataset_entry("cifar100").num_classes == 100 and dataset_entry("imagenet").input_size == (3, 224, 224)
    assert dataset_entry("digits").normalization is None and "digits" not in NORMALIZATION
    assert NORMALIZATION["cifar10"] == dataset_entry("cifar10").normalization


def test_duplicate_registration_raises_and_keeps_the_first():
    first = dataset_entry("digits").load
    with pytest.raises(ValueError, match="'digits' is registered already"):
        register_dataset("digits")(_toy_loader([]))
    assert dataset_entry("digits").load is first and list_datasets() == BUILT_IN
    with registered("toy", _toy_loader([])):
        with pytest.raises(ValueError, match="'toy' is registered already"):
            register_dataset("toy")(_toy_loader([]))
    assert "toy" not in list_datasets()


def test_unknown_dataset_in_a_recipe_is_one_line_naming_the_known_ones():
    with pytest.raises(UserError) as info:
        load_recipe(DIGITS, ["data.name=mnist"])
    msg = str(info.value)
    assert "\n" not in msg and "'mnist'" in msg
    assert msg.endswith("is not one of " + ", ".join(BUILT_IN))
    # the list is the registry's: a registered dataset is named (and accepted) too
    with registered("toy", _toy_loader([])):
        with pytest.raises(UserError) as info:
            load_recipe(DIGITS, ["data.name=mnist"])
        assert str(info.value).endswith(", fake, toy")
        assert load_recipe(DIGITS, ["data.name=toy"]).data.name == "toy"


def test_unknown_dataset_on_the_command_line_is_one_line(capsys):
    from xsurgery.cli import main

    assert main(["train", DIGITS, "data.name=mnist", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.name 'mnist' is not one of " + ", ".join(BUILT_IN) in err, err


def test_a_registered_dataset_is_usable_then_cleaned_up():
    calls = []
    with registered("toy", _toy_loader(calls), root="toy-root", val_size=5, num_classes=3) as entry:
        assert entry.root == "toy-root" and list_datasets()[-1] == "toy"
        spec = DataSpec(name="toy", input_size=(2, 4, 4), limit_train=10, limit_test=4, split_seed=1)
        assert spec.data_root == "toy-root" and spec.validation_size == 5  # the entry's defaults
        s = build_splits(spec, seed=7)
        assert calls[-1] == (spec, 7)
        assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (10, 5, 4, 3)
        train_ids = {int(s.train[i][0][0, 0, 0]) for i in range(len(s.train))}
        val_ids = {int(s.val[i][0][0, 0, 0]) for i in range(len(s.val))}
        assert not train_ids & val_ids and train_ids | val_ids <= set(range(20))
        assert s.test[3][0].shape == (2, 4, 4) and int(s.test[3][0][0, 0, 0]) == 103
        train, test, n = build_datasets(DataSpec(name="toy", input_size=(1, 2, 2), val_size=0))
        assert (len(train), len(test), n) == (20, 6, 3)
    assert "toy" not in list_datasets() and list_datasets() == BUILT_IN
    with pytest.raises(UserError, match="data.name 'toy' is not one of"):
        DataSpec(name="toy")


def test_a_dataset_sized_by_its_limits_is_not_cut():
    """``sized_by_limits`` (as ``fake``): the loader reads the limits, build_splits does not cut again."""
    calls = []
    with registered("toy", _toy_loader(calls), sized_by_limits=True):
        s = build_splits(DataSpec(name="toy", limit_train=2, limit_test=1))
    assert (len(s.train), len(s.test)) == (20, 6)
