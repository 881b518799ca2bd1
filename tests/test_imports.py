"""The package's import graph: acyclic, and data flows one way (README, Layout).

graphs -> layers -> surgery -> analysis -> checkpoint -> export -> train -> bench -> cli; a
module never imports one above it. Deferred (function-level) imports count for cycles too.
A subpackage's modules are named ``package.module`` (its ``__init__`` is ``package``) and have
their own order inside the package's place.
"""

import ast
import pathlib

import xsurgery

PKG = pathlib.Path(xsurgery.__file__).parent

# rank of every module; infrastructure (``_*``) sits where it is used
RANK = {
    "_errors": 0, "_version": 0, "_io": 1, "_memory": 1, "_args": 4, "graphs": 1, "layers": 2, "_fx": 3, "_mixpoints": 3.5, "_spec": 3.6, "_outcheck": 4, "zoo": 3, "_sources": 4, "_hf": 3, "_example": 2.5, "_inputs": 3,
    "_table": 1.5, "_progress": 1.5, "_count": 5.5, "_render": 5.8, "_plot": 6.5, "_onnx_report": 6.5,
    "_connectivity": 7.5,
    "surgery": 5, "analysis": 6, "_manifest": 6, "checkpoint": 7, "cli": 13, "__init__": 14,
    # train/: recipe -> data -> distributed / epoch commits -> the loop
    "train._recipe": 9, "train.data": 10, "train._distributed": 10, "train._state": 10, "train._loop": 10.5,
    "train": 11,
    # export/: layer forms -> torch->ONNX -> ORT timing / metadata / verification -> driver -> CLI
    "export._forms": 8.0, "export._trace": 8.1, "export._ort": 8.2, "export._ov": 8.2, "export._meta": 8.2, "export._verify": 8.2,
    "export._export": 8.5, "export._cli": 8.6, "export": 8.9,
    # bench/: measuring -> the benchmark -> rendering -> CLI
    "bench._measure": 12.0, "bench._baselines": 12.1, "bench._run": 12.2, "bench._output": 12.4, "bench._cli": 12.6, "bench": 12.9,
}
# deferred imports that go up, kept on purpose (a ratchet: a new one fails this test):
# convert() returns its report
UPWARD_DEFERRED = {("surgery", "analysis")}


def _name(path: pathlib.Path) -> str:
    """``graphs``, ``export._ort``; a package's ``__init__`` is the package (the top one ``__init__``)."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The package modules an ``ImportFrom`` in ``module`` names (dotted, relative to xsurgery)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if module == "__init__":
            base = []
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
    elif node.module and node.module.split(".")[0] == "xsurgery":
        base, node_module = [], ".".join(node.module.split(".")[1:])
        return [node_module] if node_module else [a.name for a in node.names]
    else:
        return []
    if node.module:
        return [".".join(base + node.module.split("."))]
    return [".".join(base + [a.name]) for a in node.names]


def _known(name: str) -> str:
    """The ranked module a dotted import lands in (``export._ort.x`` -> ``export._ort``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in RANK:
        parts.pop()
    return ".".join(parts) or name


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported xsurgery module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    module, is_package = _name(path), path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out += [(_known(n), id(node) in top) for n in _resolve(module, is_package, node)]
    return out


def _graph() -> dict[str, list[tuple[str, bool]]]:
    return {_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_rank():
    assert set(_graph()) == set(RANK), "give a new module its place in RANK"


def test_import_graph_is_acyclic():
    graph = {m: {d for d, _ in deps if d in RANK and d != m} for m, deps in _graph().items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_imports_flow_one_way():
    bad = []
    for m, deps in _graph().items():
        for d, top_level in deps:
            if d in RANK and RANK[d] >= RANK[m] and not (not top_level and (m, d) in UPWARD_DEFERRED):
                bad.append(f"{m} -> {d}")
    assert not bad, f"imports against the data flow: {bad}"


def test_model_building_knows_nothing_about_checkpoints():
    assert all(d != "checkpoint" for d, _ in _graph()["_sources"])
