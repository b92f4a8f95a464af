"""Who may import whom: one import root, no cycles, and the rooms' rules (function-level imports included).

Every ``.py`` under ``clip2video/``, ``modules/`` and ``dataloaders/`` is read as the module it is installed as
(``modules/network/model.py`` is ``clip2video.modules.network.model``), and so are the root entry scripts.
Imports inside functions count: a cycle that only closes at call time still ties two rooms together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {"clip2video": "clip2video", "modules": "clip2video.modules", "dataloaders": "clip2video.dataloaders"}
ENTRY_SCRIPTS = ("train.py", "infer_retrieval.py", "sample_frame.py", "search.py")


def _files() -> dict[str, Path]:
    """Installed module name → file."""
    out = {}
    for folder, pkg in ROOMS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg, *parts])] = path
    for script in ENTRY_SCRIPTS:
        out[f"<{script}>"] = ROOT / script
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (absolute or relative, at any depth of the file)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import module`
        for t in targets:
            # the longest known module that t names or lies in
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    files = _files()
    known = set(files)
    return {name: _imports(name, path, known) for name, path in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def _without_parents(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop the edges a module has to its own parent packages (importing ``a.b.c`` runs ``a/__init__`` and
    ``a/b/__init__`` first; that is not a dependency of the module's code)."""
    return {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in g.items()}


def _violations(g: dict[str, set[str]], sources: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{n} → {d}" for n, deps in g.items() if n == sources or n.startswith(sources + ".")
                  for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_resolution_sees_relative_and_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from .b import x\nfrom .. import c\ndef f():\n    from p.q import d\n    import p.e\n")
    known = {"p", "p.q", "p.q.b", "p.c", "p.e", "p.q.d"}
    assert _imports("p.q.m", f, known) == {"p.q.b", "p", "p.c", "p.q", "p.q.d", "p.e"}


def test_every_room_is_walked():
    g = graph()
    for mod in ("clip2video.modules.network.model", "clip2video.modules.weights.checkpoint",
                "clip2video.dataloaders.frames", "clip2video.search.index", "clip2video.search.build",
                "clip2video.search.store", "clip2video.search.batcher", "clip2video.cli.serve",
                "clip2video.cli.common", "<train.py>"):
        assert mod in g, mod
    assert "clip2video.modules.weights.checkpoint" in g["clip2video.modules.weights.factory"]


def test_no_import_cycle_anywhere():
    g = _without_parents(graph())
    cycle = find_cycle(g)
    assert cycle is None, " → ".join(cycle)


def test_model_side_never_imports_the_data_side_or_the_outer_rooms():
    g = graph()
    bad = _violations(g, "clip2video.modules", ("clip2video.dataloaders", "clip2video.search", "clip2video.cli",
                                                "clip2video.visualize"))
    assert not bad, bad


def test_data_side_never_imports_the_search_or_command_rooms():
    bad = _violations(graph(), "clip2video.dataloaders", ("clip2video.search", "clip2video.cli",
                                                          "clip2video.visualize"))
    assert not bad, bad


@pytest.mark.parametrize("room", ["clip2video.modules", "clip2video.dataloaders", "clip2video.search",
                                  "clip2video.visualize", "clip2video.fileio"])
def test_the_library_never_imports_the_command_layer_or_argparse(room):
    files = _files()
    g = graph()
    assert not _violations(g, room, ("clip2video.cli",)), _violations(g, room, ("clip2video.cli",))
    for name, path in files.items():
        if name == room or name.startswith(room + "."):
            tree = ast.parse(path.read_text())
            uses = [n for n in ast.walk(tree)
                    if isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
                    or isinstance(n, ast.ImportFrom) and n.module == "argparse"]
            assert not uses, f"{name} imports argparse"


def test_no_file_imports_upward_out_of_its_folder():
    """``from ..x`` out of ``modules/`` or ``dataloaders/`` would tie the folder to where it is installed."""
    for folder in ("modules", "dataloaders"):
        for path in (ROOT / folder).rglob("*.py"):
            depth = len(path.relative_to(ROOT / folder).parts)  # 1 for modules/x.py, 2 for modules/sub/x.py
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level > depth:
                    raise AssertionError(f"{path.relative_to(ROOT)}: relative import out of {folder}/")


def test_entry_scripts_are_thin():
    """The root scripts only hand over to ``clip2video.cli``: nothing else of the project, and few lines."""
    g = graph()
    for script in ENTRY_SCRIPTS:
        deps = g[f"<{script}>"]
        assert deps and all(d.startswith("clip2video.cli.") or d == "clip2video" for d in deps), (script, deps)
        code = [ln for ln in (ROOT / script).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(code) < 25, script


def test_search_rooms():
    """The folder format knows neither the builder nor the reader; the batcher knows nothing of the project;
    the command line builds its parsers without the HTTP app (which needs the serve extra)."""
    g = graph()
    s = "clip2video.search."
    assert not g[s + "store"] & {s + "build", s + "index", s + "app", s + "batcher"}
    assert not g[s + "batcher"] and not g[s + "limits"]
    assert not g[s + "build"] & {s + "index", s + "app"} and not g[s + "index"] & {s + "build", s + "app"}
    assert s + "app" not in g["clip2video.cli.search"]
    # model loading and model identity belong to the model side, used by both the evaluation and the index
    for user in ("clip2video.cli.infer_retrieval", "clip2video.cli.search", s + "index"):
        assert g[user] & {"clip2video.modules.weights.spec", "clip2video.modules.weights.identity"}, user


def test_weight_io_does_not_know_the_model():
    g = graph()
    w = "clip2video.modules.weights."
    net = "clip2video.modules.network."
    assert not g[w + "checkpoint"] & {net + "model", w + "factory", w + "release"}
    assert not g[w + "release"] & {net + "model", w + "factory"}
    assert not g[net + "model"] & {w + "checkpoint", w + "release", w + "factory"}


def test_a_folder_imported_under_its_own_name_is_refused():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import modules"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "import clip2video.modules" in out.stderr
