"""One progress-bar helper for every long-running step (tqdm, on stderr, terminals only).

A bar is shown only when stderr is a terminal and nothing asked for quiet (``--quiet`` on the
command line calls :func:`set_quiet`), so pipes, files and CI logs never get bar frames.

    for layer in progress(layers, desc="timing layers"):
        ...
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["enabled", "progress", "set_quiet"]

_QUIET = False


def set_quiet(quiet: bool = True) -> None:
    """Turn every progress bar of this process off (``--quiet``) or back on."""
    global _QUIET
    _QUIET = bool(quiet)


def enabled(quiet: bool | None = None) -> bool:
    """Whether a bar would be drawn: stderr is a terminal and neither ``quiet`` nor ``--quiet``."""
    if quiet or _QUIET:
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    leave: bool = False,
    quiet: bool | None = None,
) -> Any:
    """A ``tqdm`` bar over ``iterable`` (or a manual one: ``bar.update()``), drawn only on a terminal.

    Args:
        iterable: what to iterate; ``None`` for a bar advanced by hand with ``update(n)``.
        total: number of steps (default ``len(iterable)`` when it has one).
        desc: the label in front of the bar.
        leave: keep the finished bar on screen (default: erase it).
        quiet: force the bar off for this call.

    Returns:
        A ``tqdm`` object; disabled bars still iterate and accept ``update``/``close``.
    """
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=not enabled(quiet),
                dynamic_ncols=True, file=sys.stderr)
