"""Where models come from: torchvision, timm, an import path, the zoo, or an xsurgery checkpoint.

Models are built with random weights; no network is needed unless ``pretrained`` is asked.
Every model built here carries ``model._xsurgery_source`` so that a checkpoint can record
how to rebuild it.
"""

from __future__ import annotations

import difflib
import importlib
import os
from typing import Any

from torch import nn

from ._errors import UserError

__all__ = ["create_model", "is_checkpoint_path"]

CHECKPOINT_SUFFIXES = (".xs", ".safetensors")


def is_checkpoint_path(source: str) -> bool:
    """A string names a checkpoint when it ends like one or is an existing file."""
    return source.endswith(CHECKPOINT_SUFFIXES) or os.path.isfile(source)


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models()


def _zoo():
    try:
        from . import zoo
    except ImportError:
        return {}
    return getattr(zoo, "MODELS", {})


def _timm_is_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _pretrained_error(name: str, exc: BaseException) -> UserError:
    return UserError(
        f"pretrained weights for {name!r} could not be had ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); "
        f"drop --pretrained to start from random weights"
    )


def _call(factory, name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise UserError(f"model {name!r} rejected --model-kwargs {kwargs}: {exc}") from exc


def create_model(
    source: str, model_kwargs: dict[str, Any] | None = None, pretrained: bool = False
) -> nn.Module:
    """Build a model from a name, an import path or a checkpoint.

    Args:
        source: torchvision name (``resnet50``), timm name (``timm/convnext_tiny`` or a bare
            name only timm knows), zoo name (``densenet_bc_40``), import path
            ``package.module:factory``, or the path of an xsurgery checkpoint.
        model_kwargs: keyword arguments for the factory (e.g. ``{"num_classes": 10}``).
        pretrained: ask the library for its weights; fails with a :class:`UserError` when
            they cannot be had.

    Raises:
        UserError: unknown name, bad kwargs, unloadable checkpoint, weights unavailable.
    """
    if not isinstance(source, str) or not source:
        raise UserError("model must be a name such as resnet50, timm/vit_tiny_patch16_224, or pkg.mod:factory")
    kwargs = dict(model_kwargs or {})
    if is_checkpoint_path(source):
        if kwargs or pretrained:
            raise UserError("a checkpoint carries its own model; drop --model-kwargs/--pretrained")
        from .checkpoint import load

        return load(source)

    model: nn.Module
    if source.startswith("hf/"):
        from ._hf import create_hf_model

        model = create_hf_model(source[len("hf/"):], kwargs, pretrained)
    elif ":" in source:
        mod_name, _, attr = source.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"cannot import {source!r} ({exc}); use the form package.module:factory") from exc
        if pretrained:
            kwargs.setdefault("pretrained", True)
        model = _call(factory, source, kwargs)
        if not isinstance(model, nn.Module):
            raise UserError(f"{source} returned {type(model).__name__}, not an nn.Module")
    elif source.startswith("timm/"):
        model = _create_timm(source[len("timm/"):], kwargs, pretrained)
    elif source in _zoo():
        if pretrained:
            raise UserError(f"{source} is an xsurgery zoo model with no pretrained weights; drop --pretrained")
        model = _call(_zoo()[source], source, kwargs)
    elif source in _torchvision_names():
        import torchvision

        try:
            model = torchvision.models.get_model(source, weights="DEFAULT" if pretrained else None, **kwargs)
        except TypeError as exc:
            raise UserError(f"model {source!r} rejected --model-kwargs {kwargs}: {exc}") from exc
        except Exception as exc:  # downloads fail in many ways (URLError, OSError, RuntimeError)
            if pretrained:
                raise _pretrained_error(source, exc) from exc
            raise
    elif _timm_is_model(source):
        model = _create_timm(source, kwargs, pretrained)
    else:
        import timm

        pool = list(_zoo()) + _torchvision_names() + timm.list_models()
        close = difflib.get_close_matches(source, pool, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models() or timm.list_models()"
        raise UserError(f"unknown model {source!r}{hint}")
    model._xsurgery_source = {"source": source, "model_kwargs": kwargs, "pretrained": bool(pretrained)}
    return model


def _create_timm(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise UserError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise UserError(f"timm model {name!r} rejected --model-kwargs {kwargs}: {exc}") from exc
    except Exception as exc:
        if pretrained:
            raise _pretrained_error(name, exc) from exc
        raise
