"""What every X-layer shares: its graph (built from a :class:`SparsityConfig` or given), the
persistent index buffer, the execution choice, and weight copies to and from dense layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..graphs import BipartiteGraph, build_graph, degree_for, min_covering_degree
from ._config import SparsityConfig
from ._functional import EXECUTIONS, auto_execution, dense_weight

INITS = ("kaiming", "keep")


def sparsity_of(config: SparsityConfig | None, overrides: dict[str, Any]) -> tuple[SparsityConfig, BipartiteGraph | None]:
    """The layer's config from ``config`` and keyword overrides; ``graph=`` may be a prebuilt graph."""
    graph = overrides.get("graph")
    if isinstance(graph, BipartiteGraph):
        overrides = {k: v for k, v in overrides.items() if k != "graph"}
        return SparsityConfig.of(config, **overrides), graph
    return SparsityConfig.of(config, **overrides), None


class XBase(nn.Module):
    """Graph bookkeeping shared by the X-convs and XLinear."""

    in_features: int
    out_features: int
    graph_name: str
    graph_seed: int | None
    degree: int
    blocks: int
    kind: str = "conv"  # the MIN_OUTPUTS_PER_BLOCK row auto_execution reads

    def _init_graph(self, in_features: int, out_features: int, config: SparsityConfig,
                    graph: BipartiteGraph | None) -> None:
        if config.execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {config.execution!r}; use one of {EXECUTIONS}")
        if graph is not None:
            g = graph
            if (g.in_features, g.out_features) != (in_features, out_features):
                raise ValueError(
                    f"graph is {g.in_features}->{g.out_features} but the layer is "
                    f"{in_features}->{out_features}"
                )
        else:
            compress = 1.0 if config.degree is None and config.compress is None else config.compress
            d = degree_for(in_features, compress=compress, degree=config.degree)
            if config.degree is None and config.blocks is None:  # a compression never leaves inputs unread
                d = max(d, min_covering_degree(in_features, out_features, config.graph))
            g = build_graph(in_features, out_features, d, config.blocks, mixing=config.mixing,
                            construction=config.graph, seed=config.seed)
        self.degree, self.blocks = g.degree, g.blocks
        self.graph_name, self.graph_seed = g.construction, g.seed
        self.execution = config.execution
        self.register_buffer("index", g.index.reshape(-1).clone(), persistent=True)
        self._refresh_identity()

    def _finish_init(self, weight_shape: tuple[int, ...], bias: bool, device, dtype) -> None:
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(*weight_shape, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        if device is not None:
            self.index = self.index.to(device)
        self.reset_parameters()

    @property
    def graph(self) -> BipartiteGraph:
        """The layer's graph, rebuilt from its index buffer (reflects a loaded state dict)."""
        return BipartiteGraph(
            self.in_features, self.out_features, self.degree, self.blocks,
            self._index_cpu.view(self.blocks, self.degree), self.graph_name, self.graph_seed,
        )

    @property
    def mixing(self) -> float:
        return self.blocks * self.degree / self.in_features

    def resolved_execution(self, device: torch.device | None = None) -> str:
        if self.execution != "auto":
            return self.execution
        return auto_execution(self.blocks, self.out_features, self.degree, self.in_features,
                              device or self.index.device, self.kind)

    def _refresh_identity(self) -> None:
        # gather can be skipped when the index is the identity (k = 1 unshuffled, grouped);
        # a plain bool so that tracing and export see no data-dependent branch. A CPU copy
        # of the index keeps the graph readable when the module lives on the meta device.
        if self.index.device.type != "meta":
            self._index_cpu = self.index.detach().cpu()
        n = self._index_cpu.numel()
        self._identity = n == self.in_features and bool(torch.equal(self._index_cpu, torch.arange(n)))

    def _cached_dense(self, x) -> torch.Tensor | None:
        """Inference only: the scattered dense weight, kept until the weight or index changes.

        Masked execution otherwise scatters on every call, which made it 1.4-1.6x slower than
        the dense model in eager inference (docs/bench). Not used with autograd, tracing or
        compiling, where the scatter must stay in the graph.
        """
        if torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or torch.jit.is_tracing():
            return None
        if torch.compiler.is_compiling():
            return None
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device, self.index._version, self.index.data_ptr())
        if getattr(self, "_dense_key", None) != key:
            self._dense = dense_weight(w.detach(), self.index, self.in_features, self.blocks)
            self._dense_key = key
        return self._dense

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_identity()

    def graph_repr(self) -> str:
        return f"degree={self.degree}, blocks={self.blocks}, graph={self.graph_name}"


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; use one of {INITS}")


@torch.no_grad()
def keep_weights(layer: XBase, dense, bias: torch.Tensor | None = None) -> None:
    """Copy the kept connections of ``dense`` (a module, or its ``[out, in, ...]`` weight)."""
    if isinstance(dense, nn.Module):
        dense, bias = dense.weight, dense.bias
    rows = layer.index.view(layer.blocks, 1, layer.degree)
    rows = rows.expand(layer.blocks, layer.out_features // layer.blocks, layer.degree)
    rows = rows.reshape(layer.out_features, layer.degree)
    w = dense
    rows = rows.view(*rows.shape, *([1] * (w.dim() - 2))).expand(-1, -1, *w.shape[2:])
    layer.weight.copy_(w.gather(1, rows))
    if layer.bias is not None:
        layer.bias.copy_(bias)


@torch.no_grad()
def copy_dense(layer: XBase, dense: nn.Module) -> None:
    dense.weight.copy_(dense_weight(layer.weight, layer.index, layer.in_features, layer.blocks))
    if layer.bias is not None:
        dense.bias.copy_(layer.bias)
