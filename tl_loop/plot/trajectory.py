"""Trajectory figures: a token's path through the loop in PCA space, and the cycle distances.

* :func:`pca_trajectory_figure` -- 2-D or 3-D (from the number of components of the
  ``PCAProjection``): the path in execution order (grey line) and one marker series per layer of
  the cycle, so a cyclic fixed point shows as ``L`` clusters visited in turn;
* :func:`cycle_distances_figure` -- distance between consecutive layers of the cycle against
  distance across steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from tl_loop.plot._layout import color, finish, to_numpy


def pca_trajectory_figure(
    projection: Any, title: str = "Trajectory of a token through the loop (PCA)"
) -> go.Figure:
    """Plot a ``PCAProjection`` of a trajectory ``[step, layer_in_cycle, k]`` with ``k`` = 2 or 3.

    >>> import torch
    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> from tl_loop.analysis import pca_trajectory, token_trajectory
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=6)
    >>> _, cache = HookedLoopedTransformer(cfg, seed=0).run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> fig = pca_trajectory_figure(pca_trajectory(token_trajectory(cache), n_components=3))
    >>> [t.name for t in fig.data]
    ['path', 'layer 0 of the cycle', 'layer 1 of the cycle']
    """
    coords = to_numpy(projection.coords)
    if coords.ndim != 3 or coords.shape[-1] not in (2, 3):
        raise ValueError(f"expected coords [step, layer_in_cycle, 2 or 3], got shape {tuple(coords.shape)}")
    ratio = to_numpy(projection.explained_variance_ratio)
    n_steps, n_layers, k = coords.shape
    axis = [f"PC{i + 1} ({100 * ratio[i]:.1f}% of variance)" for i in range(k)]
    steps = np.repeat(np.arange(n_steps), n_layers)
    layers = np.tile(np.arange(n_layers), n_steps)
    path = coords.reshape(-1, k)
    custom = np.stack([steps, layers], -1)
    hover = "step %{customdata[0]}, layer %{customdata[1]} of the cycle<extra></extra>"
    scatter = go.Scatter3d if k == 3 else go.Scatter

    def xyz(a: np.ndarray) -> dict:
        return dict(x=a[:, 0], y=a[:, 1], **({"z": a[:, 2]} if k == 3 else {}))

    fig = go.Figure()
    fig.add_trace(
        scatter(
            **xyz(path),
            mode="lines",
            name="path",
            line={"color": "lightgrey"},
            customdata=custom,
            hovertemplate=hover,
        )
    )
    for j in range(n_layers):
        pts = coords[:, j]
        fig.add_trace(
            scatter(
                **xyz(pts),
                mode="markers",
                name=f"layer {j} of the cycle",
                marker={"color": color(j), "size": (5 if k == 3 else 8), "opacity": 0.9},
                customdata=np.stack([np.arange(n_steps), np.full(n_steps, j)], -1),
                hovertemplate=hover,
            )
        )
    fig.update_layout(legend_title_text="layer of the cycle", showlegend=True)
    if k == 3:  # short axis titles, small tick labels and room around the cube: nothing overlaps
        short = [f"PC{i + 1} ({100 * ratio[i]:.0f}%)" for i in range(k)]
        small = {"tickfont": {"size": 9}, "title_font": {"size": 12}}
        fig.update_layout(
            scene={"xaxis": {"title": {"text": short[0]}, **small}, "yaxis": {"title": {"text": short[1]}, **small},
                   "zaxis": {"title": {"text": short[2]}, **small}, "aspectmode": "cube",
                   "camera": {"eye": {"x": 1.6, "y": 1.6, "z": 1.0}}},
            height=600, margin={"l": 10, "r": 10, "t": 60, "b": 10},
        )
        return finish(fig, title + " (axes: % of variance)", legend_title="layer of the cycle")
    return finish(fig, title, axis[0], axis[1], "layer of the cycle")


def cycle_distances_figure(
    distances: Any,
    title: str = "Cycle or single point? Distances within and across steps",
    log_y: bool = True,
) -> go.Figure:
    """Plot a ``CycleDistances``: solid lines, ``d(layer j, layer j+1)`` within a step; dashed
    lines, ``d(layer j at step r, at step r-1)``. At a cycle of distinct fixed points the dashed
    lines fall to 0 while the solid ones stay up. A one-layer block has no distance within a step
    (the layer is compared with itself): only the dashed line is drawn.

    >>> import torch
    >>> from tl_loop.analysis import cycle_distances
    >>> fig = cycle_distances_figure(cycle_distances(torch.randn(5, 2, 1, 3, 8)))
    >>> len(fig.data), fig.layout.yaxis.title.text
    (4, 'relative distance')
    """
    between, across = to_numpy(distances.between_layers), to_numpy(distances.across_steps)
    n_steps, n_layers = between.shape[:2]
    fig = go.Figure()
    for j in range(n_layers):
        nxt = (j + 1) % n_layers
        if n_layers > 1:
            fig.add_trace(
                go.Scatter(
                    x=np.arange(n_steps),
                    y=between[:, j],
                    mode="lines+markers",
                    name=f"layer {j} → layer {nxt} (same step)",
                    line={"color": color(j)},
                    hovertemplate=f"layer {j} → {nxt}<br>step %{{x}}<br>distance %{{y:.3g}}<extra></extra>",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, n_steps),
                y=across[:, j],
                mode="lines+markers",
                name=f"layer {j}: step r-1 → r",
                line={"color": color(j), "dash": "dash"},
                hovertemplate=f"layer {j}, step %{{x}} vs previous<br>distance %{{y:.3g}}<extra></extra>",
            )
        )
    return finish(fig, title, "step", "relative distance", "distance", log_y=log_y)
