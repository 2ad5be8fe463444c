"""Every notebook runs top to bottom (in a copy, in a temporary directory) and is committed with
its outputs, so a reader sees the plots without running it."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_the_six_notebooks_are_there():
    names = [p.stem for p in NOTEBOOKS]
    assert names == [
        "01_merge_and_run",
        "02_plain_conversion",
        "03_tuning",
        "04_serving",
        "05_pruning",
        "06_feature_pyramid",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "run it before committing"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises CellExecutionError naming the failing cell
