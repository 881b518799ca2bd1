"""What a recipe builds besides the data: the student model (weights, surgery, projection
on the recipe's own training split) and the teacher with its distillation loss.

Distillation (``teacher:`` + ``distill: {alpha, temperature}``), per batch::

    loss = (1 - alpha) * task + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

with ``task`` the recipe's cross-entropy (label smoothing included), ``s`` and ``t`` the
student's and the teacher's logits, ``T`` the temperature and the KL divergence averaged over
the batch (``F.kl_div(..., reduction="batchmean")``); ``T^2`` keeps the gradient's scale
independent of ``T`` (Hinton et al., 2015). The teacher is frozen, in eval mode, lives beside
the student (never a submodule, so never in a checkpoint) and is not wrapped in DDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ._specs import Recipe

__all__ = ["build_model", "build_teacher", "check_outputs", "check_teacher", "distill_loss"]


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's model: created from its source (``model.weights`` loaded), then converted
    (``surgery``; ``surgery.init: project`` calibrates on :meth:`Recipe.calibration_data`), pruned
    to a MACs budget (``prune``), masked at the surgery's densities (``unstructured``), or dense.

    Seeded from ``recipe.seed`` so that every process (and every resume) builds the same one.
    """
    from ..models import create_model
    from ..surgery import convert, prune_to_macs

    torch.manual_seed(recipe.seed)
    m = recipe.model
    size = tuple(recipe.data.input_size)
    spec = {k: v for k, v in recipe.surgery.to_dict().items() if k != "version"} if recipe.surgery else {}
    if recipe.surgery is None or recipe.unstructured:
        model = create_model(m.source, dict(m.kwargs), m.pretrained, weights=m.weights)
        model._xsurgery_input_size = list(size)
        if recipe.prune is not None:
            model, _ = prune_to_macs(model, recipe.prune.target_macs, size, round_to=recipe.prune.round_to)
        if recipe.unstructured:  # the layers and densities the surgery would give, kept dense and masked
            from ._masks import apply_masks, unstructured_masks

            spec.pop("init", None)
            converted, _ = convert(m.source, model_kwargs=dict(m.kwargs), input_size=size, check=False, **spec)
            model._xsurgery_masks = unstructured_masks(model, converted, recipe.seed)
            apply_masks(model, model._xsurgery_masks)
        return model
    calibration = recipe if spec.get("init") == "project" else None
    model, _ = convert(m.source, model_kwargs=dict(m.kwargs), pretrained=m.pretrained, weights=m.weights,
                       input_size=size, calibration=calibration, **spec)
    return model


def build_teacher(recipe: Recipe, device: torch.device) -> nn.Module | None:
    """The recipe's frozen teacher in eval mode on ``device`` (None without ``teacher:``)."""
    t = recipe.teacher
    if t is None:
        return None
    if t.checkpoint:
        from ..checkpoint import load

        model = load(t.checkpoint)
    else:
        from ..models import create_model

        model = create_model(t.source, dict(t.kwargs), weights=t.weights)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean",
                    log_target=True) * (t * t)


@torch.no_grad()
def check_outputs(model: nn.Module, dataset, num_classes: int, recipe: Recipe, device) -> None:
    """Before any step: the model must have an output per class of the dataset."""
    if not len(dataset):
        return
    x = dataset[0][0]
    was = model.training
    model.eval()
    try:
        out = model(x[None].to(device))
    except Exception as exc:
        raise UserError(f"the model does not run on the data's input {list(x.shape)} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); check data.input_size and "
                        f"model.kwargs") from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError(f"the model must return [batch, classes] logits, got {getattr(out, 'shape', type(out).__name__)}")
    if out.shape[-1] < num_classes:
        raise UserError(f"the model has {out.shape[-1]} outputs but {recipe.data.name} has {num_classes} classes; "
                        f"set model.kwargs.num_classes={num_classes}")


@torch.no_grad()
def check_teacher(model: nn.Module, teacher: nn.Module, dataset, device) -> None:
    """Before any step: the teacher's logits must have the student's shape."""
    x = dataset[0][0][None].to(device)
    was = model.training
    model.eval()
    try:
        s = model(x)
        try:
            t = teacher(x)
        except Exception as exc:
            raise UserError(f"the teacher does not run on the data's input {list(x.shape[1:])} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); check teacher:") from exc
    finally:
        model.train(was)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(s.shape):
        raise UserError(f"the teacher returns {list(getattr(t, 'shape', []))} but the student {list(s.shape)}; "
                        f"distillation needs logits of the same classes")
