"""The export registries: runtimes (export and bench look runtimes up there) and X-layer forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xsurgery.errors import UserError
from xsurgery.export import RUNTIMES, Runtime, _forms, get_runtime, list_runtimes, register_runtime, unregister_runtime
from xsurgery.layers import X_LAYERS, XConv2d, XLinear


def _fake(name: str = "fake-rt", **kw) -> Runtime:
    calls = []

    def session(model, threads):
        calls.append((model, threads))
        return {"model": model, "threads": threads}

    fields = dict(name=name, label="Fake", backend="fake", module="xsurgery", package="fake", extra="fake",
                  session=session, input_names=lambda s: ["input"], run=lambda s, feed: [s, feed])
    fields.update(kw)
    return Runtime(**fields)


def test_builtin_runtimes_are_registered_in_order():
    assert list_runtimes()[:2] == ["onnxruntime", "openvino"]
    assert RUNTIMES == ("onnxruntime", "openvino")
    assert get_runtime("onnxruntime").backend == "ort" and get_runtime("openvino").label == "OpenVINO"


def test_duplicate_runtime_name_raises():
    with pytest.raises(ValueError, match="'onnxruntime' is already registered"):
        register_runtime(_fake("onnxruntime"))
    assert get_runtime("onnxruntime").label == "ONNX Runtime"  # the original entry stays


def test_unknown_runtime_is_one_line_listing_the_known_ones():
    with pytest.raises(UserError) as info:
        get_runtime("tensorrt")
    text = str(info.value)
    assert "\n" not in text
    assert text == "unknown runtime 'tensorrt'; use one of " + ", ".join(list_runtimes())
    assert "onnxruntime" in text and "openvino" in text


def test_export_rejects_an_unknown_runtime_with_the_registry_message(tmp_path):
    from xsurgery.export import export_onnx

    pytest.importorskip("onnx")
    with pytest.raises(UserError, match="unknown runtime 'nope'; use one of onnxruntime, openvino"):
        export_onnx(nn.Linear(4, 4), tmp_path / "m.onnx", input_size=4, runtime="nope", verbose=False)
    assert not (tmp_path / "m.onnx").exists()


def test_registered_runtime_is_found_then_removed():
    fake = _fake()
    try:
        assert register_runtime(fake) is fake
        assert get_runtime("fake-rt") is fake and list_runtimes()[-1] == "fake-rt"
        sess = fake.session("m.onnx", 3)
        assert fake.verify_session("m.onnx", 3, made=sess) is sess  # no exact session: the timing one
        assert fake.runner(sess, {"input": 1})() == [sess, {"input": 1}]
        fake.check_installed()  # "xsurgery" imports
    finally:
        assert unregister_runtime("fake-rt") is fake
    assert "fake-rt" not in list_runtimes()
    with pytest.raises(UserError, match="unknown runtime 'fake-rt'"):
        get_runtime("fake-rt")


def test_bench_runner_runs_in_the_registered_runtime():
    from xsurgery.bench import runtime_runner

    fake = _fake()
    register_runtime(fake)
    try:
        x = torch.ones(2, 3)
        sess, feed = runtime_runner("fake-rt", "m.onnx", x, threads=2)()
    finally:
        unregister_runtime("fake-rt")
    assert sess == {"model": "m.onnx", "threads": 2}
    assert list(feed) == ["input"] and feed["input"].shape == (2, 3)


def test_exact_session_is_used_for_verification():
    exact = []
    fake = _fake(exact_session=lambda m, t: exact.append((m, t)) or "exact")
    assert fake.verify_session("m.onnx", 1, made="timing") == "exact" and exact == [("m.onnx", 1)]


def test_missing_runtime_names_the_pip_extra():
    fake = _fake(module="xsurgery_no_such_module", package="FakeRT", extra="fakert")
    with pytest.raises(UserError) as info:
        fake.check_installed()
    assert str(info.value) == "--runtime fake-rt needs FakeRT: pip install 'xsurgery[fakert]'"
    with pytest.raises(UserError, match="^the fake backend needs FakeRT: pip install 'xsurgery\\[fakert\\]'$"):
        fake.check_installed("the fake backend")


# ----------------------------------------------------------------------------- forms


def test_every_x_layer_class_has_a_form():
    missing = []
    for cls in X_LAYERS:
        try:
            _forms.form_for(cls)
        except UserError:
            missing.append(cls.__name__)
    assert not missing, f"X-layer classes without an export form: {missing}"
    assert _forms.form_for(XLinear).inner_shape and not _forms.form_for(XConv2d).inner_shape


def test_a_class_without_a_form_is_a_clear_error():
    with pytest.raises(UserError, match="Conv2d has no ONNX export form; known: .*XLinear"):
        _forms.form_for(nn.Conv2d)


def test_register_form_picks_up_a_new_kind_and_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(_forms, "_FORMS", dict(_forms._FORMS))  # this test's entries go with it

    class XNew(XConv2d):
        pass

    class Marker(nn.Module):
        def __init__(self, layer, inner_shape=None):
            super().__init__()
            self.layer, self.inner_shape = layer, inner_shape

    # a subclass finds its base's form until it has its own
    assert _forms.form_for(XNew) is _forms.form_for(XConv2d)
    assert _forms.register_form(XNew)(Marker) is Marker
    layer = XNew(8, 8, 1, compress=2)
    form = _forms._layer_form(layer, "gather", (4,))
    assert isinstance(form, Marker) and form.layer is layer and form.inner_shape == (4,)
    assert not isinstance(_forms._layer_form(layer, "dense"), Marker)  # dense is the layer's to_dense()
    with pytest.raises(ValueError, match="XNew already has an export form"):
        _forms.register_form(XNew)(Marker)
