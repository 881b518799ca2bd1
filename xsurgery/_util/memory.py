"""Refusing sizes the machine cannot hold, before allocating them.

A user's ``--input-size 100000`` or ``--static-batch 10**6`` would otherwise ask the allocator
for hundreds of GB and end in a traceback (or the kernel's OOM killer). :func:`check_alloc`
compares a tensor's byte size with the memory available now and refuses with one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from ..errors import UserError

__all__ = ["available_bytes", "check_alloc", "is_out_of_memory"]

HEADROOM = 16  # activations of a forward pass, as a multiple of the input (a CNN's first layers: 5-10x)


def available_bytes() -> int:
    """Memory available to this process now (``MemAvailable``; physical memory elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: refuse nothing


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def check_alloc(shape: Sequence[int], itemsize: int, what: str, *, device: str = "cpu",
                headroom: int = HEADROOM) -> None:
    """Refuse an input tensor of ``shape`` when running a model on it cannot fit in the memory
    available now: the tensor itself times ``headroom`` (a network's activations are many
    times its input; past the limit the kernel kills the process instead of raising).

    Raises:
        UserError: naming ``what``, the size it would need and what is available.
    """
    if device != "cpu":
        return  # a device's allocator raises its own out-of-memory error, which the CLI prints in one line
    size = math.prod(int(s) for s in shape) * int(itemsize)
    have = available_bytes()
    if size * headroom > have:
        raise UserError(f"{what} of shape {list(shape)} is {_human(size)}; running a model on it needs about "
                        f"{headroom}x that, more than the {_human(have)} of memory available; use a smaller "
                        f"input size or batch")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure from torch or Python (shown as one line by the CLI)."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(__import__("torch"), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
