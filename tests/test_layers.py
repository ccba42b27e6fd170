"""The package's import graph stays layered: no module imports, even lazily, one that imports it back, and only
the command line imports ``pixart_cli.cli``."""

from __future__ import annotations

import ast
from pathlib import Path

import pixart_cli

PACKAGE = Path(pixart_cli.__file__).parent


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_of(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pixart_cli"):
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("pixart_cli")]
            else:
                continue
            # `from pixart_cli.x import y` imports y if it is a module, else x (and each package on the way).
            target = next((t for t in targets if t in modules), None)
            if target not in (None, module):
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = _import_graph()
    # Package __init__ files that re-export their own modules are the one allowed loop (package → its module).
    for package in [m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()]:
        graph[package] = {t for t in graph[package] if not t.startswith(package + ".")}
    assert _cycles(graph) == []


def test_only_the_command_line_imports_the_cli():
    graph = _import_graph()
    outside = {m: sorted(t for t in ts if t.startswith("pixart_cli.cli")) for m, ts in graph.items()}
    offenders = {
        m: ts for m, ts in outside.items() if ts and not m.startswith(("pixart_cli.cli", "pixart_cli.__main__"))
    }
    assert offenders == {}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
