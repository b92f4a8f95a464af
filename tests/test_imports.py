"""The package's modules import each other without cycles (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _graph() -> dict[str, set[str]]:
    """modules/<name>.py → the sibling modules it imports, relatively or as ``clip2video.modules.x``."""
    names = {p.stem for p in (ROOT / "modules").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((ROOT / "modules" / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 1:
                    target = mod.split(".")[0] if mod else None
                    deps |= {target} if target else {a.name for a in node.names}
                elif mod.startswith("clip2video.modules."):
                    deps.add(mod.split(".")[2])
        graph[name] = deps & names - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_modules_import_graph_is_acyclic():
    graph = _graph()
    assert {"model", "checkpoint", "release", "factory"} <= set(graph)
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_weight_io_does_not_know_the_model():
    graph = _graph()
    assert not graph["checkpoint"] & {"model", "factory", "release"}
    assert not graph["release"] & {"model", "factory"}
    assert not graph["model"] & {"checkpoint", "release", "factory"}
