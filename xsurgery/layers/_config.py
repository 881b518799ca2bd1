"""One frozen object for every sparsity setting (torchao's ``quantize_(model, config)`` style).

The X-layers, their ``from_dense`` constructors, the surgery spec and ``convert`` all take a
:class:`SparsityConfig`; the same fields as keyword arguments still work and override it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["MIX_POINTS", "SparsityConfig"]

MIX_POINTS = ("auto", "chain", "alternate", "every")


@dataclass(frozen=True)
class SparsityConfig:
    """How a layer (or every converted layer of a model) is made sparse.

    Attributes:
        compress: target compression C >= 1 (D = C_in // C, at least 1); or give ``degree``.
            Neither: a layer keeps every input (C = 1); a surgery uses C = 2.
        degree: inputs per output D, instead of ``compress``.
        mixing: k, blocks reading each input (G = k * C_in / D); 1 (default) = shuffle + grouped
            conv, mixing across consecutive layers (chosen by docs/results/frontier.md);
            2 = every layer an expander.
        graph: a registered construction (:func:`xsurgery.graphs.list_graphs`); ``auto`` (the
            default) is ``paired`` where the layer mixes 2, else ``random``.
        seed: seed of the graph construction (a surgery derives each layer's from it and the
            layer's name).
        blocks: an explicit G for one layer (overrides ``mixing``).
        execution: ``auto`` or a registered execution (``gather``, ``masked``).
        mix_points: where a surgery keeps the graph in chains of converted layers: ``auto``,
            ``chain``, ``alternate`` or ``every`` (see ``xsurgery.convert``).
    """

    compress: float | None = None
    degree: int | None = None
    mixing: int = 1
    graph: str = "auto"
    seed: int = 0
    blocks: int | None = None
    execution: str = "auto"
    mix_points: str = "auto"

    @classmethod
    def of(cls, config: SparsityConfig | None = None, **overrides: Any) -> SparsityConfig:
        """``config`` (default: all defaults) with the given fields replaced; an unknown field is
        a ``TypeError`` naming the valid ones, as a misspelt keyword argument would be."""
        unknown = sorted(set(overrides) - cls.field_names())
        if unknown:
            raise TypeError(f"unknown sparsity setting(s) {', '.join(unknown)}; "
                            f"valid: {', '.join(sorted(cls.field_names()))}")
        if config is not None and not isinstance(config, SparsityConfig):
            raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
        return replace(config or cls(), **overrides)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
