"""The import graph of hf_loop: acyclic, one direction, no private name imported across packages, and every
module importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hf_loop

ROOT = Path(hf_loop.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "__main__.py":  # runs the command line when imported
            continue
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _package(name: str) -> str:
    """The package a module belongs to: hf_loop.stream for hf_loop.stream.reader, hf_loop.loader for itself."""
    return ".".join(name.split(".")[:2])


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported hf_loop module, names taken from it) for every import in the module, functions included."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name.startswith("hf_loop")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            if not base.startswith("hf_loop"):
                continue
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            if len(submodules) < len(names):
                out.append((base, [n for n in names if n not in submodules]))
            out += [(f"{base}.{n}", []) for n in submodules]
    return out


def _graph() -> dict[str, set[str]]:
    """Edges: each imported module, and the packages its import runs on the way (except the root package and
    the importer's own packages, which are already running)."""
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        mine = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 2)}
        edges = set()
        for target, _ in _imports(name):
            parts = target.split(".")
            edges.add(target)
            edges |= {".".join(parts[:k]) for k in range(2, len(parts))} - mine
        graph[name] = edges - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_of_hf_loop_is_acyclic():
    graph = _graph()
    assert graph["hf_loop.stream.reader"] >= {
        "hf_loop.data",
        "hf_loop.stream.protocol",
    }  # the graph sees them
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_data_and_stream_point_one_way():
    graph = _graph()
    data = [m for m in MODULES if m.startswith("hf_loop.data")]
    assert not [(m, t) for m in data for t in graph[m] if t.startswith("hf_loop.stream")]
    assert not [t for t in graph["hf_loop.stream.reader"] if t.startswith("hf_loop.stream.tracker")]


def test_no_private_name_is_imported_across_packages():
    crossing = []
    for name in MODULES:
        for target, names in _imports(name):
            if _package(target) == _package(name):
                continue
            private = [n for n in names if n.startswith("_")]
            private += [p for p in target.split(".") if p.startswith("_")]
            if private:
                crossing.append(f"{name} imports {private} from {target}")
    assert crossing == []


def test_every_module_imports_on_its_own():
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'hf_loop' or m.startswith('hf_loop.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
