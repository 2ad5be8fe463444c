"""The package's layering, enforced: each part of keras_dmr imports only from parts below it.

Every ``import``/``from ... import`` of the package's modules is read from the source (at module
level and inside functions alike, so a function-level import cannot dodge the rule). Within one
part imports are free; across parts they go strictly downwards, which also rules out cycles
between parts. ``keras_dmr/__init__.py`` is the public facade and may import any part.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "keras_dmr"

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


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT.parent).with_suffix("")
    names = list(relative.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a keras_dmr module in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("keras_dmr")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("keras_dmr"):
                continue
            if target == "keras_dmr":  # from keras_dmr import layers, convert, ...
                found += [(node.lineno, f"keras_dmr.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


SOURCES = sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py")


def test_every_part_has_a_rank():
    parts = {part_of(module_name(p)) for p in SOURCES}
    assert parts <= set(RANKS), f"give these parts a rank: {sorted(parts - set(RANKS))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_downwards(path):
    own = part_of(module_name(path))
    wrong = []
    for line, target in imported_modules(path):
        other = part_of(target)
        if other == own:
            continue
        if other not in RANKS or RANKS[other] >= RANKS[own]:
            wrong.append(f"line {line}: {target} ({other or 'keras_dmr'}) from {own}")
    assert not wrong, f"{path.relative_to(ROOT)} imports upwards or sideways: {wrong}"


def test_the_checker_sees_upward_imports(tmp_path):
    """The contract can fail: an upward import written inside a function is reported."""
    fake = ROOT / "layers" / "_contract_probe.py"
    fake_source = "def f():\n    from keras_dmr.convert import to_plain\n    return to_plain\n"
    try:
        fake.write_text(fake_source)
        assert imported_modules(fake) == [(2, "keras_dmr.convert")]
        with pytest.raises(AssertionError, match="imports upwards"):
            test_imports_only_go_downwards(fake)
    finally:
        fake.unlink(missing_ok=True)
