"""app/ imports without cycles: each module's imports, at its top or inside a function, point one
way (main -> routes -> pages, views and services -> the query layer -> models)."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """app's modules -> the app modules each imports (`from app import x` counts as app.x)."""
    modules = {module_name(path): path for path in APP.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named = {f"{node.module}.{alias.name}" for alias in node.names}
                graph[name] |= ({node.module} | named) & set(modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle found by a depth-first walk, as the path that closes it."""
    found, done = [], set()

    def walk(name: str, path: list[str]) -> None:
        if name in path:
            found.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for imported in sorted(graph[name]):
            walk(imported, path + [name])
        done.add(name)

    for name in sorted(graph):
        walk(name, [])
    return found


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "app.routes.saes" in graph["app.main"]  # from app.routes import saes
    assert "app.pages" in graph["app.routes.saes"]  # from app import pages
    assert "app.probe_service" in graph["app.deps"]  # from app.probe_service import ProbeService


def test_app_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
