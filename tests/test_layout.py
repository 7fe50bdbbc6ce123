"""The package's shape: which subpackage may import which (lazy imports inside functions included), no import
cycles between modules, a docstring at the top of every module, and no module far beyond ~500 lines."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "llada_scale"

# subpackage -> subpackages it may import (besides itself). Lower layers never import higher ones.
ALLOWED = {
    "model": set(),
    "data": set(),
    "objectives": {"model"},
    "sampling": {"model"},
    "checkpoint": {"model", "data"},
    "training": {"model", "data", "objectives", "sampling", "checkpoint"},
    "eval": {"model", "data", "objectives", "sampling", "checkpoint", "api"},
}
# modules directly under llada_scale/. api (llada_scale.load) sits above the inference layers and below eval,
# whose lm-evaluation-harness model and CLI are built on it.
TOP_LEVEL = {"train": {"training"}, "testing": set(), "api": {"model", "data", "objectives", "sampling", "checkpoint"}}
MAX_LINES = 520


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(name: str, path: Path) -> set[str]:
    """Every ``llada_scale.*`` module named by an import statement anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("llada_scale")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llada_scale"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from llada_scale.x import module`
    known = {m for m, _ in _modules()}
    return {m for m in out if m in known and m != name}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_only_lower_layers():
    bad = []
    for name, path in _modules():
        layer = _layer(name)
        if name.count(".") == 1 and layer in TOP_LEVEL:
            allowed = TOP_LEVEL[layer]
        elif layer in ALLOWED:
            allowed = ALLOWED[layer]
        else:
            continue  # llada_scale/__init__.py
        for dep in _imports(name, path):
            other = _layer(dep)
            if other and other != layer and other not in allowed:
                bad.append(f"{name} imports {dep}")
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = defaultdict(set)
    for name, path in _modules():
        for dep in _imports(name, path):
            # a package __init__ that re-exports its modules is an edge package -> module, not a cycle source
            graph[name].add(dep)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if m.startswith(n + "."):  # importing one's own submodule (package __init__)
                continue
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in list(graph):
        if n not in state:
            visit(n)


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_module_has_docstring_and_size(name, path):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{name} has no module docstring saying what it owns"
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES}); split it"
