"""The package's layering, enforced: each part of keras_dmr imports only from parts below it.

Every ``import``/``from ... import`` of the package's modules is read from the source (at module
level and inside functions alike, so a function-level import cannot dodge the rule). Across parts
imports go strictly downwards, which rules out cycles between parts; within a part, and among the
scripts of ``tools/``, no two modules may import each other, directly or through others.
``keras_dmr/__init__.py`` and each part's ``__init__.py`` are facades and may import their own
modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
ROOT = REPO / "keras_dmr"

# Lowest first; a part may import the parts of lower rank (and itself), never higher or equal.
RANKS = {
    "errors": 0,
    "version": 0,
    "utils": 1,
    "rm": 2,
    "layers": 3,
    "recipe": 4,
    "data": 4,
    "models": 5,
    "training": 5,
    "analysis": 6,
    "convert": 7,
    "prune": 8,
    "export": 9,
    "tuning": 9,
    "bench": 10,
    "cli": 11,
}


def part_of(module: str) -> str:
    """``keras_dmr.layers.blocks`` → ``layers``; ``keras_dmr`` itself → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, root: Path = REPO) -> str:
    relative = path.relative_to(root).with_suffix("")
    names = list(relative.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imported_modules(
    path: Path, here: str | None = None, prefixes=("keras_dmr",)
) -> list[tuple[int, str]]:
    """(line, module) for every import of a module under ``prefixes`` in ``path`` (whose module
    name is ``here``, by default read from its place in the repository), relative ones
    resolved; ``from package import name`` counts as an import of ``package.name``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith(prefixes)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(prefixes):
                continue
            if target in prefixes:  # from keras_dmr import layers, convert, ...
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found += [(node.lineno, target)] + [
                    (node.lineno, f"{target}.{a.name}") for a in node.names
                ]
    return found


SOURCES = sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py")


def test_every_part_has_a_rank():
    parts = {part_of(module_name(p)) for p in SOURCES}
    assert parts <= set(RANKS), f"give these parts a rank: {sorted(parts - set(RANKS))}"


def upward_imports(path: Path, here: str | None = None) -> list[str]:
    own = part_of(here or module_name(path))
    wrong = []
    for line, target in imported_modules(path, here):
        other = part_of(target)
        if other == own:
            continue
        if other not in RANKS or RANKS[other] >= RANKS[own]:
            wrong.append(f"line {line}: {target} ({other or 'keras_dmr'}) from {own}")
    return wrong


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_downwards(path):
    wrong = upward_imports(path)
    assert not wrong, f"{path.relative_to(ROOT)} imports upwards or sideways: {wrong}"


def test_the_checker_sees_upward_imports(tmp_path):
    """The contract can fail: an upward import written inside a function is reported."""
    fake = tmp_path / "_contract_probe.py"
    fake.write_text("def f():\n    from keras_dmr.convert import to_plain\n    return to_plain\n")
    here = "keras_dmr.layers._contract_probe"
    assert imported_modules(fake, here) == [
        (2, "keras_dmr.convert"),
        (2, "keras_dmr.convert.to_plain"),
    ]
    assert upward_imports(fake, here) == [
        "line 2: keras_dmr.convert (convert) from layers",
        "line 2: keras_dmr.convert.to_plain (convert) from layers",
    ]


# ------------------------------------------------------------------------------ module cycles
def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules it imports (anywhere in it), among ``modules``. A facade
    ``__init__`` is left out as a target when a module imports a sibling through it."""
    graph = {}
    for name, path in modules.items():
        targets = {t for _, t in imported_modules(path, name, ("keras_dmr", "tools"))}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def repository_modules() -> dict[str, Path]:
    paths = [*ROOT.rglob("*.py"), *(REPO / "tools").glob("*.py")]
    modules = {module_name(p): p for p in paths}
    # A facade imports its part's modules; those importing a sibling through the facade
    # (`from keras_dmr.export import litert`) name the sibling, which the graph resolves.
    return {m: p for m, p in modules.items() if p.name != "__init__.py"}


def test_no_import_cycle_in_the_package_or_tools():
    assert cycles(import_graph(repository_modules())) == []


def test_the_cycle_checker_sees_a_cycle_through_function_level_imports(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from tools import b\n")
    (tmp_path / "b.py").write_text("from tools.c import x\n")
    (tmp_path / "c.py").write_text("def x():\n    import tools.a\n")
    (tmp_path / "d.py").write_text("from tools import a\n")
    modules = {f"tools.{n}": tmp_path / f"{n}.py" for n in "abcd"}
    assert cycles(import_graph(modules)) == [["tools.a", "tools.b", "tools.c"]]
