"""Checkpoints: safetensors weights + a JSON manifest that records the surgery (data, never code)."""

from __future__ import annotations

from ._manifest import check_finite, weights_digest
from ._store import (
    FORMAT,
    SAVE_FORMATS,
    check_save_target,
    is_checkpoint_path,
    load,
    load_dense,
    read_manifest,
    resolve_model,
    save,
    write_atomic,
)

__all__ = [
    "FORMAT",
    "SAVE_FORMATS",
    "check_save_target",
    "check_finite",
    "weights_digest",
    "is_checkpoint_path",
    "load",
    "load_dense",
    "read_manifest",
    "resolve_model",
    "save",
    "write_atomic",
]
