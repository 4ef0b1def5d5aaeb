"""Patching figures: a ``[row, pos]`` map of restored metric (``tl_loop.patching`` sweeps,
``transformer_lens.patching`` results), diverging around 0."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from tl_loop.plot._layout import finish, to_numpy


def patching_heatmap(
    values: Any,
    x_labels: list[str],
    y_labels: list[str],
    title: str,
    y_title: str = "effective layer",
    x_title: str = "position:token (* = on the mechanism)",
    colorbar_title: str = "restored",
) -> go.Figure:
    """A ``[row, pos]`` patching result as a red-blue heat-map centred on 0 (rows top to bottom in
    execution order); hover shows row, position and value.

    >>> import torch
    >>> fig = patching_heatmap(torch.tensor([[0.0, 1.0], [0.5, -0.2]]), ["0:a", "1:b *"], ["L0", "L1"], "Patching")
    >>> fig.data[0].zmid, fig.layout.yaxis.autorange, fig.layout.xaxis.title.text
    (0, 'reversed', 'position:token (* = on the mechanism)')
    """
    v = to_numpy(values)
    if v.ndim != 2 or v.shape != (len(y_labels), len(x_labels)):
        raise ValueError(f"values must be [{len(y_labels)} rows, {len(x_labels)} positions], got {tuple(v.shape)}")
    fig = go.Figure(
        go.Heatmap(
            z=v,
            x=x_labels,
            y=y_labels,
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": {"text": colorbar_title}},
            hovertemplate=f"%{{y}}<br>position %{{x}}<br>{colorbar_title}: %{{z:.3f}}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45)
    return finish(fig, title, x_title, y_title)
