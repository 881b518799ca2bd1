"""Pruning to a MACs budget (Torch-Pruning), the shapes record a checkpoint rebuilds it from, and
unstructured masks at the X-layers' densities."""

import pytest
import torch
from torch import nn

import xsurgery
from xsurgery.errors import UserError
from xsurgery.surgery import prune_to_macs, pruned_shapes, resize_modules

pytest.importorskip("torch_pruning")


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                         nn.Conv2d(128, 128, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def _hand_macs(model: nn.Module, hw: int) -> int:
    """Conv MACs out*in/groups*k*k*H*W (stride 1, same padding) + linear in*out: independent of the report."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] * hw * hw
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total


def test_prune_meets_the_budget_and_keeps_the_classifier():
    dense = _cnn()
    full = _hand_macs(dense, 16)
    pruned, record = prune_to_macs(dense, full // 4, (3, 16, 16))
    got = _hand_macs(pruned, 16)
    assert abs(got - full // 4) / (full // 4) <= 0.03
    assert pruned[-1].out_features == 10 and pruned[0].in_channels == 3
    assert pruned[3].out_channels < 128 and dense[3].out_channels == 128  # the dense model is left as it was
    assert record["shapes"] == pruned_shapes(pruned) and pruned._xsurgery_pruned is record
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(UserError, match="not below"):
        prune_to_macs(dense, full * 2, (3, 16, 16))


def test_resize_modules_rebuilds_the_shapes_and_refuses_bad_records():
    dense = _cnn()
    pruned, record = prune_to_macs(dense, _hand_macs(dense, 8) // 3, (3, 8, 8))
    rebuilt = resize_modules(_cnn(), record["shapes"])
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), pruned.eval()(x), rtol=0, atol=0)
    bad_records = [
        {"0": {"in_channels": 3, "out_channels": "8", "groups": 1}},  # not an integer
        {"2": {"num_features": 8}},  # a ReLU: not a conv, linear or norm module
        {"nosuch": {"in_features": 1, "out_features": 1}},
        {"0": {"in_channels": 3, "out_channels": 8}},  # groups missing
        {"0": {"in_channels": 3, "out_channels": 0, "groups": 1}},
        {"0": {"in_channels": 3, "out_channels": 8, "groups": 2}},  # groups must divide
        ["0"],
    ]
    for bad in bad_records:
        with pytest.raises(UserError):
            resize_modules(_cnn(), bad)


def test_a_pruned_model_round_trips_through_a_checkpoint(tmp_path):
    from xsurgery.models import create_model

    dense = create_model("digits_cnn", {"num_classes": 10, "width": 16, "input_size": 16}, False)
    pruned, _ = prune_to_macs(dense, 400_000, (1, 16, 16))
    path = str(tmp_path / "p.xs")
    xsurgery.save(pruned, path)
    back = xsurgery.load(path)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(back.eval()(x), pruned.eval()(x), rtol=0, atol=0)
    # a file whose shapes record names a module that is not there is refused in one line
    import json

    from safetensors.torch import load_file, save_file

    manifest = json.loads(__import__("safetensors").safe_open(path, "pt").metadata()["xsurgery"])
    manifest["pruned"]["shapes"]["os.system"] = {"in_features": 1, "out_features": 1}
    bad = str(tmp_path / "bad.xs")
    save_file(load_file(path), bad, metadata={"xsurgery": json.dumps(manifest)})
    with pytest.raises(UserError, match="not a conv, linear or norm module"):
        xsurgery.load(bad)


def test_unstructured_masks_keep_the_x_layers_counts_through_training(tmp_path):
    from xsurgery.layers import X_LAYERS
    from xsurgery.train import Recipe, build_model, load_recipe, train

    recipe = load_recipe("recipes/digits.yaml", ["unstructured=true", "surgery.compress=4", "epochs=1",
                                                 "data.limit_train=256", f"output={tmp_path / 'u'}"])
    model = build_model(recipe)
    converted = build_model(Recipe.from_dict({**recipe.to_dict(), "unstructured": False}))
    xs = {n: m for n, m in converted.named_modules() if isinstance(m, X_LAYERS)}
    assert xs and set(model._xsurgery_masks) == set(xs)
    for name, x in xs.items():
        w = model.get_submodule(name).weight
        assert int((w != 0).sum()) == x.weight.numel() < w.numel()
    train(recipe, quiet=True)
    trained = xsurgery.load(str(tmp_path / "u" / "best.xs"))
    for name, x in xs.items():
        w = trained.get_submodule(name).weight
        assert int((w != 0).sum()) == x.weight.numel()
        assert torch.equal(w != 0, model._xsurgery_masks[name].bool())  # the same positions as at the start
