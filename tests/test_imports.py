"""The package's import graph: one folder per stage, data flows one way (README, Layout).

errors -> _util -> graphs -> layers -> models -> surgery -> analysis -> checkpoint -> export ->
train -> bench -> cli: a module never imports a folder ranked above its own, deferred
(function-level) imports included, and the import graph is acyclic. Across folders only public
names travel: a folder's ``_name.py`` modules and ``_name`` objects stay inside it.
"""

import ast
import pathlib

import xsurgery

PKG = pathlib.Path(xsurgery.__file__).parent

# rank of every folder (the top-level modules are their own "folder")
RANK = {
    "errors": 0, "_version": 0, "_util": 1, "graphs": 2, "layers": 3, "models": 4, "surgery": 5, "analysis": 6,
    "checkpoint": 7, "export": 8, "train": 9, "bench": 10, "cli": 11, "__init__": 12,
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


def _folder(module: str) -> str:
    return module.split(".")[0]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[tuple[str, str]]:
    """(imported module, imported name) for an ``ImportFrom`` in ``module`` (dotted, relative to xsurgery)."""
    if node.level:
        base = [] if module == "__init__" else module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = base + (node.module.split(".") if node.module else [])
    elif node.module and node.module.split(".")[0] == "xsurgery":
        target = node.module.split(".")[1:]
    else:
        return []
    out = []
    for a in node.names:
        sub = PKG.joinpath(*target, a.name)
        if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():  # `from . import zoo`: a module
            out.append((".".join(target + [a.name]), ""))
        else:
            out.append((".".join(target), a.name))
    return out


def _imports(path: pathlib.Path) -> list[tuple[str, str, bool]]:
    """(imported xsurgery module, name, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    module, is_package = _name(path), path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out += [(m, n, id(node) in top) for m, n in _resolve(module, is_package, node)]
    return out


def _graph() -> dict[str, list[tuple[str, str, bool]]]:
    return {_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_folder_has_a_rank():
    assert {_folder(m) for m in _graph()} == set(RANK), "give a new folder its place in RANK"


def test_ranks_are_the_stage_order():
    assert sorted(RANK.values()) == [0, 0, *range(1, 13)]


def test_import_graph_is_acyclic():
    modules = set(_graph())
    graph = {m: {d for d, _, _ in deps if d in modules and d != m} for m, deps in _graph().items()}
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
        for d, _, top_level in deps:
            a, b = _folder(m), _folder(d)
            if a != b and RANK[b] >= RANK[a] and not (not top_level and (a, b) in UPWARD_DEFERRED):
                bad.append(f"{m} -> {d}")
    assert not bad, f"imports against the data flow: {bad}"


def test_private_names_stay_in_their_folder():
    bad = []
    for m, deps in _graph().items():
        for d, name, _ in deps:
            if _folder(m) == _folder(d) or d.startswith("_util"):
                continue
            private_module = any(p.startswith("_") for p in d.split(".")[1:])
            if private_module or (name.startswith("_") and not name.startswith("__")):
                bad.append(f"{m} -> {d}{'.' + name if name else ''}")
    assert not bad, f"private names imported across folders: {bad}"


def test_only_the_cli_parses_arguments():
    users = set()
    for p in PKG.rglob("*.py"):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if "argparse" in names:
                users.add(_folder(_name(p)))
    assert users <= {"cli"}, f"argparse imported outside cli/: {sorted(users - {'cli'})}"


def test_model_building_knows_nothing_about_checkpoints():
    assert all(_folder(d) != "checkpoint" for m, deps in _graph().items() if _folder(m) == "models" for d, _, _ in deps)
