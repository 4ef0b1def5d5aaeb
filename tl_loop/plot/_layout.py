"""Shared figure conventions: titles, axis labels, legends, hover text, colours."""

from __future__ import annotations

from typing import Any

import plotly.express as px
import plotly.graph_objects as go
import torch

PALETTE: list[str] = px.colors.qualitative.Plotly + px.colors.qualitative.D3


def color(k: int) -> str:
    return PALETTE[k % len(PALETTE)]


def to_numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return x


def finish(
    fig: go.Figure,
    title: str,
    x_title: str | None = None,
    y_title: str | None = None,
    legend_title: str | None = None,
    log_y: bool = False,
) -> go.Figure:
    """Title, axis titles, legend title and a white template, in one place."""
    fig.update_layout(title={"text": title}, template="plotly_white", hovermode="closest")
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    if legend_title is not None:
        fig.update_layout(legend_title_text=legend_title, showlegend=True)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def check_2d(values: Any, what: str) -> Any:
    v = to_numpy(values)
    if v.ndim != 2:
        raise ValueError(f"{what} must be 2-D [step, layer_in_cycle], got shape {tuple(v.shape)}")
    return v
