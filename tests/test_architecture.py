"""The layering, checked from the source: an import graph of verityfuse/ built from the AST.

Two rules (issue 18, "executable architecture"):

* no import cycle. Among module-level imports none at all: such a cycle makes import order
  matter and hides what depends on what. A function-level import that closes a cycle is the
  usual way round that, so those count too, except the few listed in LATE_CYCLES with the
  reason the late binding is the design (a dispatcher loading its subcommands on demand);
* pyfuse3 and trio only in the FUSE adapter (the operations table, its ioctl handlers and the
  daemon that runs them): the views, the store, the verifier and the library are pure code that
  tests and `verityfuse verify` call directly. The native shim loads libfuse through its own C
  extension and imports neither.

Imports inside ``if TYPE_CHECKING:`` are skipped: they are never executed.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import verityfuse

PACKAGE = Path(verityfuse.__file__).resolve().parent
# The FUSE adapter, module by module: the operations table (ops), the boundary where its
# handlers' errors become errnos (ops_boundary), its ioctl handlers (ops_ioctl), its read path (ops_read: trio's worker threads and checkpoints decide where a
# read runs, so it is adapter, not core), the daemon that runs them and the lock its
# request loop takes turns with (fuse_loop).
ADAPTER = {"ops", "ops_boundary", "ops_ioctl", "ops_read", "daemon", "fuse_loop"}
FUSE_RUNTIME = {"pyfuse3", "trio"}

# Cycles closed only by a function-level import, and why each is deliberate. A new one fails
# test_no_import_cycle_through_late_imports: move what both sides need into a module both import.
LATE_CYCLES = {
    # cli dispatches to cli_fsverity's subcommands, loading it only when one runs; cli_fsverity
    # uses cli's shared option and error helpers.
    ("cli", "cli_fsverity"),
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, node: ast.ImportFrom) -> List[str]:
    """The absolute names an ImportFrom brings in (``from . import a, b`` names a and b)."""
    if node.level == 0:
        return [node.module or ""]
    # The package __init__ is its own package; any other module's is its parent.
    parts = module.split(".") if module == "verityfuse" else module.split(".")[:-1]
    prefix = ".".join(parts[: len(parts) - (node.level - 1)])
    names = [node.module] if node.module else [alias.name for alias in node.names]
    return [f"{prefix}.{name}" if prefix else name for name in names]


def _imports(module: str, tree: ast.Module) -> List[Tuple[str, bool]]:
    """(imported name, at module level?) for every executed import in *tree*."""
    found: List[Tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, top)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.extend((name, top) for name in _resolve(module, node))
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    return found


def _graph() -> Dict[str, List[Tuple[str, bool]]]:
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = "verityfuse" if path.stem == "__init__" else f"verityfuse.{path.stem}"
        graph[name] = _imports(name, ast.parse(path.read_text(), str(path)))
    return graph


def _short(name: str) -> str:
    return name.split(".", 1)[1] if "." in name else name


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return found


def _edges(graph: Dict[str, List[Tuple[str, bool]]], module_level_only: bool) -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {}
    for module, imports in graph.items():
        # The package __init__ loads the library lazily (PEP 562) and a submodule's
        # "from . import x" is resolved to verityfuse.x, so the package itself is a leaf here.
        edges[module] = {name for name, top in imports
                         if (top or not module_level_only) and name in graph
                         and name != "verityfuse" and name != module}
    return edges


def test_graph_sees_known_edges() -> None:
    # The parser must find both kinds of import, or the rules below check nothing.
    graph = _graph()
    ops = dict(graph["verityfuse.ops"])
    assert ops.get("pyfuse3") is True
    assert ("trio", False) in graph["verityfuse.daemon"]
    assert ("verityfuse.cli_fsverity", False) in graph["verityfuse.cli"]
    assert ("verityfuse.api_core", True) in graph["verityfuse.api"]
    # An import under TYPE_CHECKING is never executed, so it is no edge.
    snippet = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .store import Store\n"
               "else:\n    from . import merkle\ndef f():\n    from ..x import y\n")
    assert _imports("verityfuse.m", ast.parse(snippet)) == [
        ("typing", True), ("verityfuse.merkle", True), ("x", False)]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _names(cycles: List[List[str]]) -> List[Tuple[str, ...]]:
    return [tuple(_short(m) for m in c) for c in cycles]


def test_no_module_level_import_cycle() -> None:
    assert _names(_cycles(_edges(_graph(), module_level_only=True))) == []


def test_no_import_cycle_through_late_imports() -> None:
    cycles = set(_names(_cycles(_edges(_graph(), module_level_only=False))))
    assert cycles - LATE_CYCLES == set()
    assert LATE_CYCLES - cycles == set(), "a listed cycle is gone: drop it from LATE_CYCLES"


def test_fuse_runtime_only_in_the_adapter() -> None:
    offenders = sorted(
        f"{_short(module)} imports {name}" + ("" if top else " (in a function)")
        for module, imports in _graph().items()
        for name, top in imports
        if name.split(".")[0] in FUSE_RUNTIME and _short(module) not in ADAPTER)
    assert offenders == []
