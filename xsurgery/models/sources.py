"""Where models come from: torchvision, timm, the zoo, or an import path.

Models are built with random weights; no network is needed unless ``pretrained`` is asked.
Every model built here carries ``model._xsurgery_source`` so that a checkpoint can record
how to rebuild it. This module knows nothing about checkpoints: "checkpoint path or model
name" is decided once, in :func:`xsurgery.checkpoint.resolve_model`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
from typing import Any

from torch import nn

from ..errors import UserError

__all__ = ["LIBRARY_PREFIXES", "create_model", "is_library_name"]

# a source that names a library model (rebuilt from the name alone, importing nothing the
# name chooses): torchvision and zoo names have no prefix, timm's "timm/", transformers' "hf/"
LIBRARY_PREFIXES = ("timm/", "hf/")


def is_library_name(source: Any) -> bool:
    """A torchvision/timm/zoo (or ``hf/``) model name, as opposed to an import path, a file or an object."""
    if not isinstance(source, str) or source == "object":
        return False
    prefix = next((p for p in LIBRARY_PREFIXES if source.startswith(p)), "")
    rest = source[len(prefix):]
    return bool(rest) and all(c.isalnum() or c in "_-." for c in rest) and not rest.endswith((".xs", ".safetensors"))


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models()


def zoo_models():
    try:
        from . import zoo
    except ImportError:
        return {}
    return getattr(zoo, "MODELS", {})


def timm_is_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _pretrained_error(name: str, exc: BaseException) -> UserError:
    return UserError(
        f"pretrained weights for {name!r} could not be had ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); "
        f"drop --pretrained to start from random weights"
    )


def _rejected(name: str, kwargs: dict[str, Any], exc: BaseException) -> UserError:
    detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return UserError(f"model {name!r} rejected --model-kwargs {json.dumps(kwargs)[:160]} "
                     f"({type(exc).__name__}: {detail}); check the factory's arguments")


def _import_user_module(name: str):
    """Import the user's module ``name``, also from the working directory.

    ``python -m`` puts the working directory on ``sys.path`` but a console script does not,
    so ``xsurgery convert mynets:build`` next to ``mynets.py`` would not find it (uvicorn and
    gunicorn add it for the same reason). Only for this import: ``sys.path`` is restored.
    """
    import sys

    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)  # after the installed packages: a local file never shadows them
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


def _call(factory, name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return factory(**kwargs)
    except Exception as exc:  # a factory may reject bad values in any way (TypeError, ValueError, assert)
        if kwargs:
            raise _rejected(name, kwargs, exc) from exc
        raise


def create_model(
    source: str, model_kwargs: dict[str, Any] | None = None, pretrained: bool = False, *, weights: str | None = None
) -> nn.Module:
    """Build a model from a library name or an import path (checkpoints: ``xsurgery.load``).

    Args:
        source: torchvision name (``resnet50``), timm name (``timm/convnext_tiny`` or a bare
            name only timm knows), zoo name (``densenet_bc_40``), or import path
            ``package.module:factory``.
        model_kwargs: keyword arguments for the factory (e.g. ``{"num_classes": 10}``).
        pretrained: ask the library for its weights; fails with a :class:`UserError` when
            they cannot be had.
        weights: a local file of dense weights (safetensors, or a torch file read with
            ``weights_only=True``) loaded into the built model; see
            :func:`xsurgery.models.weights.load_weights`. Not with ``pretrained``.

    Raises:
        UserError: unknown name, bad kwargs, a file path, weights unavailable.
    """
    if not isinstance(source, str) or not source:
        raise UserError("model must be a name such as resnet50, timm/vit_tiny_patch16_224, or pkg.mod:factory")
    kwargs = dict(model_kwargs or {})
    if weights is not None and pretrained:
        raise UserError("give --weights FILE or --pretrained, not both")
    if os.path.isfile(source):
        raise UserError(f"{source} is a file, not a model name; open checkpoints with xsurgery.load "
                        f"(`xsurgery report`/`export` take them)")

    model: nn.Module
    if source.startswith("hf/"):
        from .hf import create_hf_model

        model = create_hf_model(source[len("hf/"):], kwargs, pretrained)
    elif ":" in source:
        mod_name, _, attr = source.partition(":")
        try:
            factory = getattr(_import_user_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"cannot import {source!r} ({exc}); use the form package.module:factory") from exc
        if pretrained:
            kwargs.setdefault("pretrained", True)
        model = _call(factory, source, kwargs)
        if not isinstance(model, nn.Module):
            raise UserError(f"{source} returned {type(model).__name__}, not an nn.Module")
    elif source.startswith("timm/"):
        model = _create_timm(source[len("timm/"):], kwargs, pretrained)
    elif source in zoo_models():
        if pretrained:
            raise UserError(f"{source} is an xsurgery zoo model with no pretrained weights; drop --pretrained")
        model = _call(zoo_models()[source], source, kwargs)
    elif source in torchvision_names():
        import torchvision

        try:
            model = torchvision.models.get_model(source, **_torchvision_weights(source, pretrained, kwargs))
        except TypeError as exc:
            raise UserError(f"model {source!r} rejected --model-kwargs {kwargs}: {exc}") from exc
        except Exception as exc:  # downloads fail in many ways (URLError, OSError, RuntimeError)
            if pretrained:
                raise _pretrained_error(source, exc) from exc
            if kwargs:
                raise _rejected(source, kwargs, exc) from exc
            raise
    elif timm_is_model(source):
        model = _create_timm(source, kwargs, pretrained)
    else:
        import timm

        pool = list(zoo_models()) + torchvision_names() + timm.list_models()
        close = difflib.get_close_matches(source, pool, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models() or timm.list_models()"
        raise UserError(f"unknown model {source!r}{hint}")
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    model._xsurgery_source = {"source": source, "model_kwargs": kwargs, "pretrained": bool(pretrained)}
    return model


def _torchvision_weights(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus the weight arguments: random weights offline unless ``pretrained``.

    Detection, segmentation and video factories also take ``weights_backbone``, which
    defaults to ImageNet weights (a download); it is set to ``None`` unless asked for.
    """
    import torchvision

    out = {"weights": "DEFAULT" if pretrained else None, **kwargs}
    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    if "weights_backbone" in params and not pretrained:
        out.setdefault("weights_backbone", None)
    return out


def _create_timm(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise UserError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if pretrained:
            raise _pretrained_error(name, exc) from exc
        if kwargs:
            raise _rejected(name, kwargs, exc) from exc
        raise
