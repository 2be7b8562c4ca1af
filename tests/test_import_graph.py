"""The layers of docs/architecture.md, read from the source (every import, also inside functions).

Bottom up: the pure core ``chrono`` -> ``probes`` and ``dashboard`` (tensor and
serving layer) -> ``reference_models`` -> ``chrono_cli`` (the application layer).
No import may point up, and the package graph has no circle. Dynamic imports
count too: ``importlib.import_module("pkg.mod")`` / ``__import__("pkg")`` with a
string literal. Failures name every offending ``file:line``.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("chrono", "probes", "dashboard", "reference_models", "chrono_cli")

# package -> packages it must never import (DESIGN §2, docs/architecture.md)
FORBIDDEN = {
    "chrono": {"probes", "dashboard", "reference_models", "chrono_cli"},
    "probes": {"reference_models", "dashboard", "chrono_cli"},
    "dashboard": {"probes", "reference_models", "chrono_cli"},
    "reference_models": {"dashboard", "chrono_cli"},
}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Absolute module named by a (possibly relative) import in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def _dynamic_target(call: ast.Call) -> str | None:
    """The module a literal ``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")`` names."""
    f = call.func
    fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if fname not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def imports_of(path: Path, root: Path = REPO) -> list[tuple[str, int]]:
    """``(absolute module, line)`` of every import in one file, at any depth."""
    module = _module_name(root, path)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_resolve(module, is_package, node.level, node.module), node.lineno))
        elif isinstance(node, ast.Call):
            target = _dynamic_target(node)
            if target and target.startswith("."):  # import_module(".x", __name__): relative to the package
                level = len(target) - len(target.lstrip("."))
                out.append((_resolve(module, is_package, level, target.lstrip(".") or None), node.lineno))
            elif target:
                out.append((target, node.lineno))
    return out


def package_edges(root: Path = REPO) -> dict[tuple[str, str], list[str]]:
    """``{(from package, to package): ["file:line", ...]}`` between the five packages."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            for target, line in imports_of(path, root):
                top = target.split(".")[0]
                if top in PACKAGES and top != pkg:
                    edges[(pkg, top)].append(f"{path.relative_to(root)}:{line}")
    return dict(edges)


def upward_imports(root: Path = REPO) -> list[str]:
    """One line per forbidden import: ``file:line: pkg imports other``."""
    return [f"{where}: {src} imports {dst}" for (src, dst), wheres in sorted(package_edges(root).items())
            if dst in FORBIDDEN.get(src, ()) for where in wheres]


def package_cycles(root: Path = REPO) -> list[list[str]]:
    """Every elementary circle of the package graph, each as ``[a, b, ..., a]``."""
    graph = defaultdict(set)
    for src, dst in package_edges(root):
        graph[src].add(dst)
    cycles = []

    def walk(start, node, path):
        for nxt in sorted(graph[node]):
            if nxt == start:
                cycles.append(path + [start])
            elif nxt not in path and nxt > start:  # each circle once, from its smallest package
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return cycles


def module_edges(root: Path = REPO) -> dict[str, dict[str, str]]:
    """``{module: {imported module: "file:line"}}`` between modules of the five packages.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module.
    """
    files = {_module_name(root, p): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    edges: dict[str, dict[str, str]] = defaultdict(dict)
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges[name].setdefault(t, f"{path.relative_to(root)}:{node.lineno}")
    return dict(edges)


def module_circles(root: Path = REPO) -> list[list[str]]:
    """Strongly connected groups (>1 module) of the module import graph (Tarjan)."""
    graph = module_edges(root)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_import_circle():
    """No circle of imports between modules (also through imports inside functions)."""
    edges = module_edges()
    bad = module_circles()
    detail = ["{}: {}".format(" <-> ".join(c), "; ".join(
        f"{a} -> {b} at {edges[a][b]}" for a in c for b in c if b in edges.get(a, {}))) for c in bad]
    assert not bad, "module import circles:\n" + "\n".join(detail)


def test_no_package_imports_a_layer_above_it():
    bad = upward_imports()
    assert not bad, "imports pointing up the layers:\n" + "\n".join(bad)


def test_the_package_graph_has_no_circle():
    cycles = package_cycles()
    edges = package_edges()
    detail = ["{}: {}".format(" -> ".join(c), "; ".join(edges[(a, b)][0] for a, b in zip(c, c[1:])))
              for c in cycles]
    assert not cycles, "package import circles (first import of each edge):\n" + "\n".join(detail)


def test_the_application_layer_is_the_only_one_that_imports_every_package():
    """The CLI wires all four packages below it (the graph is not vacuous)."""
    reached = {dst for (src, dst) in package_edges() if src == "chrono_cli"}
    assert reached == {"chrono", "probes", "dashboard", "reference_models"}


def test_the_parser_finds_every_kind_of_import(tmp_path):
    """The reader sees imports at top level, inside functions, relative, and importlib string literals."""
    pkg = tmp_path / "chrono"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "m.py").write_text(
        "import os\n"
        "def f():\n"
        "    import probes.handle\n"
        "    from dashboard import server\n"
        "    from .. import store\n"
        "    from . import sibling\n"
        "    import importlib\n"
        "    importlib.import_module('reference_models.registry')\n"
        "    __import__('chrono_cli')\n"
        "    importlib.import_module('.x', __name__)\n")
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
    found = imports_of(pkg / "sub" / "m.py", tmp_path)
    # ``from .. import store``: the module part (``chrono``) is what the package graph needs
    assert sorted(found) == [("chrono", 5), ("chrono.sub", 6), ("chrono.sub.x", 10),
                             ("chrono_cli", 9), ("dashboard", 4), ("importlib", 7), ("os", 1),
                             ("probes.handle", 3), ("reference_models.registry", 8)]
    bad = upward_imports(tmp_path)
    assert bad == ["chrono/sub/m.py:9: chrono imports chrono_cli", "chrono/sub/m.py:4: chrono imports dashboard",
                   "chrono/sub/m.py:3: chrono imports probes",
                   "chrono/sub/m.py:8: chrono imports reference_models"]
    (tmp_path / "probes" / "a.py").write_text("import chrono\n")
    assert package_cycles(tmp_path) == [["chrono", "probes", "chrono"]]
    (pkg / "store.py").write_text("def f():\n    from chrono.sub import m\n")   # store -> sub.m -> chrono
    (pkg / "sub" / "m.py").write_text("from .. import store\n")
    assert module_circles(tmp_path) == [["chrono.store", "chrono.sub.m"]]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_package_is_read(pkg):
    """Each package exists and has imports the reader parsed (a renamed folder cannot empty the check)."""
    files = list((REPO / pkg).rglob("*.py"))
    assert files and any(imports_of(p) for p in files)


def test_no_benchmark_script_hides_a_package():
    """Benchmark scripts put benchmarks/ first on sys.path; a script named like a package would
    shadow it for everything imported after (it once hid ``dashboard`` from other tests)."""
    clash = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem in PACKAGES)
    assert not clash, f"benchmarks/ scripts named like packages: {clash}"
