import glob
import os

import pytest
from torch import nn

from xsurgery.errors import UserError
from xsurgery.layers import XConv2d, XLinear
from xsurgery.train import build_model
from xsurgery.train._recipe import Recipe, apply_overrides, list_variants, load_recipe, recipe_to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
CASES = [(os.path.basename(f), v) for f in FILES for v in [None, *list_variants(f)]]



def _x_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (XConv2d, XLinear))}


def test_recipe_files_are_shipped():
    names = {os.path.basename(f) for f in FILES}
    assert {"digits.yaml", "cifar10_densenet_bc40.yaml", "cifar100_densenet_bc40.yaml", "cifar10_vgg16.yaml",
            "imagenet_resnet50.yaml", "imagenet_mobilenet.yaml"} <= names


@pytest.mark.parametrize("file,variant", CASES, ids=[f"{f}:{v or 'default'}" for f, v in CASES])
def test_every_recipe_parses_and_builds(file, variant):
    recipe = load_recipe(os.path.join(ROOT, "recipes", file), variant=variant)
    # the YAML round trip is lossless
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    import yaml

    assert Recipe.from_dict(yaml.safe_load(recipe_to_yaml(recipe))) == recipe
    model = build_model(recipe)
    n = sum(p.numel() for p in model.parameters())
    print(f"{file}:{variant or 'default'} {recipe.model.source} {n:,} params")
    assert (recipe.surgery is None) == (not _x_layers(model))
    assert recipe.optim.nesterov and recipe.optim.momentum == 0.9


def test_paper_hyper_parameters():
    d10 = load_recipe(os.path.join(ROOT, "recipes", "cifar10_densenet_bc40.yaml"))
    assert (d10.epochs, d10.optim.lr, d10.optim.weight_decay) == (300, 0.1, 1e-4)
    assert d10.schedule.milestones == (150, 225) and d10.schedule.gamma == 0.1
    vgg = load_recipe(os.path.join(ROOT, "recipes", "cifar10_vgg16.yaml"))
    assert vgg.optim.weight_decay == 5e-4 and vgg.epochs == 300
    for f in ("imagenet_resnet50.yaml", "imagenet_mobilenet.yaml"):
        r = load_recipe(os.path.join(ROOT, "recipes", f))
        assert (r.epochs, r.optim.lr, r.schedule.milestones, r.schedule.gamma) == (90, 0.1, (30, 60), 0.1)


def test_densenet_variants_convert_every_block_conv():
    path = os.path.join(ROOT, "recipes", "cifar100_densenet_bc40.yaml")
    for variant, k in ((None, 24), ("k36", 36), ("k48", 48), ("k60", 60)):
        model = build_model(load_recipe(path, variant=variant))
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        xs = _x_layers(model)
        # 3 blocks x 6 bottlenecks x 2 convs + 2 transitions; stem and classifier dense
        assert len(xs) == 38 and len(convs) == 1
        assert all(m.degree == m.in_features // 2 for m in xs.values())
        assert model.classifier.out_features == 100
        assert model.features[0].layer1.conv2.out_channels == k


def test_vgg_plan_sets_per_layer_degrees():
    model = build_model(load_recipe(os.path.join(ROOT, "recipes", "cifar10_vgg16.yaml")))
    degrees = {n: m.degree for n, m in _x_layers(model).items()}
    expected = {"features.10": 64, "classifier.1": 128}
    expected.update({f"features.{i}": 16 for i in (14, 17, 20, 24, 27, 30, 34, 37, 40)})
    assert degrees == expected


@pytest.mark.parametrize("compress", [2, 4, 8, 16])
def test_mobilenet_x_and_grouped_convert_the_same_layers(compress):
    path = os.path.join(ROOT, "recipes", "imagenet_mobilenet.yaml")
    x = build_model(load_recipe(path, variant=None if compress == 2 else f"x-c{compress}"))
    g = build_model(load_recipe(path, variant=f"grouped-c{compress}"))
    want = ["blocks.3.2.conv_pw", "blocks.3.3.conv_pw", "blocks.3.4.conv_pw", "blocks.3.5.conv_pw",
            "blocks.4.0.conv_pw", "blocks.4.1.conv_pw"]
    for model, graph in ((x, "random"), (g, "grouped")):
        layers = _x_layers(model)
        assert sorted(layers) == want
        assert all(m.degree == m.in_features // compress and m.graph_name == graph for m in layers.values())
    assert sum(p.numel() for p in x.parameters()) == sum(p.numel() for p in g.parameters())


def test_resnet50_converts_all_but_stem_and_fc():
    import torchvision

    dense = torchvision.models.resnet50()
    n_conv = sum(isinstance(m, nn.Conv2d) for m in dense.modules())
    model = build_model(load_recipe(os.path.join(ROOT, "recipes", "imagenet_resnet50.yaml")))
    xs = _x_layers(model)
    assert len(xs) == n_conv - 1 and "conv1" not in xs and "fc" not in xs


def test_overrides_are_typed_and_checked():
    path = os.path.join(ROOT, "recipes", "digits.yaml")
    r = load_recipe(path, ["optim.lr=1e-3", "epochs=3", "data.input_size=[1,8,8]", "surgery.degree=4",
                           "model.kwargs.width=8", "schedule.milestones=[1,2]"])
    assert r.optim.lr == 1e-3 and isinstance(r.optim.lr, float)
    assert r.epochs == 3 and r.data.input_size == (1, 8, 8)
    assert r.surgery.degree == 4 and r.surgery.compress is None  # degree replaces compress
    assert r.model.kwargs["width"] == 8 and r.schedule.milestones == (1, 2)
    assert r.output_dir == os.path.join("runs", "digits")
    assert load_recipe(path, ["surgery=null"]).surgery is None
    assert load_recipe(path, ["surgery=null", "surgery.compress=4"]).surgery.compress == 4
    with pytest.raises(UserError, match="valid: optim.name, optim.lr"):
        load_recipe(path, ["optim.lrr=1"])
    with pytest.raises(UserError, match="valid: name, model"):
        load_recipe(path, ["epoch=3"])
    with pytest.raises(UserError, match="epochs must be an integer"):
        load_recipe(path, ["epochs=2.5"])
    with pytest.raises(UserError, match="not key=value"):
        load_recipe(path, ["epochs"])
    with pytest.raises(UserError, match="its variants: grouped, dense"):
        load_recipe(path, variant="nope")
    with pytest.raises(UserError, match="valid: surgery.compress"):
        load_recipe(path, ["surgery.compres=2"])
    with pytest.raises(UserError, match="unknown surgery field"):
        Recipe.from_dict(apply_overrides(load_recipe(path).to_dict(), {"surgery": {"compres": 2}}))
    with pytest.raises(UserError, match="data.name"):
        load_recipe(path, ["data.name=mnist"])
