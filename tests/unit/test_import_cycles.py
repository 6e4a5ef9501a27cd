"""Dependencies inside pdserve/ point one way: no import cycles, and no layer imports one above it.

Every import statement counts, at module level or inside a function (an import moved into a function
hides a cycle, it does not remove it); only those under `if TYPE_CHECKING:` are left out, since they
never run. `import a.b` and `from a import b` (b a module) are edges to a.b; the package __init__
files that Python runs on the way are not edges of their own (they import nothing at module level).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "pdserve"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import under `node`, skipping the bodies of `if TYPE_CHECKING:` (not their else)."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        else:
            yield from _import_nodes(child)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a pdserve module (`a.b.C` -> `a.b`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The pdserve modules that module `name` imports, anywhere in its body."""
    path = modules[name]
    tree = ast.parse(path.read_text(), str(path))
    targets: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        source = _absolute(node, name, path.name == "__init__.py")
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            targets.add(submodule if submodule in modules else source)
    return {known for t in targets if (known := _known(t, modules)) is not None}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, modules) for name in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "\n    ".join([" <-> ".join(component), *edges])


def test_the_walker_sees_function_level_imports_and_skips_type_checking() -> None:
    graph = import_graph()
    assert "pdserve.engine.llm" in graph["pdserve"]  # inside __getattr__
    assert "pdserve.kernels.config" in graph["pdserve.config"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n  " + "\n  ".join(_describe(c, graph) for c in found)


def _importers_of(prefix: str, graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {
        name: {t for t in targets if t == prefix or t.startswith(prefix + ".")}
        for name, targets in graph.items()
    }


def test_layers_and_disagg_do_not_import_the_engine() -> None:
    graph = import_graph()
    bad = {
        name: sorted(targets)
        for name, targets in _importers_of("pdserve.engine", graph).items()
        if targets and name.startswith(("pdserve.layers", "pdserve.disagg"))
    }
    assert not bad, f"layers/ and disagg/ import engine/: {bad}"


def test_nothing_imports_the_cli() -> None:
    """pdserve.cli sits on top: it imports the subcommands, none of them imports it back."""
    graph = import_graph()
    bad = sorted(name for name, targets in graph.items() if "pdserve.cli" in targets)
    assert not bad, f"modules importing pdserve.cli: {bad}"
