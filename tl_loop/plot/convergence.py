"""Convergence figures: per-layer curves over steps, and heat-maps over (step, layer).

* :func:`convergence_curves` -- one line per layer of the cycle, e.g. ``step_distances`` or
  ``distance_to_fixed_point`` over steps (log scale), with an optional tolerance line;
* :func:`step_layer_heatmap` -- any ``[step, layer_in_cycle]`` quantity (distances, norms,
  matrix entropy) as a heat-map.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from tl_loop.plot._layout import check_2d, color, finish


def convergence_curves(
    distances: torch.Tensor,
    title: str = "Step-to-step distance per layer of the cycle",
    y_title: str = "relative distance to the previous step",
    step_offset: int = 1,
    tol: float | None = None,
    log_y: bool = True,
) -> go.Figure:
    """Lines over steps, one per layer of the cycle. ``distances`` is ``[n, layer_in_cycle]``;
    row ``k`` is drawn at step ``k + step_offset`` (1 for ``step_distances``, whose first row
    compares step 1 with step 0; 0 for distances to a fixed point or the final state).

    >>> import torch
    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> from tl_loop.analysis import step_distances
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=6)
    >>> _, cache = HookedLoopedTransformer(cfg, seed=0).run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> fig = convergence_curves(step_distances(cache), tol=1e-2)
    >>> [t.name for t in fig.data]
    ['layer 0 of the cycle', 'layer 1 of the cycle', 'tolerance 0.01']
    """
    d = check_2d(distances, "distances")
    steps = np.arange(d.shape[0]) + step_offset
    fig = go.Figure()
    for j in range(d.shape[1]):
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=d[:, j],
                mode="lines+markers",
                name=f"layer {j} of the cycle",
                line={"color": color(j)},
                hovertemplate=f"layer {j} of the cycle<br>step %{{x}}<br>{y_title}: %{{y:.3g}}"
                "<extra></extra>",
            )
        )
    if tol is not None:
        fig.add_trace(
            go.Scatter(
                x=[steps[0], steps[-1]] if len(steps) else [],
                y=[tol, tol],
                mode="lines",
                name=f"tolerance {tol:g}",
                line={"color": "grey", "dash": "dash"},
                hovertemplate=f"tolerance {tol:g}<extra></extra>",
            )
        )
    return finish(fig, title, "step", y_title, "layer of the cycle", log_y=log_y)


def step_layer_heatmap(
    values: torch.Tensor,
    title: str,
    colorbar_title: str,
    step_offset: int = 0,
    layer_labels: list[str] | None = None,
) -> go.Figure:
    """A ``[step, layer_in_cycle]`` quantity as a heat-map: steps along x, layers of the cycle
    along y, the value in the colour (hover shows all three).

    >>> import torch
    >>> fig = step_layer_heatmap(torch.rand(5, 3), "Residual norm", "norm")
    >>> fig.layout.xaxis.title.text, fig.data[0].colorbar.title.text
    ('step', 'norm')
    """
    v = check_2d(values, "values")
    labels = layer_labels or [f"layer {j}" for j in range(v.shape[1])]
    steps = np.arange(v.shape[0]) + step_offset
    fig = go.Figure(
        go.Heatmap(
            z=v.T,
            x=steps,
            y=labels,
            colorscale="Viridis",
            colorbar={"title": {"text": colorbar_title}},
            hovertemplate=f"step %{{x}}<br>%{{y}}<br>{colorbar_title}: %{{z:.3g}}<extra></extra>",
        )
    )
    return finish(fig, title, "step", "layer of the cycle")


def residual_stats_figure(stats: Any) -> go.Figure:
    """Two heat-maps side by side from a ``ResidualStreamStats``: residual norm and matrix entropy
    over (step, layer of the cycle).

    >>> import torch
    >>> from tl_loop.analysis import residual_stats
    >>> fig = residual_stats_figure(residual_stats(torch.randn(4, 2, 1, 5, 8)))
    >>> fig.layout.title.text
    'Residual stream over the loop: norm and matrix entropy'
    """
    from plotly.subplots import make_subplots

    norm, entropy = check_2d(stats.norm, "norm"), check_2d(stats.matrix_entropy, "matrix_entropy")
    labels = [f"layer {j}" for j in range(norm.shape[1])]
    steps = np.arange(norm.shape[0])
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("residual norm", "matrix entropy (normalised)"),
        horizontal_spacing=0.15,
    )
    for col, (z, name, x_bar) in enumerate(((norm, "norm", 0.42), (entropy, "matrix entropy", 1.0)), start=1):
        fig.add_trace(
            go.Heatmap(
                z=z.T,
                x=steps,
                y=labels,
                colorscale="Viridis",
                colorbar={"title": {"text": name}, "x": x_bar},
                hovertemplate=f"step %{{x}}<br>%{{y}}<br>{name}: %{{z:.3g}}<extra></extra>",
            ),
            row=1,
            col=col,
        )
    return finish(fig, "Residual stream over the loop: norm and matrix entropy", "step", "layer of the cycle")
