"""Limiting-behaviour figure: every token's cosine to its final state over the steps, coloured by
its class (fixed point, orbit, slider, unknown; see ``tl_loop.analysis.fixed_points``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from tl_loop.plot._layout import finish, to_numpy

CLASS_COLORS: dict[str, str] = {
    "fixed_point": "#2ca02c",
    "orbit": "#1f77b4",
    "slider": "#ff7f0e",
    "unknown": "#7f7f7f",
}


def limiting_behaviour_figure(
    result: Any, max_tokens: int = 200, title: str = "Limiting behaviour: cosine to the final state"
) -> go.Figure:
    """Plot a ``LimitingBehaviour``: one line per token (at most ``max_tokens``), one legend entry
    per class with its share of tokens, and the ``1 - tau`` band edge.

    >>> import torch
    >>> from tl_loop.analysis import classify_limiting_behaviour
    >>> cos = torch.stack([torch.ones(16), torch.tensor([0.0, 1.0] * 8)], -1)
    >>> fig = limiting_behaviour_figure(classify_limiting_behaviour(cos))
    >>> [t.name for t in fig.data if t.showlegend]
    ['fixed point (50% of tokens)', 'orbit (50% of tokens)', '1 - tau = 0.95']
    """
    from tl_loop.analysis.fixed_points import LIMITING_CLASSES

    cos = to_numpy(result.cosine)
    n_steps = cos.shape[0]
    cos = cos.reshape(n_steps, -1)
    codes = to_numpy(result.codes).reshape(-1)
    token_index = np.stack(np.unravel_index(np.arange(codes.size), tuple(result.codes.shape) or (1,)), -1)
    fractions = result.fractions()
    fig = go.Figure()
    shown: set[int] = set()
    steps = np.arange(n_steps)
    for t in range(min(codes.size, max_tokens)):
        k = int(codes[t])
        name = LIMITING_CLASSES[k]
        where = ", ".join(str(int(i)) for i in token_index[t])
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=cos[:, t],
                mode="lines",
                name=f"{name.replace('_', ' ')} ({100 * fractions[name]:.0f}% of tokens)",
                legendgroup=name,
                showlegend=k not in shown,
                line={"color": CLASS_COLORS[name], "width": 1},
                opacity=0.7,
                hovertemplate=f"token ({where}): {name}<br>step %{{x}}<br>cos to final %{{y:.3f}}"
                "<extra></extra>",
            )
        )
        shown.add(k)
    fig.add_trace(
        go.Scatter(
            x=[0, n_steps - 1],
            y=[1 - result.tau] * 2,
            mode="lines",
            name=f"1 - tau = {1 - result.tau:g}",
            line={"color": "black", "dash": "dot"},
            showlegend=True,
            hovertemplate="1 - tau<extra></extra>",
        )
    )
    return finish(fig, title, "step", "cosine similarity to the final state", "class")
