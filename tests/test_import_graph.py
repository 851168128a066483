"""The package's modules import each other without a cycle.

The graph is read from the source (AST), not from ``sys.modules``: imports at module level
and inside functions both count, since an import moved into a function to dodge a cycle
still ties the two modules together. Imports under ``if TYPE_CHECKING:`` do not count
(they never run). A module's parent package is not an edge of its own: only an import that
names the package (``from tagrelay.forwarders import FORWARDERS``) ties a module to its
``__init__``.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

import pytest

import tagrelay

PACKAGE_DIR = Path(tagrelay.__file__).parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name (a package by its own)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """The dotted names one module imports: ``import a.b`` gives ``a.b``; ``from a import
    b`` gives ``a.b`` when that is a module, else ``a`` (``b`` is one of its attributes)."""

    def __init__(self, module: str, is_package: bool, modules: Collection[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.names: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = parts[: len(parts) - node.level + 1]
            module = ".".join([*base, *([node.module] if node.module else [])])
        else:
            module = node.module or ""
        for alias in node.names:
            submodule = f"{module}.{alias.name}"
            self.names.add(submodule if submodule in self.modules else module)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        visitor = _Imports(module, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        targets = set()
        for name in visitor.names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (``a -> b -> ... -> a``) per group of modules that import each
    other, directly or through others (a strongly connected component of the graph)."""
    cycles = []
    for group in _components(graph):
        if len(group) < 2:
            continue
        start = min(group)
        # Breadth-first within the group, from ``start`` back to it.
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:
            following = []
            for module in frontier:
                for successor in sorted(graph[module] & group):
                    if successor not in came_from:
                        came_from[successor] = module
                        following.append(successor)
            frontier = following
        cycle = [start]
        while len(cycle) == 1 or cycle[-1] != start:
            cycle.append(came_from[cycle[-1]])
        cycles.append(cycle[::-1])
    return cycles


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for successor in graph[module]:
            if successor not in index:
                visit(successor)
                low[module] = min(low[module], low[successor])
            elif successor in stack:
                low[module] = min(low[module], index[successor])
        if low[module] == index[module]:
            component = set()
            member = ""
            while member != module:
                member = stack.pop()
                component.add(member)
            components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def test_tagrelay_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(PACKAGE_DIR, "tagrelay"))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, source in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"a.py": "from pkg.b import B\n", "b.py": "def f():\n    from pkg import a\n"},
            [["pkg.a", "pkg.b", "pkg.a"]],
            id="through_a_function_level_import",
        ),
        pytest.param(
            {
                "sub/__init__.py": "",
                "sub/a.py": "from ..c import C\n",
                "b.py": "import pkg.sub.a\n",
                "c.py": "from .b import B\n",
            },
            [["pkg.b", "pkg.sub.a", "pkg.c", "pkg.b"]],
            id="through_relative_imports",
        ),
        pytest.param(
            {
                "a.py": "from pkg.b import B\n",
                "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from pkg.a import A\n",
            },
            [],
            id="not_through_type_checking_imports",
        ),
        pytest.param(
            {
                "__init__.py": "from pkg.a import A\n",
                "a.py": "from pkg import b\n",
                "b.py": "from . import c\n",
                "c.py": "",
            },
            [],
            id="not_through_the_parent_package",
        ),
    ],
)
def test_finds_the_cycles_it_should(
    tmp_path: Path, files: dict[str, str], expected: list[list[str]]
) -> None:
    assert find_cycles(import_graph(_package(tmp_path, files), "pkg")) == expected
