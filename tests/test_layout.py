"""The project's shape: no import cycle among its own modules (a cycle holds together only by import order, and a
model file copied on its own would break on it)."""

import ast

from conftest import ROOT


def project_imports() -> dict:
    """{module: sorted project modules it imports anywhere in its file (top level or inside functions)}."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    for package in ("ttt_train", "ttt_lm"):
        files |= {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = sorted(imported & files.keys() - {name})
    return graph


def test_no_import_cycle_among_the_project_modules():
    graph = project_imports()
    assert graph["ttt_math"] == [] and "ttt" not in graph["ttt_scan"]  # the inner loop's math is the leaf
    state = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dependency in graph[name]:
            assert state.get(dependency) != 1, "import cycle: " + " -> ".join(path + [dependency])
            if dependency not in state:
                visit(dependency, path + [dependency])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert len(graph) > 20  # every module was read
