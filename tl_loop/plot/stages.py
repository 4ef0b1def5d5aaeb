"""Stages of inference of several models on one figure (looped and feedforward side by side).

Six panels -- logit-lens entropy, rank and probability of the final prediction, KL to the final
distribution, cosine of consecutive residual states, residual norm -- over effective depth; one
colour per model, one legend entry per model. ``x="fraction"`` puts models of different depth on
one axis (``(i + 1) / n_layers``); ``x="layer"`` uses the effective layer index.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tl_loop.plot._layout import color, finish, to_numpy

PANELS: tuple[tuple[str, str, bool], ...] = (
    ("entropy", "entropy (nats)", False),
    ("rank", "rank of final prediction", True),
    ("prob", "p(final prediction)", False),
    ("kl_to_final", "KL(final || layer) (nats)", False),
    ("cosine_to_previous", "cos(resid_i, resid_(i-1))", False),
    ("resid_norm", "residual norm", False),
)


def inference_stages_figure(
    stages: Any,
    x: Literal["fraction", "layer"] = "fraction",
    title: str = "Stages of inference along effective depth",
) -> go.Figure:
    """``stages``: one ``InferenceStages`` or a ``{model name: InferenceStages}`` dict.

    >>> import torch
    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> from tl_loop.analysis import inference_stages
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=3)
    >>> model = HookedLoopedTransformer(cfg, seed=0)
    >>> s3 = inference_stages(model.run_with_cache(torch.tensor([[1, 2, 3]]))[1])
    >>> s6 = inference_stages(model.run_with_cache(torch.tensor([[1, 2, 3]]), n_steps=6)[1])
    >>> fig = inference_stages_figure({"3 steps": s3, "6 steps": s6})
    >>> sorted({t.name for t in fig.data}), fig.layout.xaxis.title.text
    (['3 steps', '6 steps'], 'fraction of effective depth')
    """
    named = stages if isinstance(stages, dict) else {"model": stages}
    fig = make_subplots(
        rows=2,
        cols=3,
        subplot_titles=[label for _, label, _ in PANELS],
        horizontal_spacing=0.08,
        vertical_spacing=0.16,
    )
    x_title = "fraction of effective depth" if x == "fraction" else "effective layer"
    for m, (name, s) in enumerate(named.items()):
        xs = to_numpy(s.depth_fraction) if x == "fraction" else np.arange(s.n_layers)
        labels = np.array(s.labels, dtype=object)
        for k, (field, label, _) in enumerate(PANELS):
            y = to_numpy(getattr(s, field))
            if y.ndim != 1:
                raise ValueError(
                    f"{name}: expected token-averaged stages (per_token=False), got {field} {y.shape}"
                )
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=y,
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=k == 0,
                    line={"color": color(m)},
                    marker={"size": 4},
                    customdata=labels,
                    hovertemplate=f"{name}<br>layer %{{customdata}}<br>{label}: %{{y:.4g}}<extra></extra>",
                ),
                row=k // 3 + 1,
                col=k % 3 + 1,
            )
    for k, (_, label, log) in enumerate(PANELS):
        row, col = k // 3 + 1, k % 3 + 1
        fig.update_yaxes(title_text=label, type="log" if log else None, row=row, col=col)
    fig.update_layout(height=650)
    return finish(fig, title, x_title, None, "model")
