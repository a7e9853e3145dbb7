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


def defined_names(path) -> set:
    """The names a module defines at its top level (in try/if blocks too): functions, classes, assignments and
    imports."""
    names, pending = set(), list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Try, ast.If)):
            pending += node.body + node.orelse + [n for h in getattr(node, "handlers", []) for n in h.body]
    return names


def test_every_name_imported_from_a_project_module_exists():
    """`from train_ttt import X` in a bench script, launcher, test or module names something train_ttt defines (a
    name moved elsewhere breaks a script that no test runs, e.g. bench/speed.py)."""
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    for package in ("ttt_train", "ttt_lm"):
        modules |= {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    importers = [*modules.values(), *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("tests/*.py")]
    missing = []
    for path in importers:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                defined = defined_names(modules[node.module])
                missing += [f"{path.relative_to(ROOT)}: {node.module}.{alias.name}" for alias in node.names
                            if alias.name != "*" and alias.name not in defined
                            and f"{node.module}.{alias.name}" not in modules]
    assert missing == []
