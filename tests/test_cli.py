"""The command line: ``tl-loop info`` and ``tl-loop report``.

Mistakes are checked the way a user meets them: ``python -m tl_loop`` in a subprocess, asserting
the exit status, exactly one line on stderr and no traceback. Those caught after a model is
loaded run one subprocess end to end and the rest through ``main()`` in this process (the same
code after interpreter start-up, without importing torch again per case). How fast ``--help``
answers is measured by ``benchmarks/cli_startup.py``, not here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tl_loop.cli import COMMANDS, main

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tl_loop", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=ENV, timeout=600)


class Ran:
    """``main(args)`` run in this process, shaped like a ``CompletedProcess``."""

    def __init__(self, capsys, *args: str) -> None:
        self.returncode = main(list(args))
        captured = capsys.readouterr()
        self.stdout, self.stderr = captured.out, captured.err


def assert_one_line_error(result, *needles: str, code: int = 2) -> str:
    err = result.stderr
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------ help
@pytest.mark.parametrize("command", [[], *[[c.name] for c in COMMANDS]])
def test_help_is_plain_text_with_defaults(command):
    result = cli(*command, "--help")
    assert result.returncode == 0 and not result.stderr
    out = " ".join(result.stdout.split())  # help text wraps at the terminal width
    assert "``" not in out and ":func:" not in out  # no Sphinx markup
    if command == ["report"]:
        for option in ("MODEL", "--steps", "--force", "--prompt", "--tokens", "--out", "--no-progress", "--debug"):
            assert option in out
        assert "(default: tl-loop/varbind-looped)" in out and "(default: report.html)" in out
    if command == ["info"]:
        assert "MODEL" in out and "--steps" in out and "--force" in out


def test_help_does_not_import_torch():
    code = "import sys; from tl_loop.cli import main\ntry: main(['report', '--help'])\nexcept SystemExit: pass\n" \
           "print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert result.stdout.strip().splitlines()[-1] == "False False"


# ------------------------------------------------------------------ mistakes caught before any work
@pytest.mark.parametrize("args, needles", [
    (["report", "--tokens", "abc"], ["--tokens", "'abc' is not a token id"]),
    (["report", "--tokens", "1,a"], ["'a' is not a token id"]),
    (["report", "--tokens", ","], ["no token ids"]),
    (["report", "--steps", "-1"], ["--steps", "not >= 0"]),
    (["report", "--steps", "two"], ["--steps", "'two' is not a whole number"]),
    (["report", "--prompt", ""], ["--prompt", "empty"]),
    (["report", "--prompt", "a", "--tokens", "1"], ["not allowed with"]),
    (["report", "--out", "no/such/folder/report.html"], ["folder no/such/folder does not exist"]),
    (["report", "--out", "tests"], ["--out tests is a folder"]),
    (["report", "./no-such-checkpoint"], ["checkpoint folder ./no-such-checkpoint does not exist"]),
    (["info", "no/such/checkpoint"], ["does not exist"]),
    (["info", "tl-loop/no-such-model"], ["no shipped model"]),
    (["info", "README.md"], ["is a file"]),
    (["frobnicate"], ["invalid choice"]),
    ([], ["required"]),
])
def test_mistakes_are_one_line_before_loading(args, needles):
    assert_one_line_error(cli(*args), *needles)


def test_debug_shows_the_traceback():
    result = cli("report", "--out", "no/such/folder/report.html", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "UsageError" in result.stderr


# ------------------------------------------------------------------ mistakes found after loading
def test_too_many_steps_names_force():
    assert_one_line_error(cli("info", "tl-loop/varbind-looped", "--steps", "100000"), "max_steps=512", "--force")


def test_malformed_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "raven_tiny", bad)
    config = json.loads((bad / "config.json").read_text())
    config["n_heads"] = 5  # 64 is not divisible by 5
    (bad / "config.json").write_text(json.dumps(config))
    assert_one_line_error(Ran(capsys, "info", str(bad)), "config.json")
    (bad / "config.json").write_text("{not json")
    assert_one_line_error(Ran(capsys, "info", str(bad)), "not valid JSON")


def test_token_ids_out_of_range_and_no_tokenizer(tmp_path, capsys):
    out = str(tmp_path / "r.html")
    assert_one_line_error(Ran(capsys, "report", str(FIXTURES / "ouro_tiny"), "--tokens", "1,99999", "--out", out),
                          "token ids must lie in")
    assert_one_line_error(Ran(capsys, "report", str(FIXTURES / "ouro_tiny"), "--prompt", "hi", "--out", out),
                          "no tokenizer", "--tokens")
    assert not Path(out).exists()


def test_a_prompt_longer_than_the_context_is_refused(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert_one_line_error(Ran(capsys, "report", "--prompt", "a=1;" * 20 + "?a", "--out", str(out)), "n_ctx")
    assert not out.exists()


def test_unknown_characters_are_named_and_counted(tmp_path, capsys):
    out = tmp_path / "r.html"
    result = Ran(capsys, "report", "--prompt", "a=1;b=a;?bXYZ", "--steps", "1", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "3 of" in warning[0] and "'X' 'Y' 'Z'" in warning[0], result.stderr
    assert "unknown token" in out.read_text()


# ------------------------------------------------------------------ what works
def test_info_prints_layout_and_depth(capsys):
    assert main(["info", str(FIXTURES / "raven_tiny"), "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "prelude 1 | core 2 x 6 steps | coda 1" in out
    assert "effective depth: 14" in out
    assert "loops.{r}.hook_injected" in out and "blocks.{i}.hook_resid_pre" in out
    assert max(len(line) for line in out.splitlines()) <= 100  # hook lists wrapped


def test_report_writes_self_contained_html(tmp_path):
    out = tmp_path / "report.html"
    code = main(["report", str(FIXTURES / "ouro_tiny"), "--tokens", "1,2,3,4,5", "--steps", "3",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    page = out.read_text()
    for section in ("Fixed-point convergence", "Attention stabilisation", "Stages of inference",
                    "Limiting behaviour", "Prediction after each step", "How to read this report"):
        assert section in page
    assert page.count("plotly.js v") == 1  # plotly.js embedded once, inline
    assert 'src="http' not in page  # nothing fetched from the network


def test_force_allows_more_steps_than_max_steps(capsys):
    assert main(["info", "tl-loop/varbind-looped", "--steps", "600", "--force"]) == 0
    assert "core 1 x 600 steps" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    result = cli("--help")
    assert result.returncode == 0 and "report" in result.stdout


def test_report_on_the_embedded_model_needs_no_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--no-progress"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<html" in page.lower() and "The task" in page and "Patching the recurrent state" in page
