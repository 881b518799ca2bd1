"""The ``xsurgery`` command line: the only place that parses arguments; thin over the Python API."""

from __future__ import annotations

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
