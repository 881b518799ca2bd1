"""Every torchvision classification model and a fixed list of timm families convert and run.

Models whose random init alone takes seconds (over ~100M parameters) are built on the meta
device: conversion, graphs and the forward's shapes are exercised, the kernels are not
(they are on every other model here).
"""

import pytest
import torch
import torchvision

from xsurgery import XConv2d, XLinear
from xsurgery.models import create_model
from xsurgery.surgery import convert

TORCHVISION = torchvision.models.list_models(module=torchvision.models)
# (regnets compute their widths with tensor ops, which the meta device cannot run)
HEAVY = {"vit_h_14", "vit_l_16", "vit_l_32", "efficientnet_v2_l", "efficientnet_v2_m", "convnext_large", "convnext_base", "vit_b_16",
         "vit_b_32", "swin_v2_b", "swin_b", "wide_resnet101_2", "wide_resnet50_2", "alexnet"} | {
    n for n in TORCHVISION if n.startswith("vgg")}

# one small model per family: CNNs, ViTs, hybrids, MLP-mixers (48 families)
TIMM = [
    "resnet18", "resnext26ts", "seresnet18", "efficientnet_b0", "mobilenetv3_small_050", "ghostnet_050",
    "regnetx_002", "densenet121", "dla34", "dpn48b", "mnasnet_small", "lcnet_050", "rexnet_100",
    "hrnet_w18_small", "convnext_atto", "efficientformer_l1", "efficientformerv2_s0", "poolformer_s12",
    "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224", "xcit_nano_12_p16_224", "levit_128s", "pit_ti_224", "coat_lite_tiny",
    "convit_tiny", "mobilevit_xxs", "edgenext_xx_small", "efficientvit_b0", "efficientvit_m0", "fastvit_t8",
    "repvit_m1", "tiny_vit_5m_224", "coatnet_nano_rw_224", "nfnet_l0", "cs3darknet_focus_s", "gernet_s",
    "skresnet18", "ese_vovnet19b_slim_dw", "hgnetv2_b0", "repvgg_a0", "pvt_v2_b0", "eva02_tiny_patch14_224",
    "starnet_s1", "mambaout_femto",
]


def _shapes(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    return [_shapes(o) for o in out]


def _check(name, model, size, **kw):
    out, rep = convert(model, compress=2, input_size=size, **kw)
    n = sum(isinstance(m, (XConv2d, XLinear)) for m in out.modules())
    assert n > 0 and n == sum(r.converted for r in rep.layers), name
    assert rep.totals["params_after"] == sum(p.numel() for p in out.parameters())
    assert rep.totals["macs_after"] < rep.totals["macs_before"]
    dev = next(out.parameters()).device
    x = torch.randn(2, *rep.input_size).to(dev)
    model.eval()
    out.eval()
    with torch.no_grad():
        assert _shapes(out(x)) == _shapes(model(x)), name


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_model_converts(name):
    kwargs, size = {}, 64
    if name.startswith("vit_"):
        size = 56 if name == "vit_h_14" else 64
        kwargs = {"image_size": size}
    elif name.startswith(("inception", "googlenet")):
        size, kwargs = 96, {"init_weights": False}
    elif name.startswith("maxvit"):
        size = 224
    if name in HEAVY:
        with torch.device("meta"):
            model = create_model(name, kwargs)
    else:
        torch.manual_seed(0)
        model = create_model(name, kwargs)
    _check(name, model, size)


def test_timm_list_is_wide_enough():
    import timm.models._registry as reg

    families = {reg._model_to_module[n] for n in TIMM}
    assert len(families) >= 40, sorted(families)


@pytest.mark.parametrize("name", TIMM)
def test_timm_family_converts(name):
    torch.manual_seed(0)
    model = create_model(f"timm/{name}")
    _check(name, model, None)
