"""Example inputs: what every stage (check, report, export, bench) runs a model on.

An example is normalised to ``(args, kwargs)`` (torch.export's convention): a tensor is one
positional input, a tuple/list several, a dict keyword inputs. Where none is given, a model
of a known family gets a default one (:func:`default_example`); a model of no known family
gets none, and the stages that need a forward pass say so instead of guessing a shape.

Floating inputs built here take the model's parameter dtype and device (a bf16 or fp64
model gets a bf16 or fp64 example); integer inputs are token ids bounded by the model's
vocabulary, or an all-ones mask for names containing ``mask``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._util.memory import check_alloc
from ..errors import UserError
from ._example import (
    _NAMES,
    DTYPES,
    MAX_ELEMENTS,
    Example,
    batch_of,
    call,
    describe,
    first_error_line,
    flat_tensors,
    input_names,
    per_sample_size,
    positional_names,
    resample,
    shapes_text,
)

# building here; the example's structure (names, description, resampling) in _example, re-exported
__all__ = ["DTYPES", "Example", "InputSpec", "batch_of", "call", "default_example", "describe", "first_error_line",
           "flat_tensors", "from_description", "from_specs", "input_names", "normalize", "parse_input_spec",
           "per_sample_size", "positional_names", "resample", "resolve", "shapes_text"]

TOKEN_LENGTH = 16  # default sequence length of token models: enough to exercise attention, cheap


@dataclass(frozen=True)
class InputSpec:
    """One ``--input [NAME=]SHAPE[:DTYPE]``; ``dtype`` None means the model's float dtype."""

    name: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None



def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The ``(C, H, W)`` a model is normally run at.

    In order: a ``default_input_size`` attribute (the CIFAR zoo models set one); a timm
    ViT-style fixed ``patch_embed.img_size``; timm's ``pretrained_cfg`` / ``default_cfg``
    ``input_size``; torchvision's own (inception_v3: 299, ViT: ``image_size``); else 224.
    """
    own = getattr(model, "default_input_size", None)
    if own is not None:
        return tuple(int(v) for v in own)  # type: ignore[return-value]
    chans = 3
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        chans = int(cfg["input_size"][0])
    # a timm model made with img_size=... keeps the cfg's 224 but accepts only its own size
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is not None and getattr(pe, "strict_img_size", True) and not getattr(pe, "dynamic_img_size", False):
        img = (img, img) if isinstance(img, int) else tuple(img)
        if len(img) == 2:
            return (chans, int(img[0]), int(img[1]))
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])  # type: ignore[return-value]
    cls = type(model).__name__
    if cls == "Inception3":
        return (3, 299, 299)
    if cls == "VisionTransformer" and isinstance(getattr(model, "image_size", None), int):
        return (3, model.image_size, model.image_size)
    return (3, 224, 224)


def parse_input_spec(text: str) -> InputSpec:
    """``"1x128:int64"``, ``"attention_mask=1x128:int64"``, ``"8x40"`` -> :class:`InputSpec`."""
    m = re.fullmatch(r"(?:([A-Za-z_]\w*)=)?(\d+(?:[x,]\d+)*)(?::(\w+))?", text.strip())
    if m is None:
        raise UserError(f"--input {text!r}: use [NAME=]SHAPE[:DTYPE], e.g. 1x128:int64 or attention_mask=1x128:int64")
    name, shape_text, dtype_text = m.groups()
    shape = tuple(int(s) for s in re.split(r"[x,]", shape_text))
    if any(s < 1 for s in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise UserError(f"--input {text!r}: every size must be >= 1 and the tensor at most {MAX_ELEMENTS} elements")
    dtype = None
    if dtype_text is not None:
        if dtype_text.lower() not in DTYPES:
            raise UserError(f"--input {text!r}: unknown dtype {dtype_text!r}; use one of {', '.join(sorted(set(_NAMES.values())))}")
        dtype = DTYPES[dtype_text.lower()]
    return InputSpec(name, shape, dtype)


# --------------------------------------------------------------------------- model facts


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The float dtype and device of the model's first floating parameter (else float32, cpu)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype, b.device
    return torch.float32, torch.device("cpu")


def first_weight_layer(model: nn.Module) -> nn.Module | None:
    """The first module (in definition order) that owns a weight and reads the input."""
    kinds = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.RNNBase,
             nn.MultiheadAttention)
    for m in model.modules():
        if isinstance(m, kinds):
            return m
    return None


def _vocab(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    emb = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))), None)
    return emb.num_embeddings if emb is not None else None


def _is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(getattr(model, "config", None), "model_type")


# --------------------------------------------------------------------------- building


def _tensor(shape: Sequence[int], dtype: torch.dtype, device, gen: torch.Generator, *, high: int | None = None,
            name: str | None = None) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    # randn draws float32, randint int64, before the cast
    check_alloc(shape, max(dtype.itemsize, 4 if dtype.is_floating_point else 8), f"the example {name or 'input'}", device=torch.device(device or "cpu").type)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    if dtype == torch.bool or (name and "mask" in name):
        return torch.ones(shape, dtype=dtype, device=device)
    if name and ("token_type" in name or "segment" in name):
        return torch.zeros(shape, dtype=dtype, device=device)
    upper = max(1, min(high or 2, torch.iinfo(dtype).max))
    return torch.randint(0, upper, shape, generator=gen).to(dtype=dtype, device=device)


def from_specs(model: nn.Module, specs: Sequence[str | InputSpec], *, seed: int = 0) -> Example:
    """The example a list of ``--input`` specs describes (unnamed: positional, in order)."""
    dtype, device = model_dtype_device(model)
    gen = torch.Generator().manual_seed(seed)
    args: list[torch.Tensor] = []
    kwargs: dict[str, torch.Tensor] = {}
    for spec in specs:
        s = parse_input_spec(spec) if isinstance(spec, str) else spec
        t = _tensor(s.shape, s.dtype or dtype, device, gen, high=_vocab(model), name=s.name)
        if s.name is None:
            if kwargs:
                raise UserError("give unnamed --input values before NAME=SHAPE ones (positional inputs come first)")
            args.append(t)
        elif s.name in kwargs:
            raise UserError(f"--input {s.name}= given twice")
        else:
            kwargs[s.name] = t
    return tuple(args), kwargs


def normalize(example_inputs: Any) -> Example:
    """A tensor, a tuple/list of positional inputs, a dict of keyword inputs, or ``(args, kwargs)``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise UserError(f"example_inputs dict keys must be argument names, got {bad[0]!r}")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if (len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
                and isinstance(example_inputs[1], Mapping)):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise UserError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, "
                    f"got {type(example_inputs).__name__}")


def shape_from_size(model: nn.Module, input_size: int | Sequence[int]) -> tuple[tuple[int, ...], torch.dtype | None]:
    """``input_size`` -> (per-sample shape, dtype or None), decided from the model's first weight layer.

    A first ``nn.Linear`` takes the size as its feature shape (``40`` -> ``[40]``; a shape whose
    product is its input, ``1 28 28`` for ``Linear(784, ...)``, as a sample to flatten), a first
    ``nn.Embedding`` as a sequence length of int64 ids, a first Conv1d/Conv3d as ``L`` / ``(C, L)``
    and ``(T, H, W)`` / ``(C, T, H, W)``; everything else as the image shorthand
    ``H``, ``(H, W)`` or ``(C, H, W)`` with the model's own channel count.
    """
    size = (int(input_size),) if isinstance(input_size, (int, float)) else tuple(int(s) for s in input_size)
    if not size or any(s < 1 for s in size) or math.prod(size) > MAX_ELEMENTS:
        raise UserError(f"--input-size takes positive sizes of at most {MAX_ELEMENTS} elements in all, got {list(size)}")
    first = first_weight_layer(model)
    if isinstance(first, nn.Linear):
        if len(size) > 1 and math.prod(size) == first.in_features:
            return size, None  # a whole sample the model flattens first (an MLP on images)
        if size[-1] != first.in_features:
            raise UserError(f"the model's first layer is nn.Linear({first.in_features}, ...): --input-size "
                            f"{' '.join(map(str, size))} must end in {first.in_features} (the feature size)")
        return size, None
    if isinstance(first, (nn.Embedding, nn.EmbeddingBag)):
        if len(size) != 1:
            raise UserError(f"the model starts with an embedding: --input-size is a sequence length, got {list(size)}")
        return size, torch.int64
    if isinstance(first, nn.modules.conv._ConvNd) and len(first.kernel_size) in (1, 3):
        nd = len(first.kernel_size)
        c = first.in_channels
        if len(size) == nd:
            return (c, *size), None
        if len(size) == nd + 1:
            return size, None
        form = "L or C L" if nd == 1 else "T H W or C T H W"
        raise UserError(f"the model starts with a Conv{nd}d: --input-size takes {form}, got {list(size)}")
    if len(size) > 3:
        raise UserError(f"--input-size takes H, H W or C H W with positive values, got {list(size)}")
    chans = first.in_channels if isinstance(first, nn.Conv2d) else known_image_size(model)[0]
    if len(size) == 1:
        return (chans, size[0], size[0]), None
    if len(size) == 2:
        return (chans, *size), None
    return size, None


def known_image_size(model: nn.Module) -> tuple[int, ...]:
    recorded = getattr(model, "_xsurgery_input_size", None)
    return tuple(recorded) if recorded else tuple(default_input_size(model))


def _known_family(model: nn.Module) -> str | None:
    """``"hf"``, ``"detection"``, ``"video"``, ``"image"`` or None (no default example)."""
    if _is_hf(model):
        return "hf"
    mod = type(model).__module__
    if mod.startswith("torchvision.models.detection"):
        return "detection"
    if mod.startswith("torchvision.models.video"):
        return "video"
    if (mod.startswith(("torchvision.models", "timm.")) or getattr(model, "default_input_size", None) is not None
            or getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)):
        return "image"
    return None


def _hf_example(model: nn.Module, batch: int, dtype, device, gen) -> Example | None:
    cfg = model.config
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        chans = getattr(cfg, "num_channels", 3)
        return (), {"pixel_values": _tensor((batch, chans, *size), dtype, device, gen)}
    if main != "input_ids":
        return None
    limits = [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions", "max_seq_len")]
    length = min([TOKEN_LENGTH] + [v for v in limits if isinstance(v, int) and v > 0])
    vocab = _vocab(model)
    kw = {"input_ids": _tensor((batch, length), torch.int64, device, gen, high=vocab, name="input_ids")}
    params = inspect.signature(model.forward).parameters
    if "attention_mask" in params:
        kw["attention_mask"] = torch.ones(batch, length, dtype=torch.int64, device=device)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        kw["decoder_input_ids"] = _tensor((batch, length), torch.int64, device, gen, high=vocab, name="decoder_input_ids")
    return (), kw


def default_example(model: nn.Module, batch: int = 1, *, seed: int = 0) -> Example | None:
    """The example of a known family, or None.

    * an example recorded by ``convert`` (kept in checkpoints): rebuilt from its description;
    * HF transformers: ``input_ids`` (length 16, vocabulary-bounded) + ``attention_mask``
      (+ ``decoder_input_ids`` for encoder-decoders), or ``pixel_values`` for vision models;
    * torchvision detection: a list of ``batch`` images ``[3, 320, 320]`` (the model's own
      transform resizes them to its ``min_size``);
    * torchvision video: ``[B, 3, 8, 112, 112]`` (MViT and S3D: ``[B, 3, 16, 224, 224]``);
    * image models (torchvision, timm, the zoo, a ``default_input_size`` attribute):
      ``[B, C, H, W]`` at the model's own size.
    """
    dtype, device = model_dtype_device(model)
    gen = torch.Generator().manual_seed(seed)
    recorded = getattr(model, "_xsurgery_inputs", None)
    if recorded:
        return from_description(model, recorded, seed=seed)
    family = _known_family(model)
    if family == "hf":
        return _hf_example(model, batch, dtype, device, gen)
    if family == "detection":
        return ([_tensor((3, 320, 320), dtype, device, gen) for _ in range(batch)],), {}
    if family == "video":
        clip = (3, 16, 224, 224) if type(model).__name__ in ("MViT", "S3D") else (3, 8, 112, 112)
        return (_tensor((batch, *clip), dtype, device, gen),), {}
    if family == "image" or getattr(model, "_xsurgery_input_size", None):
        return (_tensor((batch, *known_image_size(model)), dtype, device, gen),), {}
    return None


def resolve(model: nn.Module, example_inputs: Any = None, input_size: Any = None, *, batch: int = 1,
            seed: int = 0) -> Example | None:
    """The example every stage uses: given, from ``input_size``, a family default, or None."""
    if example_inputs is not None and input_size is not None:
        raise UserError("give example_inputs (--input) or input_size (--input-size), not both")
    if example_inputs is not None:
        if isinstance(example_inputs, (list, tuple)) and example_inputs and all(
                isinstance(s, (str, InputSpec)) for s in example_inputs):
            return from_specs(model, example_inputs, seed=seed)
        return normalize(example_inputs)
    if input_size is not None:
        shape, dtype = shape_from_size(model, input_size)
        mdtype, device = model_dtype_device(model)
        gen = torch.Generator().manual_seed(seed)
        return (_tensor((batch, *shape), dtype or mdtype, device, gen, high=_vocab(model), name="input"),), {}
    return default_example(model, batch, seed=seed)


def from_description(model: nn.Module, desc: Any, *, seed: int = 0) -> Example | None:
    """Rebuild an example from :func:`describe`'s output (e.g. a checkpoint's manifest).

    The description is data: only shapes, dtypes from :data:`DTYPES` and integer bounds are
    read; anything malformed gives None (no example) rather than a guess.
    """
    if not isinstance(desc, list) or not desc or len(desc) > 64:
        return None
    _, device = model_dtype_device(model)
    gen = torch.Generator().manual_seed(seed)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for d in desc:
        if not isinstance(d, Mapping):
            return None
        shape, dtype, name = d.get("shape"), DTYPES.get(str(d.get("dtype"))), d.get("name")
        if (dtype is None or not isinstance(name, str) or not isinstance(shape, list)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
                or math.prod(shape) > MAX_ELEMENTS):
            return None
        high = d.get("high") if isinstance(d.get("high"), int) else None
        t = _tensor(shape, dtype, device, gen, high=high, name=name.split(".")[0])
        if d.get("in_list"):
            base = name.split(".")[0]
            if d.get("positional"):
                if not args or not isinstance(args[-1], list):
                    args.append([])
                args[-1].append(t)
            else:
                kwargs.setdefault(base, []).append(t)
        elif d.get("positional"):
            args.append(t)
        else:
            kwargs[name] = t
    return tuple(args), kwargs
