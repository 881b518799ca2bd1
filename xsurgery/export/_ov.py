"""OpenVINO as the runtime ``layout="auto"`` tunes for (``export --runtime openvino``); its
entry in :mod:`xsurgery.export.runtimes`.

A compiled OpenVINO model behind the ``run(None, feed)`` call of an ORT session, so the
export's timing and verification code runs unchanged on either runtime. Timing sessions use
OpenVINO's default inference precision on this CPU (what a deployment gets: bf16 where the
CPU has it); the verification session asks for f32, so it compares the file's math.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any


class _OVSession:
    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def run(self, _names: Any, feed: dict[str, Any]) -> list[Any]:
        import numpy as np

        res = self.request.infer(feed)
        # copies: the request reuses its output buffers on the next call
        return [np.array(res[o], copy=True) for o in self.compiled.outputs]


def session(model: str | bytes, threads: int | None, *, exact: bool = False) -> _OVSession:
    """An OpenVINO CPU session (latency hint, one stream, ``threads``); ``exact``: f32 precision."""
    import openvino as ov

    core = ov.Core()
    if isinstance(model, bytes):
        fd, path = tempfile.mkstemp(suffix=".onnx")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model)
            read = core.read_model(path)
        finally:
            os.remove(path)
    else:
        read = core.read_model(str(model))
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if exact:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return _OVSession(core.compile_model(read, "CPU", config))


def input_names(sess: _OVSession) -> list[str]:
    """The compiled model's input names, in order."""
    return [i.get_any_name() for i in sess.compiled.inputs]
