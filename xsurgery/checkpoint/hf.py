"""``xsurgery.hf``: Hugging Face folders of converted models, the way transformers users work.

```python
import xsurgery

model, _ = xsurgery.convert("hf/gpt2", compress=2, model_kwargs={"n_layer": 2})
xsurgery.hf.save_pretrained(model, "gpt2-x2/")        # = xsurgery.save(model, "gpt2-x2/", format="hf")
same = xsurgery.hf.from_pretrained("gpt2-x2/")        # = xsurgery.load("gpt2-x2/"), in eval mode
same.generate(input_ids, max_new_tokens=8)            # its transformers methods work
```

The folder is ``config.json`` (the model's config, with the surgery manifest as its
``xsurgery`` section), ``model.safetensors`` (the compact weights) and the tokenizer /
processor files when the model came with them. transformers' own ``from_pretrained`` cannot
load it (it builds the dense layers, whose shapes differ): use :func:`from_pretrained`.
Loading is offline and runs no code a file names (only transformers' own classes are built).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..errors import UserError
from . import _hf_folder, _store

__all__ = ["from_pretrained", "save_pretrained"]


def from_pretrained(folder: str | os.PathLike, *, device: str = "cpu", allow_nonfinite: bool = False) -> nn.Module:
    """The converted transformers model a folder written by :func:`save_pretrained` holds.

    Args:
        folder: the folder (``config.json`` with an ``xsurgery`` section + ``model.safetensors``).
        device: where the weights go.
        allow_nonfinite: accept NaN/inf weights.

    Returns:
        The model (its transformers class, X-layers in place of the converted layers), in
        eval mode as transformers' ``from_pretrained`` returns it: ``generate`` works for
        causal LMs. Its tokenizer, when saved: ``AutoTokenizer.from_pretrained(folder)``.

    Raises:
        UserError: not such a folder, a tampered config section or weights, a config that
            does not name a transformers model.
    """
    folder = os.fspath(folder)
    if not _hf_folder.is_folder(folder):
        raise UserError(f"{folder} is not a folder with a config.json; give the folder xsurgery.save(..., format='hf') wrote")
    return _store.load(folder, map_location=device, allow_nonfinite=allow_nonfinite)


def save_pretrained(model: nn.Module, folder: str | os.PathLike, *, force: bool = False, tokenizer: Any = None,
                    processor: Any = None) -> dict[str, Any]:
    """``xsurgery.save(model, folder, format="hf", ...)``; returns the manifest."""
    return _store.save(model, os.fspath(folder), force=force, format="hf", tokenizer=tokenizer, processor=processor)
