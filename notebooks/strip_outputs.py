"""Strip outputs and execution counts from the notebooks (they are kept output-free in git).

    python notebooks/strip_outputs.py            # strip every notebooks/*.ipynb in place
    python notebooks/strip_outputs.py --check    # exit 1 and list the notebooks that hold outputs

Needs only ``nbformat`` (a dev dependency).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def notebooks() -> list[Path]:
    return sorted(HERE.glob("*.ipynb"))


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """What a notebook holds that an output-free notebook must not: outputs, execution counts,
    per-cell execution metadata, widget state."""
    found = []
    for k, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            found.append(f"cell {k}: {len(cell.outputs)} output(s)")
        if cell.get("execution_count") is not None:
            found.append(f"cell {k}: execution_count {cell.execution_count}")
        if "execution" in cell.get("metadata", {}):
            found.append(f"cell {k}: execution metadata")
    if "widgets" in nb.metadata:
        found.append("notebook metadata: widget state")
    return found


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    dirty = 0
    for path in notebooks():
        nb = nbformat.read(path, as_version=4)
        found = problems(nb)
        if not found:
            continue
        dirty += 1
        if check:
            print(f"{path.name}: " + "; ".join(found))
        else:
            nbformat.write(strip(nb), path)
            print(f"stripped {path.name}")
    return 1 if check and dirty else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
