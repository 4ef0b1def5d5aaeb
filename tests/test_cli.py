"""The command line: ``tl-loop info`` and ``tl-loop report``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tl_loop.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def test_info_prints_layout_and_depth(capsys):
    assert main(["info", str(FIXTURES / "raven_tiny"), "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "prelude 1 | core 2 x 6 steps | coda 1" in out
    assert "effective depth: 14" in out
    assert "loops.{r}.hook_injected" in out and "blocks.{i}.hook_resid_pre" in out


def test_report_writes_self_contained_html(tmp_path):
    out = tmp_path / "report.html"
    code = main(["report", str(FIXTURES / "ouro_tiny"), "--tokens", "1,2,3,4,5", "--steps", "3",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    page = out.read_text()
    for section in ("Fixed-point convergence", "Attention stabilisation", "Stages of inference",
                    "Limiting behaviour", "Prediction after each step"):
        assert section in page
    assert page.count("plotly.js v") == 1  # plotly.js embedded once, inline
    assert 'src="http' not in page  # nothing fetched from the network


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "tl_loop", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "report" in result.stdout


def test_report_on_the_embedded_model_needs_no_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--no-progress", "--steps", "4"]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "<html" in html.lower() and "plotly" in html.lower()
