"""The package structure the README's Architecture section promises: who may import whom.

Every `gemini_lm` import of every module — function-local ones included — is read with
`ast`, so a new dependency that breaks the layering or closes a cycle fails here.
"""
import ast
import functools
import os

from tests.e2e import ROOT

PACKAGE = os.path.join(ROOT, "gemini_lm")

# Unit (a subpackage, or a top-level module) -> the units it may import.
ALLOWED = {
    "errors": set(),
    "log": set(),
    "safefs": {"errors"},   # private directories and files opened without following links
    "checkpoint": {"errors"},
    "parallel": {"checkpoint", "errors"},
    "data": {"errors", "log"},
    "models": {"parallel", "errors"},
    "gemini": {"checkpoint", "parallel", "errors", "log", "safefs"},
    "resilience": {"checkpoint", "errors", "log", "safefs"},
    "flag_bounds": {"errors"},   # the range of every numeric flag
    "config": {"errors", "models", "flag_bounds"},   # models: the presets the size flags' help states
    "training": {"checkpoint", "parallel", "models", "data", "gemini", "resilience", "errors", "log", "config",
                 "safefs"},
    "inference": {"checkpoint", "models", "data", "parallel", "errors"},
    "eval": {"gemini", "errors"},
}


def _unit(path: str) -> str:
    rel = os.path.relpath(path, PACKAGE)
    head = rel.split(os.sep)[0]
    return head[:-3] if head.endswith(".py") else head


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "gemini_lm" and len(parts) > 1:
                out.add(parts[1])
    return out


@functools.lru_cache(maxsize=1)
def _graph() -> dict[str, frozenset[str]]:
    graph: dict[str, set[str]] = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py") and f != "__init__.py" or f == "__init__.py" and dirpath != PACKAGE:
                path = os.path.join(dirpath, f)
                unit = _unit(path)
                graph.setdefault(unit, set()).update(_imports(path) - {unit})
    # `from gemini_lm.gemini import x` names a module of the unit, not a unit itself
    units = set(graph)
    return {u: frozenset(d for d in deps if d in units) for u, deps in graph.items()}


def test_every_unit_is_described():
    assert set(_graph()) <= set(ALLOWED), f"add the new package to ALLOWED: {set(_graph()) - set(ALLOWED)}"


def test_packages_import_only_what_the_layering_allows():
    bad = {u: sorted(deps - ALLOWED[u]) for u, deps in _graph().items() if deps - ALLOWED[u]}
    assert not bad, f"imports the layering forbids: {bad}"


def test_no_import_cycles_between_packages():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(u, path):
        state[u] = 1
        for d in sorted(graph.get(u, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [u, d]))
            if d not in state:
                visit(d, path + [u])
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [])


def test_the_checkpoint_package_is_a_leaf():
    assert _graph()["checkpoint"] <= {"errors"}
