"""The README's Python examples run as written (blocks that need a download are skipped)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_DOWNLOAD = ("from_pretrained(", "pip install")
#: Optional packages a block may import; without them the block is skipped (sae-lens needs TransformerLens 3.x).
OPTIONAL = ("sae_lens", "nnsight")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
    missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    blocks = [
        b for b in python_blocks()
        if not any(marker in b for marker in NEEDS_DOWNLOAD) and not any(f"from {m}" in b or f"import {m}" in b for m in missing)
    ]
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
