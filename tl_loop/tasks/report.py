"""Evaluating a model on the variable-binding task and writing a training report.

* :func:`answer_logits` -- the logits at the answer slot for every number of steps;
* :func:`accuracy_table` -- held-out accuracy by number of hops x number of inference steps;
* :func:`markdown_table`, :func:`svg_line_plot`, :func:`write_report` -- the report files.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tl_loop.tasks.varbind import VarBindTask


@torch.no_grad()
def answer_logits(model: Any, tokens: torch.Tensor, steps: Sequence[int], batch_size: int = 512) -> dict[int, torch.Tensor]:
    """``{n_steps: logits [batch, d_vocab]}`` at the last position, for every ``n_steps`` in
    ``steps``. Looped models are run once at ``max(steps)`` and read out after every step
    (``model.step_logits``: leaving the loop after step ``r`` is the run with ``r + 1`` steps);
    ``n_steps = 0`` (loop skipped) is run on its own."""
    steps = sorted(set(int(s) for s in steps))
    out: dict[int, list[torch.Tensor]] = {s: [] for s in steps}
    positive = [s for s in steps if s > 0]
    for chunk in tokens.split(batch_size):
        if positive:
            per_step = model.step_logits(chunk, n_steps=max(positive))[:, :, -1]  # [step, batch, vocab]
            for s in positive:
                out[s].append(per_step[s - 1])
        if 0 in out:
            out[0].append(model(chunk, n_steps=0)[:, -1])
    return {s: torch.cat(v) for s, v in out.items()}


@torch.no_grad()
def accuracy_table(
    model: Any,
    task: VarBindTask,
    hops: Sequence[int],
    steps: Sequence[int],
    n: int = 256,
    split: str = "test",
    seed: int = 0,
) -> dict[int, dict[int, float]]:
    """``{hops: {n_steps: accuracy}}`` on ``n`` fixed held-out problems per hop count. A
    prediction is the argmax over the whole vocabulary at the answer slot."""
    table: dict[int, dict[int, float]] = {}
    for h in hops:
        problems = task.dataset(h, n, split=split, seed=seed)  # type: ignore[arg-type]
        tokens, answers = task.encode(problems)
        logits = answer_logits(model, tokens.to(model.W_E.device), steps)
        table[h] = {s: float((lg.argmax(-1).cpu() == answers).float().mean()) for s, lg in logits.items()}
    return table


def markdown_table(table: dict[int, dict[int, float]], row_label: str = "hops", col_label: str = "steps",
                   marks: dict[int, str] | None = None) -> str:
    """A markdown table of a ``{row: {col: value}}`` accuracy table (values in percent)."""
    cols = sorted({c for row in table.values() for c in row})
    head = f"| {row_label} \\ {col_label} | " + " | ".join(str(c) for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in sorted(table):
        label = f"{r}{(marks or {}).get(r, '')}"
        cells = [f"{100 * table[r][c]:.1f}" if c in table[r] else "" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table_csv(path: Path, table: dict[int, dict[int, float]], model_name: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "hops", "n_steps", "accuracy"])
        for h in sorted(table):
            for s in sorted(table[h]):
                w.writerow([model_name, h, s, f"{table[h][s]:.4f}"])


def ema(values: Sequence[float], beta: float = 0.98) -> list[float]:
    out, avg = [], None
    for i, v in enumerate(values):
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
        del i
    return out


def svg_line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    x_label: str,
    y_label: str,
    log_y: bool = False,
    width: int = 720,
    height: int = 400,
) -> str:
    """A dependency-free SVG line plot: ``series`` maps a legend label to ``(x, y)``."""
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    left, right, top, bottom = 70, 20, 40, 50
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [y for _, yv in series.values() for y in yv if not (log_y and y <= 0)]
    if not xs or not ys:
        raise ValueError("svg_line_plot: nothing to plot")
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(xs), max(xs)
    y0, y1 = fy(min(ys)), fy(max(ys))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (fy(y) - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">{html.escape(x_label)}</text>',
        f'<text x="15" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 15 {top + ph / 2})">'
        f"{html.escape(y_label)}</text>",
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>',
    ]
    for k in range(6):  # ticks
        xv = x0 + (x1 - x0) * k / 5
        parts.append(f'<text x="{px(xv):.1f}" y="{top + ph + 16}" text-anchor="middle">{xv:.0f}</text>')
        yv = y0 + (y1 - y0) * k / 5
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        ypos = top + (1 - k / 5) * ph
        parts.append(f'<text x="{left - 6}" y="{ypos + 4:.1f}" text-anchor="end">{label}</text>')
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{ypos:.1f}" y2="{ypos:.1f}" stroke="#eee"/>')
    for i, (label, (xv, yv)) in enumerate(series.items()):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xv, yv) if not (log_y and y <= 0))
        color = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
        ly = top + 16 + 16 * i
        parts.append(f'<line x1="{left + pw - 170}" x2="{left + pw - 150}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{left + pw - 145}" y="{ly}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
