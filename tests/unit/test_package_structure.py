"""The package's shape: the library never reaches up into the services or the jobs, its modules
import each other one way only, and no function or module grows past what a reader can hold.

Imports are read from the source (``ast``), function-level imports included: an import inside a
function is still a dependency, it only runs later.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

UPWARD = ("services", "jobs")  # top-level packages the library must never import
MAX_FUNCTION_LINES = 80  # body lines, docstring aside
MAX_MODULE_LINES = 500


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (``root`` is on sys.path)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb from this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module -> the package modules it imports, [(module, upward import)])."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    upward = []
    for name, path in modules.items():
        for target in imported_names(name, path):
            if target.split(".")[0] in UPWARD:
                upward.append((name, target))
            # `from a.b import c`: c may be a module or a name in a.b; an import of a.b.c also runs a.b
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(f"{target}."):
                graph[name].add(target)
    return graph, upward


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def long_functions(path: Path, limit: int) -> list[str]:
    """``file:line name (N lines)`` for every function whose body, docstring aside, passes ``limit``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str)
        first = body[1] if has_doc and len(body) > 1 else body[0]
        lines = node.end_lineno - first.lineno + 1
        if lines > limit:
            out.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_the_library_imports_neither_services_nor_jobs():
    _, upward = import_graph(REPO_ROOT / "library")
    assert upward == [], f"the library imports the services or the jobs: {upward}"


def test_the_package_has_no_import_cycles():
    graph, _ = import_graph(REPO_ROOT / "library")
    assert "whetstone.train.contrastive_worker" in graph  # the graph covers the package
    assert cycles(graph) == []


def test_functions_and_modules_stay_readable():
    paths = [p for folder in ("library", "services", "jobs") for p in (REPO_ROOT / folder).rglob("*.py")]
    assert len(paths) > 40
    too_long = [line for p in paths for line in long_functions(p, MAX_FUNCTION_LINES)]
    assert too_long == [], f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"
    big = [f"{p} ({n} lines)" for p in paths if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert big == [], f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_the_checks_catch_a_cycle_an_upward_import_and_a_long_function(tmp_path):
    """The checks above on a made-up package that breaks every rule: they must report each break."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import c\n")  # function-level import counts
    (pkg / "c.py").write_text("from . import a\nimport services.index.app\n")
    (pkg / "d.py").write_text("def long():\n    '''doc'''\n" + "    x = 1\n" * 81)
    graph, upward = import_graph(tmp_path)
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert upward == [("pkg.c", "services.index.app")]
    assert [line.rsplit(" ", 3)[-3:] for line in long_functions(pkg / "d.py", 80)] == [["long", "(81", "lines)"]]
    assert long_functions(pkg / "d.py", 81) == []
