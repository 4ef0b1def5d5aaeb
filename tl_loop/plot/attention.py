"""Attention figures: head stabilisation heat-maps, step-pair distances, the paper's measures
over steps, and circuitsvis views of one head across steps.

* :func:`head_heatmap` -- any ``[step, layer_in_cycle, head]`` statistic; rows ``L{j}H{h}``;
* :func:`stabilisation_heatmap` -- the step-to-step pattern distance of an ``AttentionStabilisation``;
* :func:`step_pair_heatmap` -- Frobenius distances between a head's patterns at every pair of steps;
* :func:`paper_attention_figure` -- ColSum concentration, mixing score and sink rate over steps;
* :func:`attention_views` -- a circuitsvis ``attention_heads`` view with one panel per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tl_loop.plot._layout import color, finish, to_numpy


def head_heatmap(values: Any, title: str, colorbar_title: str, step_offset: int = 0) -> go.Figure:
    """Heat-map of a ``[step, layer_in_cycle, head]`` statistic: steps along x, heads (``L{j}H{h}``:
    head ``h`` of layer ``j`` of the cycle) along y.

    >>> import torch
    >>> fig = head_heatmap(torch.rand(4, 2, 3), "Sink score", "sink score")
    >>> list(fig.data[0].y[:2]), fig.layout.yaxis.title.text
    (['L0H0', 'L0H1'], 'head (layer of the cycle, head)')
    """
    v = to_numpy(values)
    if v.ndim != 3:
        raise ValueError(f"expected [step, layer_in_cycle, head], got shape {tuple(v.shape)}")
    n_steps, n_layers, n_heads = v.shape
    labels = [f"L{j}H{h}" for j in range(n_layers) for h in range(n_heads)]
    fig = go.Figure(
        go.Heatmap(
            z=v.reshape(n_steps, -1).T,
            x=np.arange(n_steps) + step_offset,
            y=labels,
            colorscale="Viridis",
            colorbar={"title": {"text": colorbar_title}},
            hovertemplate=f"step %{{x}}<br>head %{{y}}<br>{colorbar_title}: %{{z:.3g}}<extra></extra>",
        )
    )
    return finish(fig, title, "step", "head (layer of the cycle, head)")


def stabilisation_heatmap(stats: Any, title: str | None = None) -> go.Figure:
    """Step-to-step distance of every head's pattern (an ``AttentionStabilisation``); the column at
    step ``r`` compares step ``r`` with ``r - 1``.

    >>> import torch
    >>> from tl_loop.analysis import attention_stabilisation
    >>> p = torch.softmax(torch.randn(5, 2, 1, 3, 4, 4), -1)
    >>> stabilisation_heatmap(attention_stabilisation(p)).layout.title.text
    'Attention stabilisation: JS divergence to the previous step'
    """
    name = {"js": "JS divergence", "l1": "L1 distance"}.get(stats.metric, stats.metric)
    return head_heatmap(
        stats.distance, title or f"Attention stabilisation: {name} to the previous step", name, step_offset=1
    )


def step_pair_heatmap(
    distances: Any, title: str = "Frobenius distance between a head's patterns across steps"
) -> go.Figure:
    """``[step, step]`` distances (``attention_frobenius_distances`` of one head) as a heat-map.

    >>> import torch
    >>> from tl_loop.analysis import attention_frobenius_distances
    >>> fig = step_pair_heatmap(attention_frobenius_distances(torch.softmax(torch.randn(4, 3, 3), -1)))
    >>> fig.layout.xaxis.title.text, fig.layout.yaxis.title.text
    ('step s', 'step r')
    """
    d = to_numpy(distances)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"expected a square [step, step] matrix, got shape {tuple(d.shape)}")
    steps = np.arange(d.shape[0])
    fig = go.Figure(
        go.Heatmap(
            z=d,
            x=steps,
            y=steps,
            colorscale="Viridis",
            colorbar={"title": {"text": "||A_r - A_s||_F"}},
            hovertemplate="step r = %{y}, step s = %{x}<br>||A_r - A_s||_F = %{z:.3g}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    return finish(fig, title, "step s", "step r")


def paper_attention_figure(
    stats: Any,
    threshold: float = 0.3,
    title: str = "Attention over the loop: ColSum concentration, mixing, sinks",
) -> go.Figure:
    """Three panels over steps from an ``AttentionStabilisation``: ColSum concentration and mixing
    score (mean over heads, one line per layer of the cycle) and the sink rate (fraction of heads
    with sink score above ``threshold``).

    >>> import torch
    >>> from tl_loop.analysis import attention_stabilisation
    >>> patterns = torch.softmax(torch.randn(5, 2, 1, 3, 4, 4), -1)
    >>> fig = paper_attention_figure(attention_stabilisation(patterns))
    >>> [a.text for a in fig.layout.annotations]
    ['ColSum concentration', 'mixing score (nats)', 'sink rate (score > 0.3)']
    """
    colsum, mixing = to_numpy(stats.colsum).mean(-1), to_numpy(stats.entropy).mean(-1)
    rate = to_numpy(stats.sink_rate(threshold))
    steps = np.arange(colsum.shape[0])
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("ColSum concentration", "mixing score (nats)", f"sink rate (score > {threshold:g})"),
    )
    for j in range(colsum.shape[1]):
        for col, (values, label) in enumerate(
            ((colsum, "ColSum concentration"), (mixing, "mixing score")), start=1
        ):
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=values[:, j],
                    mode="lines+markers",
                    name=f"layer {j} of the cycle",
                    legendgroup=f"l{j}",
                    showlegend=col == 1,
                    line={"color": color(j)},
                    hovertemplate=f"layer {j}<br>step %{{x}}<br>{label}: %{{y:.3g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=rate,
            mode="lines+markers",
            name="sink rate (all heads)",
            line={"color": "black"},
            hovertemplate="step %{x}<br>sink rate %{y:.3g}<extra></extra>",
        ),
        row=1,
        col=3,
    )
    fig.update_yaxes(title_text="concentration", row=1, col=1)
    fig.update_yaxes(title_text="mean row entropy", row=1, col=2)
    fig.update_yaxes(title_text="fraction of heads", range=[-0.02, 1.02], row=1, col=3)  # a rate: [0, 1]
    return finish(fig, title, "step", None, "series")


def attention_views(patterns: Any, tokens: list[str] | None = None, steps: list[int] | None = None) -> Any:
    """A circuitsvis view of one head across steps: ``patterns`` is ``[step, q, k]``
    (``head_patterns_across_steps`` or the ``HeadPatterns`` reducer); each step is one panel,
    named ``step r``. Returns circuitsvis's ``RenderedHTML`` (display it in a notebook, or write
    ``str(view)`` / ``view.local_src`` to an HTML file).

    >>> import torch
    >>> view = attention_views(torch.softmax(torch.randn(3, 4, 4), -1), ["a", "b", "c", "d"])
    >>> "step 2" in view.local_src
    True
    """
    import circuitsvis as cv

    p = to_numpy(patterns)
    if p.ndim != 3:
        raise ValueError(f"expected [step, q, k], got shape {tuple(p.shape)}")
    steps = list(range(p.shape[0])) if steps is None else list(steps)
    tokens = tokens if tokens is not None else [f"[{i}]" for i in range(p.shape[-1])]
    return cv.attention.attention_heads(
        attention=p[steps],
        tokens=list(tokens),
        attention_head_names=[f"step {r}" for r in steps],
        mask_upper_tri=True,
    )
