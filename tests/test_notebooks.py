"""The notebooks in notebooks/: built from their sources, and they run top to bottom.

Each notebook is executed with nbclient on a python3 kernel of this interpreter, in a tmp
working directory (its run folders land there), with one torch thread and wandb offline; any
cell error fails the test with the cell and its traceback. Together they take about a minute
on a 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

NOTEBOOKS = REPO / "notebooks"
EXPECTED = ["outside_site", "quickstart", "results_tables"]
CELL_TIMEOUT_S = 180


def _builder():
    spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_is_built_from_its_source() -> None:
    build = _builder()
    sources = sorted(build.SOURCES.glob("*.py"))
    assert [s.stem for s in sources] == EXPECTED
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED
    for source in sources:
        notebook = NOTEBOOKS / f"{source.stem}.ipynb"
        assert notebook.read_text() == build.render(source), (
            f"{notebook} differs from {source}: run {sys.executable} notebooks/build.py")


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_has_no_outputs(name: str) -> None:
    cells = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits this environment
    monkeypatch.setenv("WANDB_MODE", "offline")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    assert (tmp_path / "runs").is_dir(), "the notebook wrote no run folder into its directory"
