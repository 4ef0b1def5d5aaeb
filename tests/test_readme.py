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
