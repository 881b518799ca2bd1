"""Hugging Face transformers models by name (``hf/bert``), built offline from config objects.

A model is built from the library's default configuration of its architecture with random
weights: nothing is downloaded. ``model_kwargs`` override config fields (a field the config
does not have is an error, not silently stored). Attention runs as plain matmuls
(``attn_implementation="eager"``) so that the report counts its MACs, and the KV cache is off
so that outputs are plain tensors (exportable). transformers is optional (``xsurgery[hf]``).

:func:`hf_model_from_config` builds the dense model a saved ``config.json`` describes (a
Hugging Face folder written by ``xsurgery.save(..., format="hf")``): the config is data, so
its class comes only from transformers' own tables (``model_type`` in ``CONFIG_MAPPING``,
``architectures`` among the model classes transformers registers for that type), never
remote code or an import path, and its fields are bounded as ``--model-kwargs`` are.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

from .._util.text import safe_repr, safe_text
from ..errors import UserError

__all__ = ["ATTENTION", "SHORT_NAMES", "create_hf_model", "hf_architecture", "hf_model_from_config"]

# short name -> (config class, model class)
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "bert": ("BertConfig", "BertModel"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "t5": ("T5Config", "T5ForConditionalGeneration"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "vit": ("ViTConfig", "ViTModel"),
}
# default configs that are far too large to build on a laptop: a small model of the same shape
SMALL: dict[str, dict[str, Any]] = {
    # LlamaConfig() is LLaMA-7B (6.7 B parameters, 27 GB in float32)
    "llama": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 8},
}


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise UserError("hf/ models need transformers: pip install 'xsurgery[hf]'") from exc
    return transformers


def _config_class(tf, name: str):
    """A short name, a ``model_type`` (``roberta``) or a config class name (``RobertaConfig``)."""
    key = name.lower()
    if key in SHORT_NAMES:
        return getattr(tf, SHORT_NAMES[key][0]), getattr(tf, SHORT_NAMES[key][1])
    mapping = tf.models.auto.configuration_auto.CONFIG_MAPPING
    candidates = [key, key[: -len("config")] if key.endswith("config") else key]
    for model_type in candidates:
        model_type = model_type.replace("-", "_")
        if model_type in mapping:
            return mapping[model_type], None
    import difflib

    close = difflib.get_close_matches(key, list(SHORT_NAMES) + list(mapping.keys()), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join('hf/' + c for c in close)}?" if close else \
        f"; short names: {', '.join('hf/' + n for n in SHORT_NAMES)}, or any transformers model_type"
    raise UserError(f"unknown Hugging Face model {safe_repr(name)}{hint}")


def create_hf_model(name: str, model_kwargs: dict[str, Any] | None = None, pretrained: bool = False) -> nn.Module:
    """Build ``hf/<name>`` from its default config with random weights.

    Args:
        name: ``bert``, ``gpt2``, ``t5``, ``llama``, ``vit``, or any transformers ``model_type``
            / config class name (built with ``AutoModel.from_config``).
        model_kwargs: config fields to override, e.g. ``{"n_layer": 2, "n_embd": 64}``.
        pretrained: refused: weights live on the Hugging Face hub, which xsurgery does not use.

    Raises:
        UserError: transformers missing, unknown name or config field, ``pretrained``.
    """
    if pretrained:
        raise UserError(f"hf/{name} is built from its config with random weights; xsurgery does not download "
                        f"from the Hugging Face hub: drop --pretrained, or load the pretrained model with "
                        f"transformers and pass it to xsurgery.convert")
    tf = _transformers()
    config_cls, model_cls = _config_class(tf, name)
    kwargs = dict(model_kwargs or {})
    default = config_cls()
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        raise UserError(f"hf/{name}: {config_cls.__name__} has no field(s) {', '.join(unknown)}; "
                        f"see {config_cls.__name__}() for the fields")
    _check_fields(name, config_cls.__name__, default, kwargs)
    small = {k: v for k, v in SMALL.get(name.lower(), {}).items() if k not in kwargs}
    if small:
        print(f"note: hf/{name}: the default {config_cls.__name__} is full-size; building a small one "
              f"({', '.join(f'{k}={v}' for k, v in small.items())}); --model-kwargs overrides these",
              file=sys.stderr)
    fields = {"use_cache": False, **small, **kwargs}
    if "use_cache" not in known:
        fields.pop("use_cache")
    def build():
        if model_cls is None:
            return tf.AutoModel.from_config(config, attn_implementation="eager")
        return model_cls(config)

    try:
        config = config_cls(**fields)
        config._attn_implementation = "eager"  # plain matmuls: counted by the report and FlopCounterMode
        with torch.device("meta"):  # counted without allocating: refuse what cannot fit, in one line
            n_params = sum(p.numel() for p in build().parameters())
    except UserError:
        raise
    except Exception as exc:  # a config value the library cannot build with (an unknown activation, ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"hf/{name}: {config_cls.__name__} rejected --model-kwargs {safe_repr(kwargs)}: "
                        f"{safe_text(first, 160)}") from None
    _check_size(name, config_cls.__name__, n_params, bool(kwargs))
    return build().eval()


MAX_LAYERS = 1024  # a count of layers, blocks or experts beyond any real model
MAX_INT_FIELD = 1 << 31  # any other integer config field (sizes, vocabularies, positions)
_COUNTS = ("layers", "layer", "blocks", "experts", "depth")


def _check_fields(name: str, config_name: str, default: Any, kwargs: dict[str, Any]) -> None:
    """Bound config overrides (from --model-kwargs and from a checkpoint's manifest alike)
    before anything is built: a field keeps its default's type (no ``"2"`` for an integer),
    a count of layers is at most :data:`MAX_LAYERS`, any integer at most
    :data:`MAX_INT_FIELD`, and a size the default has positive (``vocab_size``,
    ``num_attention_heads``) stays positive (token ids may be 0)."""
    for key, value in kwargs.items():
        base = getattr(default, key, None)
        where = f"hf/{name}: {config_name} field {safe_text(key, 60)}"
        if isinstance(base, bool):
            if not isinstance(value, bool):
                raise UserError(f"{where} must be true or false, got {safe_repr(value)}")
        elif isinstance(base, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{where} must be an integer, got {safe_repr(value)}")
            words = key.lower().split("_")
            top = MAX_LAYERS if any(w in _COUNTS for w in words) else MAX_INT_FIELD
            # ids and indices (bos_token_id, pad_token_id, layer indices) may be 0; sizes may not
            low = 0 if words[-1] in ("id", "idx", "index") or base == 0 else 1 if base >= 1 else -1
            if not low <= value <= top:
                raise UserError(f"{where} must be in {low}..{top}, got {safe_repr(value)}; "
                                f"give a size a model can have")
        elif isinstance(base, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) > MAX_INT_FIELD:
                raise UserError(f"{where} must be a finite number, got {safe_repr(value)}")
        elif isinstance(base, str) and not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {safe_repr(value)}")


def _memory_bytes() -> int | None:
    from .._util.memory import available_bytes

    return available_bytes()


def _check_size(name: str, config_name: str, n: int, overridden: bool) -> None:
    """Refuse, in one line, a model that cannot fit: many default configs are full-size
    (Mistral, Falcon: 7 B parameters). Convert holds the model and its converted copy, so
    twice the float32 size must fit in memory."""
    memory = _memory_bytes()
    need = 2 * 4 * n
    if memory is not None and need > 0.8 * memory:
        what = "these --model-kwargs build" if overridden else f"the default {config_name} builds"
        count = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
        raise UserError(f"hf/{name}: {what} {count} parameters ({4 * n / 1e9:.1f} GB in float32, about "
                        f"twice that to convert), more than the {memory / 1e9:.1f} GB available; make it smaller "
                        f"with --model-kwargs, e.g. '{{\"num_hidden_layers\": 2, \"hidden_size\": 256}}'")


# attention implementations a saved folder may ask for: transformers also takes hub kernel
# names ("kernels-community/..."), which would download code; a file never chooses those
ATTENTION = ("eager", "sdpa")
# config.json keys transformers writes beside the config's own fields
_CONFIG_META = ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
                "auto_map", "attn_implementation")


def _registered_classes(tf, model_type: str) -> set[str]:
    """Model class names transformers' auto tables register for ``model_type``."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        table = getattr(modeling_auto, attr)
        if attr.endswith("_MAPPING_NAMES") and isinstance(table, dict) and model_type in table:
            value = table[model_type]
            names.update(value if isinstance(value, (list, tuple)) else [value])
    return {n for n in names if isinstance(n, str)}


def hf_architecture(model: nn.Module) -> str | None:
    """The class name a folder records for ``model`` (a transformers class registered for its
    config's ``model_type``), or None when ``model`` is not such a model."""
    try:
        import transformers as tf
    except ImportError:
        return None
    cls = type(model)
    config = getattr(model, "config", None)
    if not (isinstance(model, tf.PreTrainedModel) and cls.__module__.startswith("transformers.")
            and isinstance(getattr(config, "model_type", None), str)):
        return None
    if getattr(tf, cls.__name__, None) is not cls or cls.__name__ not in _registered_classes(tf, config.model_type):
        return None
    return cls.__name__


def hf_model_from_config(fields: dict[str, Any], where: str, *, attn_implementation: str = "eager") -> nn.Module:
    """The dense model (random weights, eval mode) a ``config.json``'s fields describe.

    Args:
        fields: the parsed ``config.json`` (bounded JSON; the ``xsurgery`` section removed).
        where: names the file in error messages.
        attn_implementation: one of :data:`ATTENTION`.

    Raises:
        UserError: transformers missing, a ``model_type`` or architecture transformers does
            not register, a field of the wrong type or out of bounds, a model too large.
    """
    tf = _transformers()
    if attn_implementation not in ATTENTION:
        raise UserError(f"{where}: attention implementation {safe_repr(attn_implementation, 60)} is not one of "
                        f"{', '.join(ATTENTION)}; the file was altered")
    model_type = fields.get("model_type")
    mapping = tf.models.auto.configuration_auto.CONFIG_MAPPING
    if not isinstance(model_type, str) or model_type not in mapping:
        raise UserError(f"{where}: model_type {safe_repr(model_type, 60)} is not a transformers model type here; "
                        f"xsurgery builds only transformers' own models (never remote code)")
    arch = fields.get("architectures")
    registered = _registered_classes(tf, model_type)
    if not (isinstance(arch, list) and len(arch) == 1 and isinstance(arch[0], str) and arch[0] in registered):
        raise UserError(f"{where}: architectures {safe_repr(arch, 80)} is not one transformers class registered for "
                        f"model_type {model_type!r}; the file was altered or was not written by xsurgery")
    model_cls = getattr(tf, arch[0], None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, tf.PreTrainedModel)
            and model_cls.__module__.startswith("transformers.")):
        raise UserError(f"{where}: {safe_text(arch[0], 60)} is not a transformers model class here")
    config_cls = mapping[model_type]
    default = config_cls()
    own = {k: v for k, v in fields.items() if k not in _CONFIG_META}
    try:
        _check_fields(model_type, config_cls.__name__, default, own)
    except UserError as exc:
        raise UserError(f"{where}: {exc}; the file was altered") from None
    kept = {k: v for k, v in fields.items() if k not in ("auto_map", "attn_implementation", "_name_or_path")}
    try:
        config = config_cls.from_dict(kept)
        config._attn_implementation = attn_implementation
        with torch.device("meta"):
            n_params = sum(p.numel() for p in model_cls(config).parameters())
    except UserError:
        raise
    except Exception as exc:  # a value the library cannot build with
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: {config_cls.__name__} cannot build {arch[0]} from it: {safe_text(first, 160)}") from None
    try:
        _check_size(model_type, config_cls.__name__, n_params, True)
    except UserError as exc:
        raise UserError(f"{where}: {str(exc).split('; make it smaller')[0]}") from None
    return model_cls(config).eval()
