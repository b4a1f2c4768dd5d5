"""The import structure: the library never imports the application, and no module cycles.

Run alone (it imports nothing of the project, it reads the files):
``python -m pytest -q tests/test_import_graph.py``; ``python tests/test_import_graph.py``
prints the cycles and the upward arrows it finds.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("flipjax", "data_pipelines", "experiments", "benchmarks")
# Who may import whom: the library stands alone; the data pipelines use the library; the
# application (experiments) uses both; benchmarks may use everything.
ALLOWED = {
    "flipjax": {"flipjax"},
    "data_pipelines": {"data_pipelines", "flipjax"},
    "experiments": {"experiments", "data_pipelines", "flipjax"},
    "benchmarks": set(PACKAGES),
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
    """Every project module (dotted name -> file)."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, known: dict[str, pathlib.Path]) -> str | None:
    """The project module ``name`` refers to (itself, or its package for an attribute)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in the file (functions included,
    ``TYPE_CHECKING`` blocks excluded: those never run)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}".strip(".")
                # ``from pkg import mod`` imports the module; ``from mod import f``, mod.
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                dep = _resolve(t, known)
                if dep and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def upward_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs that break :data:`ALLOWED`."""
    return sorted((a, b) for a, deps in graph.items() for b in deps
                  if b.split(".")[0] not in ALLOWED[a.split(".")[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), package
    ``__init__`` re-export arrows into the package's own modules ignored."""
    def real(a: str, b: str) -> bool:  # a package importing its own submodule is no cycle
        return not b.startswith(a + ".")

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if not real(v, w):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_library_never_imports_the_application():
    assert upward_arrows(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checker_sees_arrows_and_cycles():
    graph = {"flipjax.a": {"experiments.b"}, "experiments.b": {"flipjax.a"},
             "flipjax": {"flipjax.a"}, "data_pipelines.c": {"flipjax.a"}}
    assert upward_arrows(graph) == [("flipjax.a", "experiments.b")]
    assert cycles(graph) == [["experiments.b", "flipjax.a"]]
    assert "flipjax.builders" in import_graph()["flipjax.planning.world_model"]


if __name__ == "__main__":
    g = import_graph()
    print("upward arrows:", upward_arrows(g) or "none")
    print("cycles:", cycles(g) or "none")
