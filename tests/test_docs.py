"""The documentation runs: every ```python block of README.md and docs/*.md is executed, file by
file in one namespace, in a temporary directory; generated pages are current."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- not run: (?P<why>[^>]*) -->\s*)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path):
    return [(m.group("code"), m.group("why")) for m in BLOCK.finditer(page.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    found = blocks(page)
    runnable = [code for code, why in found if why is None]
    if not runnable:
        pytest.skip(f"{page.name} has no runnable python block")
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(runnable):
        try:
            exec(compile(code, f"{page.name}[python block {i + 1}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}, python block {i + 1} failed: {e!r}\n{code}") from e


def test_skipped_blocks_say_why():
    for page in PAGES:
        for _, why in blocks(page):
            assert why is None or why.strip(), page.name


def test_cli_reference_is_current():
    from keras_dmr.cli_reference import render

    assert (ROOT / "docs" / "cli.md").read_text() == render()
