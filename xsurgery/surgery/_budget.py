"""Budgets: the uniform compression whose converted model meets a MACs or parameter target.

The layers the spec converts with its own compression (not those a plan rule gives a
compress or degree) are scaled together: at compression C each gets D = C_in // C. Params are
exact from shapes (an X-layer holds C_out x D x kernel weights); MACs scale per layer by
D / C_in from the dense MACs counted once on the example. Totals include what stays dense
(stem, classifier, depthwise convs, norms, attention matmuls), so the reachable range runs
from every scaled layer at degree 1 to the dense model. Degrees are whole numbers, so the
total is a step function of C: bisection finds the step nearest the target, which must lie
within :data:`TOLERANCE` of it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from .._util.table import human
from ..errors import UserError
from ..graphs import degree_for
from ._spec import Decision, SurgerySpec, rule_for

__all__ = ["TOLERANCE", "Budget", "budget_targets", "fit_budget", "parse_count", "record_reached"]

TOLERANCE = 0.02
_SUFFIX = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_LABEL = {"macs": "MACs", "params": "params"}


def parse_count(value: Any, flag: str) -> int:
    """A positive count: an integer, or a number with a suffix k/K, M, G, T (``1.2G``, ``300M``)."""
    n = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGT]?)\s*", value)
        n = float(m.group(1)) * _SUFFIX[m.group(2)] if m else None
    if n is None or not math.isfinite(n) or n < 1:
        raise UserError(f"{flag} takes a positive count such as 4500000, 4.5k, 300M or 1.2G, got {value!r}")
    return int(round(n))


@dataclass(frozen=True)
class Budget:
    """One target: ``metric`` ``macs`` or ``params``; ``match`` the model whose MACs it is."""

    metric: str
    target: int | None
    match: Any = None
    flag: str = ""


def budget_targets(config: Any, target_macs: Any, target_params: Any, match_macs: Any) -> Budget | None:
    """The budget asked for (None: none), checked against the config's compress/degree."""
    given = [(f, v) for f, v in (("--target-macs", target_macs), ("--target-params", target_params),
                                 ("--match-macs", match_macs)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise UserError(f"give one budget, not {' and '.join(f for f, _ in given)}")
    flag, value = given[0]
    if config.compress is not None or config.degree is not None:
        raise UserError(f"{flag} chooses the compression; drop --compress/--degree (compress=/degree=) or the budget")
    if flag == "--match-macs":
        if not isinstance(value, (str, nn.Module)):
            raise UserError(f"--match-macs takes a model or a model name, got {type(value).__name__}")
        return Budget("macs", None, value, flag)
    return Budget("macs" if flag == "--target-macs" else "params", parse_count(value, flag), None, flag)


def _macs_of(model: nn.Module, example: Any, what: str) -> dict[str, int]:
    """Per-layer MACs of one forward on ``example`` and the total (key ``""``), by the report's counter."""
    from ..analysis import report  # counting lives above surgery; convert() reports the same way

    if example is None:
        raise UserError(f"a MACs budget needs an example input and {what} is of no known family; "
                        f"give --input (example_inputs=) or --input-size")
    rep = report(model, example_inputs=example)
    out = {r.name: r.macs_after for r in rep.layers}
    out[""] = rep.totals["macs_after"]
    return out


def _match_total(budget: Budget, example_inputs: Any, input_size: Any) -> tuple[int, str]:
    from ..models import create_model
    from ..models import resolve as resolve_example

    other = budget.match
    name = other if isinstance(other, str) else type(other).__name__
    if isinstance(other, str):
        if other.endswith((".xs", ".safetensors")):
            raise UserError("--match-macs takes a model name or import path, not a checkpoint")
        other = create_model(other)
    try:
        ex = resolve_example(other, example_inputs, input_size)
        return _macs_of(other, ex, f"--match-macs {name}")[""], name
    except UserError as exc:
        raise UserError(f"--match-macs {name}: {exc}") from None


def fit_budget(model: nn.Module, spec: SurgerySpec, decisions: Sequence[Decision], example: Any, budget: Budget,
               *, example_inputs: Any = None, input_size: Any = None) -> tuple[SurgerySpec, dict[str, Any]]:
    """The spec at the compression meeting ``budget`` and the budget's record (for the report).

    ``decisions`` are :func:`decide`'s at the spec's compression: they say which layers scale.
    """
    target, source = budget.target, None
    if budget.match is not None:
        target, source = _match_total(budget, example_inputs, input_size)
    if budget.metric == "macs":
        per_layer = _macs_of(model, example, "the model")
        dense = per_layer[""]
    else:
        dense = sum(p.numel() for p in model.parameters())
    base, scaled = dense, []
    for d in decisions:
        if not d.converted:
            continue
        unit = (per_layer.get(d.name, 0) // d.in_channels if budget.metric == "macs"
                else d.out_channels * math.prod(d.kernel or [1]))
        rule = rule_for(d.name, spec.plan)
        if rule is not None and (rule.compress is not None or rule.degree is not None):
            base -= unit * (d.in_channels - d.degree)  # a plan rule's own compression stays
        else:
            base -= unit * d.in_channels
            scaled.append((d.in_channels, unit))

    def degrees(c: float) -> tuple[int, ...]:
        return tuple(degree_for(cin, compress=c) for cin, _ in scaled)

    def total(c: float) -> int:
        return base + sum(unit * deg for (_, unit), deg in zip(scaled, degrees(c)))

    label = _LABEL[budget.metric]
    what = f"{label} of {source}" if source else label
    c_max = float(max((cin for cin, _ in scaled), default=1))
    low, high = total(c_max), total(1.0)
    reach = f"({human(low, spaced=True)} ... {human(high, spaced=True)})"
    tol = TOLERANCE * target
    if target < low - tol:
        raise UserError(f"target {what} {human(target, spaced=True)} is below what converting the selected layers "
                        f"can reach {reach}; select more layers (--include, --include-classifier) or raise the target")
    if target > high + tol:
        raise UserError(f"target {what} {human(target, spaced=True)} is above what converting the selected layers "
                        f"can reach {reach}; lower the target")
    lo, hi = 1.0, c_max  # total(lo) >= target >= total(hi), or an end is the answer
    if total(hi) >= target:
        lo = hi
    elif total(lo) <= target:
        hi = lo
    for _ in range(200):
        if hi - lo <= 1e-12 * hi:
            break
        mid = (lo + hi) / 2
        if total(mid) >= target:
            lo = mid
        else:
            hi = mid
    c = min((lo, hi), key=lambda x: (abs(total(x) - target), -x))
    reached = total(c)
    if abs(reached - target) > tol:
        near = " and ".join(f"{human(total(x), spaced=True)} (compress {_short(x, degrees)})" for x in (lo, hi))
        raise UserError(f"target {what} {human(target, spaced=True)} cannot be met within {TOLERANCE:.0%}: degrees "
                        f"are whole numbers and the nearest steps reach {near}; give --compress or select more layers")
    c = _short(c, degrees)
    record = {"metric": budget.metric, "target": int(target), "match": source, "compress": c,
              "reached": int(reached), "ratio": reached / target, "range": [int(low), int(high)],
              "tolerance": TOLERANCE}
    return replace(spec, compress=c), record


def _short(c: float, degrees) -> float:
    """The shortest decimal giving the same degrees as ``c`` (3.2 rather than 3.2109375)."""
    want = degrees(c)
    for digits in range(0, 13):
        scale = 10 ** digits
        for r in (round(c, digits), math.floor(c * scale) / scale, math.ceil(c * scale) / scale):
            if r >= 1 and degrees(r) == want:
                return r
    return c


def record_reached(record: dict[str, Any], totals: dict[str, Any]) -> dict[str, Any]:
    """The record with what the converted model's report counts; outside the tolerance: a UserError."""
    reached = totals[f"{record['metric']}_after"]
    record = {**record, "reached": int(reached), "ratio": reached / record["target"]}
    if abs(reached - record["target"]) > TOLERANCE * record["target"]:
        raise UserError(f"compress {record['compress']} was chosen for {_LABEL[record['metric']]} "
                        f"{human(record['target'], spaced=True)} but the converted model counts "
                        f"{human(reached, spaced=True)}; give --compress directly")
    return record
