"""mix_points: "chain" makes the widest layer of each chain of converted layers (and a layer
parallel to a chain) grouped, "alternate" every other layer from the widest; "auto" (default) is
"alternate" at mixing 1 only ("chain" for specs saved at version 1). Reach through the real
network is checked by autograd, independently of the masks."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from xsurgery import convert
from xsurgery.checkpoint import load, save
from xsurgery.errors import UserError
from xsurgery.export import export_onnx
from xsurgery.surgery import SurgerySpec


class Bottleneck(nn.Module):
    def __init__(self, c: int, mid: int, down: bool = False) -> None:
        super().__init__()
        cin = c // 2 if down else c
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c)) if down else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet_like() -> nn.Module:
    stem = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())  # kept dense
    head = nn.Conv2d(64, 10, 1)  # the classifier (kept dense)
    return nn.Sequential(stem, Bottleneck(64, 16, down=True), *[Bottleneck(64, 16) for _ in range(4)], head).eval()


def _x_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "index") and hasattr(m, "_identity")}


def _full_reach_depth(model: nn.Module, blocks: int, c_in: int) -> int | None:
    """Blocks after which every output channel depends on every input channel, by autograd
    (ReLUs made identities: reach is structural, a dead unit would hide it)."""
    torch.manual_seed(0)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Identity())
    for depth in range(1, blocks + 1):
        prefix = model[1:depth + 1]  # ``depth`` blocks after the (dense, mixing) stem
        x = torch.randn(1, c_in, 1, 1)
        jac = torch.autograd.functional.jacobian(lambda t, p=prefix: p(t).flatten(), x).reshape(-1, c_in)
        if bool((jac.abs() > 0).all()):
            return depth
    return None


def test_chain_drops_the_widest_permutation_of_each_chain_and_parallel_downsample():
    model, _ = convert(resnet_like(), compress=4, mixing=1, mix_points="chain", check=False, input_size=(32, 8, 8))
    layers = _x_layers(model)
    no_perm = {n for n, m in layers.items() if m._identity}
    # block 1: conv1 reads 32, conv2 16, conv3 16 -> conv1 (widest) and the downsample (parallel)
    # blocks 2-5: conv1 reads the 64-wide stream -> conv1
    assert no_perm == {"1.conv1", "1.downsample.0", "2.conv1", "3.conv1", "4.conv1", "5.conv1"}
    for i in range(1, 6):  # every chain still permutes somewhere
        assert not layers[f"{i}.conv2"]._identity and not layers[f"{i}.conv3"]._identity
        assert layers[f"{i}.conv1"].graph.construction == "grouped"


def test_alternate_keeps_every_other_permutation_of_each_chain_from_the_widest():
    model, report = convert(resnet_like(), compress=4, mixing=1, check=False, input_size=(32, 8, 8))  # auto
    layers = _x_layers(model)
    # conv1 reads 32 or 64 (the widest: grouped), conv2 16 (permuted), conv3 16 (grouped again)
    assert {n for n, m in layers.items() if not m._identity} == {f"{i}.conv2" for i in range(1, 6)}
    assert {n for n, m in layers.items() if m.graph.construction == "grouped"} == (
        {f"{i}.conv{j}" for i in range(1, 6) for j in (1, 3)} | {"1.downsample.0"})
    note = next(r.note for r in report.layers if r.name == "2.conv3")
    assert "'alternate': 2.conv2 mixes this path" in note
    alternate, _ = convert(resnet_like(), compress=4, mixing=1, mix_points="alternate", check=False,
                           input_size=(32, 8, 8))
    assert all(torch.equal(a.index, b.index) for a, b in zip(layers.values(), _x_layers(alternate).values()))


def test_every_keeps_the_graph_everywhere_and_auto_only_at_mixing_1():
    for mixing in (1, 2):
        every, _ = convert(resnet_like(), compress=4, mixing=mixing, mix_points="every", check=False,
                           input_size=(32, 8, 8))
        # graph auto: paired where a layer mixes 2, random at mixing 1
        assert {m.graph.construction for m in _x_layers(every).values()} == {"random" if mixing == 1 else "paired"}
    k2, _ = convert(resnet_like(), compress=4, mixing=2, check=False, input_size=(32, 8, 8))  # auto, mixing 2
    assert {m.graph.construction for m in _x_layers(k2).values()} == {"paired"}
    default, _ = convert(resnet_like(), compress=4, check=False, input_size=(32, 8, 8))  # mixing 1: alternate
    assert {m.graph.construction for m in _x_layers(default).values()} == {"grouped", "random"}
    mixed, _ = convert(resnet_like(), compress=4, mixing=2, check=False, input_size=(32, 8, 8),
                       plan=[{"pattern": "[1-3].*", "mixing": 1}])  # auto: alternate only where mixing is 1
    grouped = {n for n, m in _x_layers(mixed).items() if m.graph.construction == "grouped"}
    assert grouped == {"1.conv1", "1.conv3", "1.downsample.0", "2.conv1", "2.conv3", "3.conv1", "3.conv3"}


def test_chain_with_mixing_2_makes_the_same_layers_grouped_and_keeps_the_rest():
    k2, _ = convert(resnet_like(), compress=4, mixing=2, mix_points="chain", check=False, input_size=(32, 8, 8))
    every, _ = convert(resnet_like(), compress=4, mixing=2, mix_points="every", check=False, input_size=(32, 8, 8))
    grouped = {n for n, m in _x_layers(k2).items() if m.graph.construction == "grouped"}
    assert grouped == {"1.conv1", "1.downsample.0", "2.conv1", "3.conv1", "4.conv1", "5.conv1"}
    for (n, a), (_, b) in zip(_x_layers(k2).items(), _x_layers(every).items()):
        assert a.degree == b.degree and a.weight.shape == b.weight.shape, n  # same D, params, MACs
        if n in grouped:
            assert a._identity and a.blocks == a.in_features // a.degree  # G = C_in / D, no gather
        else:
            assert torch.equal(a.index, b.index) and a.blocks == 2 * a.in_features // a.degree, n


@pytest.mark.parametrize("mixing,compress", [(1, 4), (1, 8), (2, 4), (2, 8)])
def test_reach_through_the_network_is_at_most_one_block_slower_per_mode(mixing, compress):
    depths = {}
    for mode in ("chain", "alternate", "every"):
        model, _ = convert(resnet_like(), compress=compress, mixing=mixing, mix_points=mode, check=False,
                           input_size=(32, 8, 8))
        assert mode == "every" or any(m._identity for m in _x_layers(model).values())
        depths[mode] = _full_reach_depth(model, 5, 32)
    grouped, _ = convert(resnet_like(), compress=compress, graph="grouped", check=False, input_size=(32, 8, 8))
    assert _full_reach_depth(grouped, 5, 32) is None  # the baseline never mixes: the check can fail
    # each mode reaches at most one block later than the one with more permutations (D = 2 at C = 8:
    # a permutation reaches twice as far per block, so here every one counts)
    assert depths["chain"] is not None and depths["chain"] <= depths["every"] + 1, depths
    assert depths["alternate"] is not None and depths["alternate"] <= depths["chain"] + 1, depths


def test_plain_chain_chain_keeps_all_but_one_permutation_and_alternate_every_other():
    seq = nn.Sequential(*[m for _ in range(5) for m in (nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU())]).eval()
    flags = {}
    for mode in ("chain", "alternate"):
        model, _ = convert(seq, compress=4, mixing=1, mix_points=mode, check=False, input_size=(32, 4, 4))
        flags[mode] = [m._identity for m in _x_layers(model).values()]  # first and last: stem, classifier (dense)
    assert flags == {"chain": [True, False, False], "alternate": [True, False, True]}


@pytest.mark.parametrize("mode,permuted", [("chain", 10), ("alternate", 5)])  # 16 converted, 6 or 11 without a permutation
def test_export_has_a_gather_only_where_the_model_permutes(tmp_path, mode, permuted):
    model, _ = convert(resnet_like(), compress=4, mixing=1, mix_points=mode, check=False, input_size=(32, 8, 8))
    assert sum(not m._identity for m in _x_layers(model).values()) == permuted
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, example_inputs=torch.randn(1, 32, 8, 8), layout="gather", verbose=False, force=True)
    gathers = [n for n in onnx.load(path).graph.node if n.op_type == "Gather"]
    assert len(gathers) == permuted


def test_checkpoints_round_trip_and_older_specs_mean_every(tmp_path):
    model, _ = convert(resnet_like(), compress=4, mixing=1, check=False, input_size=(32, 8, 8))
    save(model, str(tmp_path / "m.xs"))
    back = load(str(tmp_path / "m.xs"), model=resnet_like())
    for (n, a), (_, b) in zip(_x_layers(model).items(), _x_layers(back).items()):
        assert torch.equal(a.index, b.index), n
    # a checkpoint written before the field existed loads with the graph at every layer
    every, _ = convert(resnet_like(), compress=4, mixing=1, mix_points="every", check=False, input_size=(32, 8, 8))
    every._xsurgery_spec.pop("mix_points")
    save(every, str(tmp_path / "old.xs"))
    old = load(str(tmp_path / "old.xs"), model=resnet_like())
    assert not any(m._identity for m in _x_layers(old).values())
    assert SurgerySpec.from_dict({"mixing": 1}).mix_points == "auto"  # recipes: today's default
    # a checkpoint written at spec version 1, when auto meant chain at mixing 1, keeps that structure
    chain, _ = convert(resnet_like(), compress=4, mixing=1, mix_points="chain", check=False, input_size=(32, 8, 8))
    chain._xsurgery_spec.update(mix_points="auto", version=1)
    save(chain, str(tmp_path / "v1.xs"))
    v1 = load(str(tmp_path / "v1.xs"), model=resnet_like())
    assert all(torch.equal(a.index, b.index) for a, b in zip(_x_layers(chain).values(), _x_layers(v1).values()))
    assert sum(not m._identity for m in _x_layers(v1).values()) == 10
    for bad in (3, True, "2"):
        with pytest.raises(UserError, match="version"):
            SurgerySpec.from_dict({"mixing": 1, "version": bad})
    with pytest.raises(UserError, match="--mix-points"):
        SurgerySpec(mixing=1, mix_points="sometimes")
    spec = SurgerySpec(mix_points="chain")
    assert SurgerySpec.from_dict(spec.to_dict()) == spec
