"""The report in a real browser: headless Chromium loads the file; every figure rendered (one
plotly plot with its SVG roots per figure) and the page logged no error. Skipped, with the reason,
where no Chromium is installed; ``.ci/run`` installs the Debian package ``chromium``."""

from __future__ import annotations

import pytest

from browser import CHROMIUM, SKIP_REASON, render
from tl_loop.cli import main

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)


def test_probe_catches_page_errors(tmp_path):  # the check below can fail
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><html><head></head><body><div data-figure='x'></div>"
                    "<script>console.error('bad'); throw new Error('boom');</script></body></html>")
    result = render(page, tmp_path)
    assert any("boom" in e for e in result["errors"]) and any("bad" in e for e in result["errors"])
    assert result["figures"] == [{"name": "x", "svg_roots": 0, "plots": 0}]


def test_every_figure_of_the_report_renders(tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", "--out", str(out), "--no-progress"]) == 0
    n_figures = out.read_text().count("data-figure=")
    assert n_figures >= 11  # 8 analyses + 2 patching maps + generation on the embedded model
    result = render(out, tmp_path)
    assert result["errors"] == []
    assert len(result["figures"]) == n_figures
    for figure in result["figures"]:
        assert figure["plots"] == 1 and figure["svg_roots"] >= 1, figure
