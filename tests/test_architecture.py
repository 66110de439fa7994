"""The package's import arrows (docs/ARCHITECTURE.md): lower layers know nothing of higher ones.

Read with ``ast`` from the source, imports inside functions included: a subpackage imports only
from a lower layer (or itself), no module imports a private name from another subpackage, and
no two modules import each other, directly or around a circle.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bitfit"

# Lowest first. A subpackage may import from any layer below its own, never from its own layer's
# siblings or from above. The package's own __init__.py (the public surface) may import anything.
LAYERS = [
    {"errors"},
    {"core", "data"},
    {"fast"},
    {"methods"},
    {"artifacts"},
    {"peft", "analysis"},
    {"training", "serving"},
    {"cli"},
]
LAYER_OF = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
MAX_LINES = 700


def _modules() -> dict:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


MODULES = _modules()


def _imports(name: str) -> list:
    """(target module, imported names, line) for every import in module ``name``."""
    path, is_pkg = MODULES[name]
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "bitfit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "bitfit":
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                out += [(s, [], node.lineno) for s in subs]
                names = [n for n in names if f"{target}.{n}" not in MODULES]
            if names or not subs:
                out.append((target, names, node.lineno))
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_subpackage_has_a_layer():
    tops = {_top(m) for m in MODULES if _top(m)}
    assert tops <= set(LAYER_OF), f"add {sorted(tops - set(LAYER_OF))} to LAYERS and docs/ARCHITECTURE.md"
    top_level = sorted(p.name for p in SRC.glob("*.py"))
    assert top_level == ["__init__.py", "errors.py"], top_level


def test_arrows_point_down():
    bad = []
    for name in MODULES:
        src = _top(name)
        if not src:  # bitfit/__init__.py wires the public surface together
            continue
        for target, names, line in _imports(name):
            dst = _top(target)
            if not dst or dst == src:
                continue
            if LAYER_OF[dst] >= LAYER_OF[src]:
                bad.append(f"{name}:{line} imports {target} ({src} -> {dst})")
            private = [n for n in names if n.startswith("_")]
            if private:
                bad.append(f"{name}:{line} imports private {private} from another package {target}")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _, _ in _imports(name):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target != "bitfit":
                graph[name].add(target)
    # a package's __init__ importing its own submodules is not a circle of jobs: only modules count
    state, circles = {}, []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if MODULES[nxt][1] and nxt != "bitfit" and node.startswith(nxt + "."):
                continue  # a submodule importing a name its package __init__ re-exports from a sibling
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name][0].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by job (docs/ARCHITECTURE.md)"
