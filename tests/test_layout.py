"""The package's layers, as docs/architecture.md draws them: each folder imports only the folders below it (the
strategy the planner, the capture and the engine; the planner and the capture the engine), and no two modules import
each other, directly or round a longer loop (imports inside functions and type-only ones count: two files that know
each other sit at the wrong seam)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_pipe"
LAYERS = {"engine": 0, "capture": 1, "planner": 1, "strategy": 2}  # a module may import its own layer and lower ones


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every module name an import statement of ``path`` names (a relative one resolved; ``from a import b``: the
    module ``a.b`` where ``modules`` has it, else ``a``)."""
    here = _name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*kept, base] if base else kept)
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def _graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (a name resolved to the module holding it)."""
    paths = {_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        found = set()
        for name in _imported(path, frozenset(paths)):
            while name and name not in paths:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
        graph[module] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One loop of imports in ``graph``, if there is one (a depth-first walk keeping the path it is on)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        while stack:
            following = next(stack[-1], None)
            if following is None:
                done.add(path.pop())
                stack.pop()
            elif following in path:
                return [*path[path.index(following):], following]
            elif following not in done:
                path.append(following)
                stack.append(iter(sorted(graph.get(following, ()))))
    return None


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    graph = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, names in _graph().items():
        layer = module.split(".")[1] if module.count(".") else None
        for name in names:
            other = name.split(".")[1] if name.count(".") else None
            if layer in LAYERS and other in LAYERS and LAYERS[other] > LAYERS[layer]:
                wrong.append(f"{module} imports {name}")
    assert not wrong, wrong


def test_a_loop_is_found() -> None:
    """The walk finds a loop three modules round, and none in a chain."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
