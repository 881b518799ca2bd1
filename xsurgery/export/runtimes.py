"""The runtimes an exported file is tuned, verified and timed in: one registry for export and bench.

A :class:`Runtime` bundles what the export driver (``export_onnx(runtime=...)``) and
``xsurgery bench`` need of a runtime: its session factory ``(model, threads) -> session``
(a path or the file's bytes; every session answers ``run(None, feed)`` as ONNX Runtime's
does), the exact session verification runs in, how a session names its inputs, and
:meth:`Runtime.check_installed`, a one-line error naming the pip extra. ONNX Runtime
(``onnxruntime``, bench backend ``ort``) and OpenVINO (``openvino``) are registered here;
a new runtime is one :func:`register_runtime` call.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from . import _ort, _ov

__all__ = ["RUNTIMES", "Runtime", "get_runtime", "list_runtimes", "register_runtime", "unregister_runtime"]


def _run(session: Any, feed: dict[str, Any]) -> list[Any]:
    return session.run(None, feed)


@dataclass(frozen=True)
class Runtime:
    """One runtime: how to make its sessions, run them and check that it is installed."""

    name: str  # export's runtime= / --runtime, and the file's xsurgery.runtime metadata
    label: str  # how log lines and errors name it ("ONNX Runtime")
    backend: str  # the xsurgery bench backend that times files in it ("ort")
    module: str  # the import that must succeed ("onnxruntime")
    package: str  # how the missing-package error names it
    extra: str  # the pip extra that installs it: xsurgery[extra]
    session: Callable[[Any, int | None], Any]  # (path or bytes, threads) -> timing session
    input_names: Callable[[Any], list[str]]  # session -> its input names, in order
    exact_session: Callable[[Any, int | None], Any] | None = None  # verification's; None: ``session`` is exact
    run: Callable[[Any, dict[str, Any]], list[Any]] = _run  # (session, feed) -> outputs

    def check_installed(self, who: str | None = None) -> None:
        """Raise a one-line :class:`UserError` naming the pip extra when the runtime is missing."""
        try:
            importlib.import_module(self.module)
        except ImportError as exc:
            who = who or f"--runtime {self.name}"
            raise UserError(f"{who} needs {self.package}: pip install 'xsurgery[{self.extra}]'") from exc

    def verify_session(self, model: Any, threads: int | None, made: Any = None) -> Any:
        """A session that computes in the file's precision; ``made``: a timing session of the
        same file, reused when the runtime's timing sessions are exact already."""
        if self.exact_session is not None:
            return self.exact_session(model, threads)
        return made if made is not None else self.session(model, threads)

    def runner(self, session: Any, feed: dict[str, Any]) -> Callable[[], list[Any]]:
        """A zero-argument callable that runs ``session`` on ``feed`` (what bench times)."""
        return functools.partial(self.run, session, feed)


_REGISTRY: dict[str, Runtime] = {}


def register_runtime(runtime: Runtime) -> Runtime:
    """Add ``runtime`` to the registry (a name registered twice raises ``ValueError``)."""
    if runtime.name in _REGISTRY:
        raise ValueError(f"runtime {runtime.name!r} is already registered")
    _REGISTRY[runtime.name] = runtime
    return runtime


def unregister_runtime(name: str) -> Runtime:
    """Remove the runtime ``name`` (and return it); unknown names raise as :func:`get_runtime`."""
    runtime = get_runtime(name)
    del _REGISTRY[name]
    return runtime


def get_runtime(name: str) -> Runtime:
    """The registered runtime ``name``; an unknown name is a one-line :class:`UserError`."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown runtime {name!r}; use one of {', '.join(list_runtimes())}") from None


def list_runtimes() -> list[str]:
    """The registered runtime names, in registration order (ONNX Runtime first)."""
    return list(_REGISTRY)


register_runtime(Runtime(
    name="onnxruntime", label="ONNX Runtime", backend="ort", module="onnxruntime", package="onnxruntime",
    extra="onnx", session=_ort.session, input_names=_ort.input_names,
))
# OpenVINO's timing sessions use the CPU's default precision (bf16 where it has it): verify in f32
register_runtime(Runtime(
    name="openvino", label="OpenVINO", backend="openvino", module="openvino", package="OpenVINO",
    extra="openvino", session=_ov.session, input_names=_ov.input_names,
    exact_session=functools.partial(_ov.session, exact=True),
))

RUNTIMES = tuple(list_runtimes())  # the CLI's --runtime choices
