"""save / load for any converted model: objects, import paths, load(path, model=...)."""

import sys
import textwrap

import pytest
import torch
from torch import nn

import xsurgery
from xsurgery.checkpoint import read_manifest
from xsurgery.errors import UserError
from xsurgery.layers import X_LAYERS
from xsurgery.surgery import SurgerySpec, apply_surgery


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    m.default_input_size = (40,)
    return m


def _conv1d_net() -> nn.Module:
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv1d(4, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 64, 3, padding=1), nn.ReLU(),
                      nn.Conv1d(64, 64, 1), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 3))
    m.default_input_size = (4, 50)
    return m


def _resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(3)
    return torchvision.models.resnet18(num_classes=5)


CASES = [(_mlp, (3, 40)), (_conv1d_net, (3, 4, 50)), (_resnet18, (2, 3, 32, 32))]


@pytest.mark.parametrize("factory, shape", CASES, ids=["mlp", "conv1d", "resnet18"])
def test_save_load_object_bit_exact(factory, shape, tmp_path):
    kw = {"input_size": 32} if factory is _resnet18 else {}
    converted, rep = xsurgery.convert(factory(), compress=4, init="kaiming", seed=7, **kw)
    assert rep.totals["converted_layers"] > 0
    converted.eval()
    path = str(tmp_path / "m.xs")
    manifest = xsurgery.save(converted, path)
    assert manifest["source"]["source"] == "object"
    assert manifest["source"]["class"].endswith(type(converted).__qualname__)
    fresh = factory()  # another seed's weights: the checkpoint's must replace them all
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = xsurgery.load(path, model=fresh).eval()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items()), "model= must not be modified"
    sd_a, sd_b = converted.state_dict(), loaded.state_dict()
    assert list(sd_a) == list(sd_b) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert [type(m) for m in converted.modules()] == [type(m) for m in loaded.modules()]
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(converted(x), loaded(x))
    # and it saves again, to the same bytes
    path2 = str(tmp_path / "again.xs")
    xsurgery.save(loaded, path2)
    with open(path, "rb") as a, open(path2, "rb") as b:
        assert a.read() == b.read()


def test_load_without_model_refuses_in_one_line(tmp_path):
    converted, _ = xsurgery.convert(_mlp(), compress=2)
    path = str(tmp_path / "m.xs")
    xsurgery.save(converted, path)
    with pytest.raises(UserError, match=r"model=.*--model pkg.mod:factory") as err:
        xsurgery.load(path)
    assert "\n" not in str(err.value) and "Sequential" in str(err.value)


def test_load_rejects_wrong_architecture_and_converted_model(tmp_path):
    converted, _ = xsurgery.convert(_mlp(), compress=2)
    path = str(tmp_path / "m.xs")
    xsurgery.save(converted, path)
    with pytest.raises(UserError, match="weights do not match"):
        xsurgery.load(path, model=nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 10)))
    with pytest.raises(UserError, match="dense model"):
        xsurgery.load(path, model=converted)


def test_library_checkpoint_loads_into_given_model_too(tmp_path):
    from xsurgery.models import create_model

    converted, _ = xsurgery.convert("resnet18", compress=2, input_size=32, model_kwargs={"num_classes": 3})
    path = str(tmp_path / "r.xs")
    xsurgery.save(converted, path)
    a = xsurgery.load(path).eval()
    b = xsurgery.load(path, model=create_model("resnet18", {"num_classes": 3})).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_graph_hash_checked_with_model(tmp_path):
    """load(model=) checks every layer's index against the manifest's hash."""
    import json

    from safetensors.torch import load_file, save_file

    from xsurgery.checkpoint import weights_digest

    converted, _ = xsurgery.convert(_mlp(), compress=2)
    path = str(tmp_path / "m.xs")
    xsurgery.save(converted, path)
    m = read_manifest(path)
    assert {d["name"] for d in m["layers"]} == {n for n, x in converted.named_modules() if isinstance(x, X_LAYERS)}
    tensors = load_file(path)
    tensors["2.index"] = tensors["2.index"].flip(0)  # another graph, same shapes
    m["weights"] = weights_digest(tensors)  # a consistent digest: only the graph check can catch it
    bad = str(tmp_path / "bad.xs")
    save_file(tensors, bad, metadata={"xsurgery": json.dumps(m)})
    with pytest.raises(UserError, match="graphs of 2 do not match"):
        xsurgery.load(bad, model=_mlp())


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def audio(width=32):
            torch.manual_seed(0)
            m = nn.Sequential(nn.Conv1d(4, width, 5, padding=2), nn.ReLU(), nn.Conv1d(width, width, 3, padding=1),
                              nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, 3))
            m.default_input_size = (4, 50)
            return m
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mynets:audio"
    sys.modules.pop("mynets", None)


def test_cli_report_and_export_take_model_factory(user_pkg, tmp_path, capsys):
    import json

    from xsurgery.cli import main
    from xsurgery.models import create_model

    dense = create_model(user_pkg, {"width": 16})
    del dense._xsurgery_source  # as if the user built it themselves
    converted, rep = xsurgery.convert(dense, compress=2)
    path = str(tmp_path / "a.xs")
    xsurgery.save(converted, path)
    assert main(["report", path, "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model pkg.mod:factory" in err[0]
    assert main(["report", path, "--model", user_pkg, "--model-kwargs", '{"width": 16}', "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["params_after"] == rep.totals["params_after"]
    assert data["totals"]["macs_after"] == rep.totals["macs_after"]
    assert main(["report", path, "--model", user_pkg, "--json"]) == 2  # width 32: wrong architecture
    assert "weights do not match" in capsys.readouterr().err
    assert main(["report", "resnet18", "--model", user_pkg]) == 2
    assert "only applies to a checkpoint" in capsys.readouterr().err


def test_apply_surgery_then_save_any_spec(tmp_path):
    """A model converted with apply_surgery (no convert) saves and loads too."""
    model = _conv1d_net()
    out, _, _ = apply_surgery(model, SurgerySpec(degree=8, mixing=1, graph="grouped", include_stem=True))
    path = str(tmp_path / "g.xs")
    xsurgery.save(out, path)
    loaded = xsurgery.load(path, model=_conv1d_net())
    x = torch.randn(2, 4, 50)
    with torch.no_grad():
        assert torch.equal(out(x), loaded(x))


class _NeedsVersion(nn.Module):
    """As torchvision's MNASNet: refuses a state dict whose metadata has no module version."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 1), nn.ReLU(), nn.Conv2d(32, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):  # noqa: ANN001
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_a_module_that_checks_its_version_loads_from_the_file(tmp_path):
    converted, _ = xsurgery.convert(_NeedsVersion(), compress=4, input_size=(8, 6, 6))
    path = str(tmp_path / "v.xs")
    xsurgery.save(converted, path)
    loaded = xsurgery.load(path, model=_NeedsVersion()).eval()  # safetensors carry no versions: the code's are used
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))
    dense = str(tmp_path / "dense.xs")
    xsurgery.save(_NeedsVersion(), dense)
    from xsurgery.models import load_weights

    load_weights(_NeedsVersion(), dense)  # --weights FILE into the same kind of module
