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
import re
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
    "07_features_across_recurrences.ipynb",
]
#: Notebooks that need an optional package: (module, why it may be missing).
REQUIRES = {
    "07_features_across_recurrences.ipynb": (
        "sae_lens", "sae-lens is not installed (SAELens 6 requires transformer-lens<4: the TL 3.x environment runs it)"
    ),
}
CELL_TIMEOUT_S = 300
PLOTLY_JSON = "application/vnd.plotly.v1+json"
#: notebooks whose figures are also drawn in headless Chromium (2-D only: no WebGL needed)
BROWSER_CHECKED = {"01_quickstart.ipynb", "02_activation_patching.ipynb"}
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
def test_notebook_runs(name, tmp_path):
    if name in REQUIRES and importlib.util.find_spec(REQUIRES[name][0]) is None:
        pytest.skip(REQUIRES[name][1])
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
    check_outputs(name, nb)
    if name in BROWSER_CHECKED:
        check_in_browser(nb, tmp_path)


def check_outputs(name, nb):
    """Figures survive HTML export: each plotly output also holds HTML, plotly.js is embedded
    once and nothing is loaded from the network; Markdown tables are displayed, not printed."""
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    figures = [o for o in outputs if PLOTLY_JSON in o.get("data", {})]
    assert figures, f"{name} shows no plotly figure"
    for o in figures:
        assert "Plotly.newPlot" in o.data.get("text/html", ""), f"{name}: a figure has no HTML representation"
    assert sum("plotly.js v" in h for h in html) == 1, f"{name}: plotly.js must be embedded exactly once"
    assert not any(re.search(r"<script[^>]+src=[\"']https?:", h) for h in html), f"{name}: a script loads from the network"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert not re.search(r"^\|.*\|\n\|[-:| ]+\|$", printed, re.M), f"{name} prints a Markdown table as text"


def check_in_browser(nb, tmp_path):
    """The HTML outputs in page order, as ``nbconvert --to html`` lays them out, drawn by Chromium."""
    from browser import CHROMIUM, render

    if CHROMIUM is None:
        return
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            data = o.get("data", {})
            if "text/html" in data:
                marker = " data-figure='fig'" if PLOTLY_JSON in data else ""
                parts.append(f"<div{marker}>{data['text/html']}</div>")
    page = tmp_path / "notebook.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body>" + "".join(parts)
                    + "</body></html>", encoding="utf-8")
    result = render(page, tmp_path)
    assert result["errors"] == []
    assert result["figures"] and all(f["plots"] == 1 and f["svg_roots"] >= 1 for f in result["figures"]), result
