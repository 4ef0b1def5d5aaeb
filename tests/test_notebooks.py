"""The notebooks in notebooks/ run top to bottom (offline, on the shipped models) and are kept
output-free in git.

Each notebook is executed in a fresh ``python3`` kernel by ``nbclient`` (a dev dependency, as are
``nbformat`` and ``ipykernel``: a missing one fails here, it is not skipped). The kernel runs with
``cwd = notebooks/`` and one intra-op thread, as the models are tiny. Deselect locally with
``-m 'not slow'``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = [
    "01_quickstart.ipynb",
    "02_activation_patching.ipynb",
    "03_fixed_points.ipynb",
    "04_stages_of_inference.ipynb",
    "05_head_attribution.ipynb",
    "06_generation.ipynb",
]
CELL_TIMEOUT_S = 300
#: The kernel inherits the environment; these keep torch (and BLAS) to one thread.
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _strip_outputs():
    spec = importlib.util.spec_from_file_location("strip_outputs", NOTEBOOKS / "strip_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebooks_are_stripped(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    found = _strip_outputs().problems(nb)
    assert not found, f"{name} holds outputs ({'; '.join(found)}): run `python notebooks/strip_outputs.py`"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'MODEL = "tl-loop/varbind-looped"' in code  # runs offline on the shipped model
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "released checkpoint" in markdown  # and says how to use a real one


def test_strip_helper_strips():
    helper = _strip_outputs()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1")
    cell.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)]
    cell.execution_count = 1
    nb.cells.append(cell)
    assert helper.problems(nb)
    assert not helper.problems(helper.strip(nb))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    client.execute(env={**os.environ, **KERNEL_ENV})  # raises CellExecutionError on any cell error
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    print(f"{name}: {elapsed:.1f} s")
