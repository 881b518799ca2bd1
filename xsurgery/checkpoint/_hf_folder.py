"""Hugging Face folders: ``config.json`` + ``model.safetensors`` (+ tokenizer files) that reload.

``save(model, folder, format="hf")`` writes what ``save_pretrained`` users recognise: the
model's own ``config.json`` (as ``save_pretrained`` writes it) with one more section,
``xsurgery``, holding the checkpoint manifest (the same one an ``.xs`` file carries: source,
surgery, every X-layer's graph and every tensor's sha256), ``model.safetensors`` with the
compact weights, and the tokenizer/processor files when the model came with them.

Loading reads the folder as data: ``config.json`` is size- and depth-bounded, its
``xsurgery`` section is schema-checked (no unknown keys, no import path as a source), the
dense model is built only from a class transformers registers for the config's
``model_type`` (:func:`xsurgery.models.hf_model_from_config`; never remote code), then the
recorded surgery and the weights are applied exactly as for an ``.xs`` file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from .._util.copying import uncompiled
from .._util.io import TMP_PREFIX, os_error, read_limited
from .._util.text import safe_repr, safe_text
from ..errors import UserError
from . import _manifest
from ._apply import assemble

__all__ = ["CONFIG", "WEIGHTS", "check_target", "dense_of_folder", "is_folder", "load_folder", "read_folder_manifest",
           "write_folder"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SECTION = "xsurgery"
MAX_CONFIG_BYTES = 16 << 20
MAX_SIDE_FILE_BYTES = 256 << 20  # one tokenizer/processor file
# what a tokenizer or processor saves (copied from the folder a model was loaded from)
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "bpe.codes",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "chat_template.jinja", "chat_template.json",
)
# the manifest's keys (xsurgery.checkpoint's manifest_of) and the folder's own "hf" entry
_SECTION_KEYS = {"format", "format_version", "source", "surgery", "input_size", "layers", "versions", "weights",
                 "extra", "hf"}
_SOURCE_KEYS = {"source", "model_kwargs", "pretrained", "class"}
_LAYER_KEYS = {"name", "degree", "blocks", "graph", "seed", "index_hash"}
_HF_KEYS = {"attn_implementation"}


def is_folder(path: Any) -> bool:
    """A folder holding a ``config.json`` (written by ``save(..., format="hf")`` or not)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


# ------------------------------------------------------------------------------ reading


def _read_config(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config fields, validated ``xsurgery`` section) of the folder ``path``."""
    where = os.path.join(path, CONFIG)
    text = read_limited(where, MAX_CONFIG_BYTES, "config")
    try:
        fields = json.loads(text)
    except RecursionError:
        raise UserError(f"{where} is nested deeper than {_manifest.MAX_DEPTH}; the file was altered") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a number of thousands of digits
        raise UserError(f"{where} is not valid JSON ({safe_text(str(exc).splitlines()[0], 100)})") from None
    if not isinstance(fields, dict):
        raise UserError(f"{where} is not a JSON object; the file was altered")
    if SECTION not in fields:
        raise UserError(f"{where} has no xsurgery section: a plain Hugging Face folder, not written by "
                        f"xsurgery.save(..., format='hf'); load it with transformers' from_pretrained and pass the "
                        f"model to xsurgery.convert")
    _manifest._bounded(fields, where, "config")
    section = fields.pop(SECTION)
    _check_section(section, where)
    return fields, section


def _no_unknown(value: dict[str, Any], allowed: set[str], where: str, what: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise UserError(f"{where}: {what} has unknown key(s) {safe_text(', '.join(unknown), 80)}; the file was altered "
                        f"or was written by a newer xsurgery")


def _check_section(section: Any, where: str) -> None:
    """The ``xsurgery`` section, checked as a manifest is (and stricter: no unknown keys, a
    source that is a library name or ``object``, never an import path or a file)."""
    from ..models import ATTENTION, is_library_name

    if not isinstance(section, dict):
        raise UserError(f"{where}: its xsurgery section is not an object; the file was altered")
    _no_unknown(section, _SECTION_KEYS, where, "the xsurgery section")
    if section.get("format") != _manifest.FORMAT or section.get("format_version") != _manifest.FORMAT_VERSION:
        raise UserError(f"{where}: unsupported xsurgery section format {safe_repr(section.get('format'), 40)} "
                        f"v{safe_repr(section.get('format_version'), 10)}")
    _manifest.validate(section, where)
    src = section["source"]
    _no_unknown(src, _SOURCE_KEYS, where, "the xsurgery section's source")
    name = src["source"]
    if name != "object" and not is_library_name(name):
        raise UserError(f"{where}: its xsurgery section names {safe_repr(name, 80)} as its source, which is not a "
                        f"library model name; a folder's model is built from config.json alone and no code or file "
                        f"a folder names is used")
    if not (src.get("class") is None or isinstance(src["class"], str)):
        raise UserError(f"{where}: its xsurgery section's source class must be a string; the file was altered")
    for entry in section.get("layers", []):
        _no_unknown(entry, _LAYER_KEYS, where, f"layer entry {safe_repr(entry.get('name'), 60)}")
    if not isinstance(section.get("versions", {}), dict):
        raise UserError(f"{where}: its xsurgery section's versions must be an object; the file was altered")
    hf = section.get("hf", {})
    if not isinstance(hf, dict):
        raise UserError(f"{where}: its xsurgery section's hf entry must be an object; the file was altered")
    _no_unknown(hf, _HF_KEYS, where, "the xsurgery section's hf entry")
    if hf.get("attn_implementation", "eager") not in ATTENTION:
        raise UserError(f"{where}: attn_implementation {safe_repr(hf.get('attn_implementation'), 60)} is not one of "
                        f"{', '.join(ATTENTION)}; the file was altered")


def read_folder_manifest(path: str) -> dict[str, Any]:
    """The validated ``xsurgery`` section of a folder's ``config.json``."""
    return _read_config(path)[1]


def _dense(path: str, fields: dict[str, Any], section: dict[str, Any]) -> nn.Module:
    from ..models import hf_model_from_config

    attn = section.get("hf", {}).get("attn_implementation", "eager")
    return hf_model_from_config(fields, os.path.join(path, CONFIG), attn_implementation=attn)


def dense_of_folder(path: str) -> nn.Module:
    """The dense architecture a folder was converted from (random weights)."""
    fields, section = _read_config(path)
    return _dense(path, fields, section)


def _read_weights(path: str, section: dict[str, Any], allow_nonfinite: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    where = os.path.join(path, WEIGHTS)
    if not os.path.isfile(where):
        raise UserError(f"{where} does not exist; a Hugging Face folder written by xsurgery holds its weights there")
    _manifest.read_header(where)  # bounded, and exactly header + tensor data
    try:
        tensors = load_file(where, device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise UserError(f"{where} is not a readable safetensors file ({str(exc).splitlines()[0][:100]})") from exc
    _manifest.verify_weights(section, tensors, where, allow_nonfinite=allow_nonfinite)
    return tensors


def load_folder(path: str, *, model: nn.Module | None = None, map_location: str = "cpu",
                allow_nonfinite: bool = False) -> nn.Module:
    """The converted model a folder describes, in eval mode (see :func:`xsurgery.load`)."""
    fields, section = _read_config(path)
    tensors = _read_weights(path, section, allow_nonfinite)
    dense = uncompiled(model) if model is not None else _dense(path, fields, section)
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if model is None and len(floating) == 1 and floating != {torch.float32}:
        dense = dense.to(floating.pop())  # a half-precision model computes in its own dtype again
    built = assemble(os.path.join(path, WEIGHTS), section, tensors, dense, copy_dense=model is not None,
                     map_location=map_location)
    built._xsurgery_hf_folder = os.path.abspath(path)  # its tokenizer files travel with a later save
    return built.eval()


# ------------------------------------------------------------------------------ writing


def _wrote_by_xsurgery(path: str) -> bool:
    try:
        data = json.loads(read_limited(os.path.join(path, CONFIG), MAX_CONFIG_BYTES, "config"))
    except (UserError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get(SECTION), dict)


def check_target(path: str, *, force: bool = False) -> None:
    """Refuse, before any work, a folder that cannot be written: it exists (not empty) without
    ``force``; it is a file, a link, or a folder xsurgery did not write (even with ``force``:
    replacing it would delete what it holds); its parent is missing or not writable."""
    path = os.fspath(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"output name {safe_text(path)} is not valid UTF-8; choose a plain name") from None
    if os.path.islink(path.rstrip("/") or path):
        raise UserError(f"{safe_text(path)} is a link; xsurgery writes a folder only under a new or its own name")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{safe_text(path)} exists and is not a folder; format='hf' writes a folder: choose a new name")
    if os.path.isdir(path) and os.listdir(path):
        if not force:
            raise UserError(f"{path} exists; pass --force to overwrite it")
        if not _wrote_by_xsurgery(path):
            raise UserError(f"{safe_text(path)} is a folder xsurgery did not write; choose a new name or empty it "
                            f"yourself (--force replaces only xsurgery's own folders)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: folder {parent} is not writable; choose a folder you can write to")


def _source_folder(model: nn.Module) -> str | None:
    """The local folder the model was loaded from (by :func:`load_folder`, or by transformers'
    ``from_pretrained`` on a local folder), whose tokenizer/processor files travel with it."""
    for folder in (getattr(model, "_xsurgery_hf_folder", None), getattr(model, "name_or_path", None)):
        if isinstance(folder, str) and folder and is_folder(folder):
            return folder
    return None


def _save_side_objects(tmp: str, tokenizer: Any, processor: Any) -> None:
    import transformers as tf

    kinds = {"tokenizer": (tokenizer, ("PreTrainedTokenizerBase",)),
             "processor": (processor, ("ProcessorMixin", "ImageProcessingMixin", "FeatureExtractionMixin"))}
    for what, (obj, bases) in kinds.items():
        if obj is None:
            continue
        classes = tuple(c for c in (getattr(tf, b, None) for b in bases) if isinstance(c, type))
        if not isinstance(obj, classes):
            raise UserError(f"{what}= must be a transformers {what} ({' or '.join(bases)}), got {type(obj).__name__}")
        obj.save_pretrained(tmp)


def _copy_side_files(src: str, tmp: str) -> None:
    for name in SIDE_FILES:
        full = os.path.join(src, name)
        if os.path.isfile(full):
            data = read_limited(full, MAX_SIDE_FILE_BYTES, "tokenizer file")
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _config_json(model: nn.Module, arch: str, manifest: dict[str, Any]) -> bytes:
    from ..models import ATTENTION

    fields = json.loads(model.config.to_json_string(use_diff=True))  # as save_pretrained writes it
    fields.pop("_name_or_path", None)  # a path on the saving machine
    fields["architectures"] = [arch]
    attn = getattr(model.config, "_attn_implementation", None)
    section = {**manifest, "hf": {"attn_implementation": attn if attn in ATTENTION else "sdpa"}}
    fields[SECTION] = section
    return (json.dumps(fields, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _move_into_place(tmp: str, path: str, force: bool) -> None:
    """Rename the complete temp folder onto ``path``; an existing folder (checked by
    :func:`check_target`) is moved aside first and removed once the new one is in place."""
    if not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path)):
        os.replace(tmp, path)  # rename(2) replaces an empty folder
        return
    if not force:  # appeared while we wrote: still no silent overwrite
        raise UserError(f"{path} exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    old = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-old-", dir=parent)
    os.rmdir(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_folder(model: nn.Module, path: str, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                 force: bool = False, tokenizer: Any = None, processor: Any = None) -> None:
    """Write the folder atomically: everything goes into a temp folder beside ``path``,
    renamed onto it once complete (removed on any failure)."""
    from safetensors.torch import save as to_bytes

    from ..models import hf_architecture

    path = os.fspath(path)
    arch = hf_architecture(model)
    if arch is None:
        raise UserError(f"format='hf' saves a Hugging Face transformers model (a transformers PreTrainedModel class); "
                        f"{type(model).__name__} is not one: save it as an .xs file (format='xs')")
    check_target(path, force=force)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix="-" + os.path.basename(os.path.abspath(path))[:64],
                               dir=parent)
        if tokenizer is not None or processor is not None:
            _save_side_objects(tmp, tokenizer, processor)
        elif (src := _source_folder(model)) is not None:
            _copy_side_files(src, tmp)
        for name in (CONFIG, WEIGHTS):  # ours, whatever a tokenizer wrote
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(tmp, name))
        _write(os.path.join(tmp, WEIGHTS), to_bytes(tensors, metadata={"format": "pt"}))
        _write(os.path.join(tmp, CONFIG), _config_json(model, arch, manifest))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an output is as readable as any other folder
        _move_into_place(tmp, path, force)
        tmp = None
    except OSError as exc:
        raise os_error(path, exc) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
