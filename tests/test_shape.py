"""The code's shape, guarded: no import cycles inside ``embray``, no module importing another module's private
names, no function in ``embray/`` over 100 lines. Static (the AST only): nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 100


def modules(pkg: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``pkg`` (a package is its ``__init__``)."""
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        parts = list(f.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _absolute(module: str, file: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """The import graph between first-party modules, and every import of a private name from another module."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods and a.name != m}
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(m, f, node)
                if target.split(".")[0] not in {n.split(".")[0] for n in mods}:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    t = sub if sub in mods else target
                    if t in mods and t != m:
                        graph[m].add(t)
                    if a.name.startswith("_") and not a.name.startswith("__") and t != m:
                        private.append(f"{m} imports {target}.{a.name}")
    for m, f in mods.items():  # a package re-exporting its own children is not a cycle of design
        if f.name == "__init__.py":
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def long_functions(mods: dict[str, Path], limit: int = MAX_LINES) -> list[str]:
    out = []
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{m}.{node.name} ({f.name}:{node.lineno}): {n} lines")
    return out


@pytest.fixture(scope="module")
def embray_modules() -> dict[str, Path]:
    return modules(ROOT / "embray")


def test_embray_has_no_import_cycles(embray_modules):
    graph, _ = imports(embray_modules)
    assert cycles(graph) == [], "import cycles: break them by moving the shared piece down a layer"


def test_no_module_imports_another_modules_private_names(embray_modules):
    _, private = imports(embray_modules)
    assert private == [], "make the name public (no leading underscore) or keep its use inside its module"


def test_no_function_in_embray_is_over_100_lines(embray_modules):
    assert long_functions(embray_modules) == [], f"split functions over {MAX_LINES} lines"


def test_the_checks_catch_what_they_guard(tmp_path):
    """The guard itself: a cycle, a private import and a long function in a throwaway package are each found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import c\n")  # re-export: not a cycle
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("from pkg import a\nthing = 1\n")
    (pkg / "sub" / "c.py").write_text("from ..a import _hidden\n")
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (pkg / "sub" / "d.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    mods = modules(pkg)
    graph, private = imports(mods)
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert private == ["pkg.sub.c imports pkg.a._hidden"]
    assert [x.split(" ")[0] for x in long_functions(mods)] == ["pkg.sub.d.long"]
