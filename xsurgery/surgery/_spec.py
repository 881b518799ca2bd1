"""What decides a surgery: the spec (``SurgerySpec``), per-pattern plan rules (``LayerRule``,
:func:`load_plan`) and the per-layer outcome (``Decision``). Plain data, validated on
construction; :mod:`xsurgery.surgery` applies it."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._util.io import read_limited
from .._util.text import load_yaml, safe_repr, safe_text
from ..errors import UserError
from ..graphs import BipartiteGraph, list_graphs
from ..layers import EXECUTIONS, INITS, MIX_POINTS, SparsityConfig

__all__ = ["KINDS", "SURGERY_INITS", "Decision", "LayerRule", "SurgerySpec", "check_degrees_fit", "check_pattern", "check_patterns_match",
           "load_plan", "match_any", "match_pattern", "rule_for"]


def match_pattern(name: str, pattern: str) -> bool:
    """A qualified layer name against a glob, or a regex written ``re:<regex>`` (full match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)

KINDS = ("pointwise", "conv", "linear")
# a layer's own inits, and "project": the kept weights refitted on calibration data (surgery._project)
SURGERY_INITS = (*INITS, "project")
SPEC_VERSION = 2  # 2: mix_points "auto" is "alternate" at mixing 1 (1: "chain"; files saved then keep it)
SPEC_VERSIONS = (1, 2)
MAX_PLAN_BYTES = 1 << 20


def check_pattern(pattern: Any, where: str) -> None:
    """A glob or ``re:<regex>`` that compiles (a bad regex is a one-line error, not re.error)."""
    if not isinstance(pattern, str) or not pattern:
        raise UserError(f"{where}: a pattern must be a non-empty string, got {safe_repr(pattern)}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise UserError(f"{where}: {safe_repr(pattern)} is not a valid regular expression ({exc}); "
                            f"fix it or use a glob such as 'layer*.conv1'") from None


def _check_values(where: str, compress: Any, degree: Any, mixing: Any, graph: Any) -> None:
    """compress >= 1, degree and mixing positive integers, a registered graph (None: not set)."""
    prefix = "--" if where == "" else f"{where}: "
    if compress is not None:
        if isinstance(compress, bool) or not isinstance(compress, (int, float)) \
                or (isinstance(compress, float) and not math.isfinite(compress)) or compress < 1:
            raise UserError(f"{prefix}compress must be a number >= 1 (1 keeps layers dense), got {safe_repr(compress)}")
    if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 1):
        raise UserError(f"{prefix}degree must be a positive integer, got {safe_repr(degree)}")
    if mixing is not None and (isinstance(mixing, bool) or not isinstance(mixing, int) or mixing < 1):
        raise UserError(f"{prefix}mixing must be a positive integer, got {safe_repr(mixing)}")
    if graph is not None and (not isinstance(graph, str) or graph not in list_graphs()):
        what = "unknown --graph" if where == "" else f"{where}: unknown graph"
        raise UserError(f"{what} {safe_repr(graph)}; choose one of {', '.join(list_graphs())}")


@dataclass(frozen=True)
class LayerRule:
    """Per-pattern settings of a plan: exact name, glob, or ``re:<regex>``.

    A rule that matches a layer converts it (it wins over the stem/classifier/kind/width
    defaults like ``--include``) with its own settings, unless ``skip`` keeps it dense.
    """

    pattern: str
    compress: float | None = None
    degree: int | None = None
    mixing: int | None = None
    graph: str | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        # the same checks as the command line's values (SurgerySpec), named by the rule
        if not isinstance(self.pattern, str) or not self.pattern:
            raise UserError(f"plan rule pattern must be a layer name, glob or re:regex, got {safe_repr(self.pattern)}")
        where = f"plan rule {safe_repr(self.pattern)}"
        check_pattern(self.pattern, where)
        if self.compress is not None and self.degree is not None:
            raise UserError(f"{where}: give compress or degree, not both")
        _check_values(where, self.compress, self.degree, self.mixing, self.graph)
        if not isinstance(self.skip, bool):
            raise UserError(f"{where}: skip must be true or false, got {safe_repr(self.skip)}")

    def matches(self, name: str) -> bool:
        return match_pattern(name, self.pattern)


def match_any(name: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` that ``name`` matches."""
    return next((p for p in patterns if match_pattern(name, p)), None)


def check_patterns_match(spec: SurgerySpec, names: Sequence[str]) -> None:
    """Every --include/--exclude pattern and plan rule matches some conv/linear layer."""
    for pats, flag in ((spec.include, "--include"), (spec.exclude, "--exclude")):
        for p in pats:
            if not any(match_pattern(n, p) for n in names):
                raise UserError(f"{flag} pattern {p!r} matches no conv/linear layer; see `xsurgery plan MODEL` for names")
    for rule in spec.plan:
        if not any(rule.matches(n) for n in names):
            raise UserError(f"plan pattern {rule.pattern!r} matches no conv/linear layer; see `xsurgery plan MODEL` for names")


def check_degrees_fit(decisions: Sequence[Decision], spec: SurgerySpec) -> None:
    """A rule's degree, like --degree, must fit some layer it decides."""
    for rule in spec.plan:
        if rule.degree is None:
            continue
        mine = [d for d in decisions if d.reason is None or d.reason.startswith("degree")
                if rule_for(d.name, spec.plan) is rule and d.kind in ("pointwise", "conv", "linear")]
        if mine and not any(d.converted for d in mine):
            widest = max(d.in_channels for d in mine)
            raise UserError(f"plan rule {rule.pattern!r}: degree {rule.degree} is larger than the input channels of "
                            f"every layer it matches (at most {widest}); use a smaller degree or compress")
    if spec.degree is not None and not any(d.converted for d in decisions) \
            and any(d.reason and d.reason.startswith("degree") for d in decisions):
        raise UserError(f"--degree {spec.degree} is larger than the input channels of every selected layer; "
                        f"use a smaller degree or --compress")


def rule_for(name: str, plan: Sequence[LayerRule]) -> LayerRule | None:
    """The plan rule deciding layer ``name``: an exact name first, then patterns in order."""
    for r in plan:
        if r.pattern == name:
            return r
    for r in plan:
        if r.matches(name):
            return r
    return None


@dataclass(frozen=True)
class SurgerySpec:
    """Everything that decides a surgery; round-trips through :meth:`to_dict`."""

    compress: float | None = None
    degree: int | None = None
    mixing: int = 1
    graph: str = "auto"
    seed: int = 0
    init: str = "kaiming"
    layers: tuple[str, ...] = KINDS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_stem: bool = False
    include_classifier: bool = False
    min_channels: int = 0
    plan: tuple[LayerRule, ...] = ()
    execution: str = "auto"
    mix_points: str = "auto"
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.compress is None and self.degree is None:
            object.__setattr__(self, "compress", 2.0)
        if self.compress is not None and self.degree is not None:
            raise UserError("give --compress or --degree, not both")
        if self.mixing is None:
            raise UserError("--mixing must be a positive integer, got None")
        _check_values("", self.compress, self.degree, self.mixing, self.graph)
        if self.init not in SURGERY_INITS:
            raise UserError(f"unknown --init {safe_repr(self.init)}; choose one of {', '.join(SURGERY_INITS)}")
        if self.execution not in EXECUTIONS:
            raise UserError(f"unknown --execution {safe_repr(self.execution)}; choose one of {', '.join(EXECUTIONS)}")
        if self.mix_points not in MIX_POINTS:
            raise UserError(f"unknown --mix-points {safe_repr(self.mix_points)}; choose one of {', '.join(MIX_POINTS)}")
        bad = [k for k in self.layers if k not in KINDS]
        if bad or not self.layers:
            raise UserError(f"--layers takes any of {', '.join(KINDS)}, got {', '.join(self.layers) or 'nothing'}")
        if isinstance(self.min_channels, bool) or not isinstance(self.min_channels, int) or self.min_channels < 0:
            raise UserError(f"--min-channels must be an integer >= 0, got {safe_repr(self.min_channels)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**63:
            raise UserError(f"--seed must be a 64-bit integer, got {safe_repr(self.seed)}")
        for flag, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for p in patterns:
                check_pattern(p, flag)
        for rule in self.plan:
            if not isinstance(rule, LayerRule):
                raise UserError(f"a plan is a list of rules such as [{{pattern: 'features.*', compress: 4}}], got {safe_repr(rule)}")

    @classmethod
    def from_config(cls, config: SparsityConfig, **selection: Any) -> SurgerySpec:
        """The spec of ``config`` (its per-layer ``blocks`` excepted) and the selection fields."""
        if config.blocks is not None:
            raise UserError("blocks is a per-layer setting; a surgery takes compress or degree and mixing")
        sparsity = {k: v for k, v in config.to_dict().items() if k != "blocks"}
        return cls(**sparsity, **selection)

    @property
    def sparsity(self) -> SparsityConfig:
        """The spec's sparsity settings as a :class:`~xsurgery.layers.SparsityConfig`."""
        return SparsityConfig.of(**{k: getattr(self, k) for k in SparsityConfig.field_names() if k != "blocks"})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"], d["include"], d["exclude"] = list(self.layers), list(self.include), list(self.exclude)
        d["plan"] = [{k: v for k, v in asdict(r).items() if v not in (None, False)} for r in self.plan]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SurgerySpec:
        d = dict(d)
        version = d.pop("version", SPEC_VERSION)
        if type(version) is not int or version not in SPEC_VERSIONS:
            raise UserError(f"surgery spec version {safe_repr(version)} is not supported (this xsurgery reads "
                            f"{', '.join(map(str, SPEC_VERSIONS))})")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown surgery field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        for key in ("layers", "include", "exclude"):
            if key in d and d[key] is not None:
                d[key] = (d[key],) if isinstance(d[key], str) else tuple(d[key])
        if "plan" in d:
            d["plan"] = load_plan(d["plan"])
        return cls(**d, version=version)


def load_plan(plan: str | Sequence | dict | None) -> tuple[LayerRule, ...]:
    """Rules from a YAML/JSON file path, a list of dicts, or ``{"rules": [...]}``.

    Each rule: ``{pattern, compress?, degree?, mixing?, graph?, skip?}``.
    """
    if plan is None:
        return ()
    if isinstance(plan, str):
        path = plan
        raw = read_limited(path, MAX_PLAN_BYTES, "plan file")  # a FIFO or /dev/zero is refused, not read
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"plan file {safe_text(path)} is not UTF-8 text; give a YAML/JSON list of rules") from None
        if path.endswith(".json"):
            try:
                plan = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise UserError(f"plan file {safe_text(path)} is not valid JSON: "
                                f"{safe_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 120)}") from None
        else:
            plan = load_yaml(text, f"plan file {safe_text(path)}")
    if isinstance(plan, dict):
        plan = plan.get("rules", [])
    if not isinstance(plan, (list, tuple)):
        raise UserError("a plan is a list of rules such as [{pattern: 'features.*', compress: 4}]")
    rules = []
    valid = {f.name for f in fields(LayerRule)}
    for item in plan:
        if isinstance(item, LayerRule):
            rules.append(item)
            continue
        if not isinstance(item, dict) or "pattern" not in item:
            raise UserError(f"plan rule {safe_repr(item)} needs a 'pattern' (a module name, glob, or re:regex)")
        unknown = sorted(set(item) - valid)
        if unknown:
            raise UserError(f"plan rule {safe_repr(item['pattern'])}: unknown key(s) {safe_text(', '.join(map(str, unknown)))}; valid: {', '.join(sorted(valid))}")
        rules.append(LayerRule(**item))
    return tuple(rules)


@dataclass
class Decision:
    """What the surgery does with one conv/linear layer (also the report's per-layer input)."""

    name: str
    kind: str
    converted: bool
    reason: str | None
    in_channels: int
    out_channels: int
    kernel: list[int] | None
    degree: int | None = None
    blocks: int | None = None
    graph: str | None = None
    mixing: float | None = None
    spectral_gap: float | None = None
    note: str | None = None
    seed: int | None = None
    _graph: BipartiteGraph | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}
