"""One progress-bar helper for every long-running step (rich, on stderr, terminals only).

A bar is drawn only when stderr is a terminal and nothing asked for quiet (``--quiet`` on the
command line calls :func:`set_quiet`), so pipes, files and CI logs never get bar frames.
Disabled bars cost nothing and accept the same calls::

    for layer in progress(layers, desc="timing layers"):
        ...

    with Bar(total=steps, desc="epoch 3") as bar:   # advanced by hand
        for batch in loader:
            ...
            bar.update(1, info=f"loss {loss:.3f}")
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, Self

__all__ = ["Bar", "Board", "Tracked", "enabled", "progress", "set_quiet"]

_QUIET = False


def set_quiet(quiet: bool = True) -> None:
    """Turn every progress bar of this process off (``--quiet``) or back on."""
    global _QUIET
    _QUIET = bool(quiet)


def enabled(quiet: bool | None = None) -> bool:
    """Whether a bar would be drawn: stderr is a terminal and neither ``quiet`` nor ``--quiet``."""
    if quiet or _QUIET:
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _rich(transient: bool):
    """The one rich display layout every bar here uses, on stderr, started."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                        console=Console(file=sys.stderr), transient=transient)
    progress.start()
    return progress


class _Display:
    """Stops its rich display on ``close`` / leaving a ``with`` block (no-op when disabled)."""

    _progress: Any = None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bar(_Display):
    """A progress bar advanced by hand (``update``), a no-op where :func:`enabled` is False.

    Args:
        total: number of steps (``None``: unknown, a spinner).
        desc: the label in front of the bar.
        quiet: force it off.
        leave: keep the finished bar on screen (default: erase it).
    """

    def __init__(self, total: int | None = None, desc: str = "", *, quiet: bool | None = None,
                 leave: bool = False) -> None:
        self._progress = None
        self._task = None
        self.desc = desc
        if not enabled(quiet):
            return
        self._progress = _rich(transient=not leave)
        self._task = self._progress.add_task(desc, total=total, info="")

    @property
    def active(self) -> bool:
        return self._progress is not None

    def update(self, n: int = 1, *, info: str | None = None, desc: str | None = None) -> None:
        """Advance by ``n`` steps; ``info`` replaces the text after the bar (e.g. the loss)."""
        if self._progress is None:
            return
        fields: dict[str, Any] = {}
        if info is not None:
            fields["info"] = info
        if desc is not None:
            fields["description"] = desc
        self._progress.update(self._task, advance=n, **fields)



def progress(iterable: Iterable[Any], *, total: int | None = None, desc: str = "",
             quiet: bool | None = None) -> Iterator[Any]:
    """Iterate ``iterable`` with a bar (``total`` default ``len(iterable)`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Bar(total=total, desc=desc, quiet=quiet) as bar:
        for item in iterable:
            yield item
            bar.update(1)


class Board(_Display):
    """Several bars on one display, for nested loops (the epochs and the steps inside one).

    One rich display at a time is all a terminal can hold, so nested loops share this one.
    Disabled (plain iteration, lines printed to stderr) where :func:`enabled` is False.

    Args:
        quiet: force it off.
    """

    def __init__(self, *, quiet: bool | None = None) -> None:
        self._progress = None
        if not enabled(quiet):
            return
        self._progress = _rich(transient=False)

    @property
    def active(self) -> bool:
        return self._progress is not None

    def track(self, iterable: Iterable[Any], total: int | None = None, desc: str = "",
              leave: bool = True) -> Tracked:
        """``iterable`` with a bar of its own on this board (removed at the end unless ``leave``)."""
        return Tracked(self._progress, iterable, total, desc, leave)

    def write(self, line: str) -> None:
        """A line above the bars (or on stderr when there are none)."""
        if self._progress is None:
            print(line, file=sys.stderr)
        else:
            self._progress.console.print(line, markup=False, highlight=False)



class Tracked:
    """An iterable advancing one task of a :class:`Board` (see :meth:`Board.track`)."""

    def __init__(self, progress: Any, iterable: Iterable[Any], total: int | None, desc: str, leave: bool) -> None:
        self._progress, self._iterable, self._leave = progress, iterable, leave
        self._task = None if progress is None else progress.add_task(desc, total=total, info="")
        self._drawn = 0.0

    def __iter__(self) -> Iterator[Any]:
        for item in self._iterable:
            yield item
            if self._progress is not None:
                self._progress.update(self._task, advance=1)
        if self._progress is not None and not self._leave:
            self._progress.remove_task(self._task)

    def set_postfix(self, **fields: Any) -> None:
        """``key=value`` text after the bar (e.g. the running loss), drawn at most 10 times a second."""
        if self._progress is None:
            return
        import time

        self._progress.update(self._task, info="  ".join(f"{k}={v}" for k, v in fields.items()))
        now = time.monotonic()
        if now - self._drawn > 0.1:  # short epochs end before the display's own refresh
            self._drawn = now
            self._progress.refresh()
