"""The package's import graph: acyclic, and data flows one way (README, Layout).

graphs -> layers -> surgery -> analysis -> checkpoint -> export -> train -> bench -> cli; a
module never imports one above it. Deferred (function-level) imports count for cycles too.
"""

import ast
import pathlib

import xsurgery

PKG = pathlib.Path(xsurgery.__file__).parent

# rank of every module; infrastructure (``_*``) sits where it is used
RANK = {
    "_errors": 0, "_version": 0, "_io": 1, "_args": 4, "graphs": 1, "layers": 2, "_fx": 3, "zoo": 3, "_sources": 4, "_hf": 3, "_inputs": 3,
    "surgery": 5, "analysis": 6, "_manifest": 6, "checkpoint": 7, "export": 8, "_recipe": 9, "data": 10,
    "_train_state": 10, "train": 11, "bench": 12, "cli": 13, "__init__": 14,
}
# deferred imports that go up, kept on purpose (a ratchet: a new one fails this test):
# convert() returns its report
UPWARD_DEFERRED = {("surgery", "analysis")}


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported xsurgery module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
        elif node.level == 0 and node.module and node.module.split(".")[0] == "xsurgery":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        else:
            continue
        out += [(n, id(node) in top) for n in names]
    return out


def _graph() -> dict[str, list[tuple[str, bool]]]:
    return {p.stem: _imports(p) for p in sorted(PKG.glob("*.py"))}


def test_every_module_has_a_rank():
    assert set(_graph()) == set(RANK), "give a new module its place in RANK"


def test_import_graph_is_acyclic():
    graph = {m: {d for d, _ in deps if d in RANK} for m, deps in _graph().items()}
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
