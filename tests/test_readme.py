"""The README's Python examples run as written (blocks that need a download are skipped)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_DOWNLOAD = ("from_pretrained(", "pip install")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
    blocks = [b for b in python_blocks() if not any(marker in b for marker in NEEDS_DOWNLOAD)]
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README


def test_quickstart_prints_when_run_as_a_script(capsys):
    exec(compile(python_blocks()[0], str(README), "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "10" and out[1].startswith("EffectiveLayer(index=5")


def test_install_block_starts_from_a_fresh_machine():
    text = README.read_text()
    install = text[text.index("## Install"):text.index("## Quickstart")]
    for step in ("git clone", "cd tl-loop", "python3 -m venv", 'pip install -e ".[dev]"',
                 "tl-loop report --out report.html", "python -m pytest -q"):
        assert step in install, step
    assert "one session" in text[text.index("## Quickstart"):]  # the blocks say they continue


def test_family_names_are_those_of_the_families_table():
    import json

    from tl_loop.pretrained import PRETRAINED_DIR

    text = README.read_text()
    table = text[text.index("## Supported families"):text.index("## Hook names")]
    families = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M))
    for config in PRETRAINED_DIR.glob("*/config.json"):
        assert json.loads(config.read_text())["tl_loop_config"]["family"] in families


def test_report_outputs_are_ignored_by_git():
    import subprocess

    root = README.parent
    result = subprocess.run(["git", "check-ignore", "-q", "report.html", "sub/report.html"], cwd=root)
    if result.returncode == 128:  # not a git checkout (e.g. an sdist)
        return
    assert result.returncode == 0


def test_every_imported_package_is_declared():
    import ast
    import sys
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ ;\[]", d)[0].lower().replace("-", "_") for d in project["dependencies"]}
    imported = set()
    for path in (README.parent / "tl_loop").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "tl_loop"}
    assert third_party - declared == set()
