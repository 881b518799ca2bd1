"""Text from files, made safe to print and to parse.

* :func:`safe_text` / :func:`safe_repr`: what a file holds (a layer name, ONNX metadata, a
  model source, a value in a plan or recipe) is printed through these: control characters,
  newlines and other invisible code points are escaped (no spoofed lines, no terminal escape
  codes) and the result is cut to a bounded length. ``safe_repr`` formats containers with
  bounded depth and counts, so formatting a huge or self-similar value is bounded in time.
* :func:`load_yaml`: the one YAML reader of the package (plans, recipes, ``key=value``
  overrides): size-capped, and refusing anchors/aliases (the "billion laughs" expansion) and
  any tag beyond plain data.
"""

from __future__ import annotations

import reprlib
import unicodedata
from typing import Any

from ..errors import UserError

__all__ = ["MAX_YAML_BYTES", "load_yaml", "safe_repr", "safe_text"]

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


def _escape_char(ch: str) -> str:
    o = ord(ch)
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def _unsafe(ch: str) -> bool:
    if " " <= ch <= "~":
        return False
    cat = unicodedata.category(ch)
    return cat.startswith("C") or cat in ("Zl", "Zp")


def safe_text(value: Any, limit: int = 200) -> str:
    """``value`` (a string, or anything via :func:`safe_repr`) with every control, format or
    line-break character escaped, cut to about ``limit`` characters (``...`` marks a cut)."""
    text = value if isinstance(value, str) else safe_repr(value, limit)
    cut = len(text) > limit
    text = text[:limit]
    out = "".join(_escape_char(c) if _unsafe(c) else c for c in text)
    return out + ("..." if cut else "")


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 6
_REPR.maxstring = 120
_REPR.maxlong = 40
_REPR.maxother = 60


def safe_repr(value: Any, limit: int = 120) -> str:
    """A ``repr`` of ``value`` bounded in depth, counts and length, with unsafe characters
    escaped: for error messages naming a value read from a file or the command line."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose repr fails: name its type
        text = f"<{type(value).__name__}>"
    cut = len(text) > limit
    text = text[:limit]
    return "".join(_escape_char(c) if _unsafe(c) else c for c in text) + ("..." if cut else "")


def load_yaml(text: str | bytes, what: str) -> Any:
    """Parse YAML ``text`` as plain data (mappings, lists, strings, numbers, booleans, null).

    Raises:
        UserError: larger than :data:`MAX_YAML_BYTES`, an anchor or alias (``&a``/``*a``,
            which can expand a few hundred bytes into gigabytes), a tag, or invalid YAML;
            ``what`` names the source in the message.
    """
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{what} is larger than {MAX_YAML_BYTES >> 20} MiB; shorten it")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # lazily: stops at the first problem
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise UserError(f"{what} uses a YAML anchor or alias (&/*); write the values out instead")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise UserError(f"{what} is nested deeper than {MAX_YAML_DEPTH} levels; "
                                    f"a plan or recipe is a few levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except UserError:
        raise
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what} is not valid YAML: {safe_text(first, 160)}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{what} holds a value that cannot be read ({safe_text(str(exc), 120)})") from None
    except RecursionError:
        raise UserError(f"{what} is nested too deeply; a plan or recipe is a few levels deep") from None
