"""Figure of a generation (``model.generate(..., return_details=True)``): the generated text
coloured by the steps each token used, above the steps per token as bars.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tl_loop.plot._layout import finish, to_numpy


def generation_steps_figure(
    result: Any, model: Any = None, row: int = 0, title: str = "Steps used per generated token"
) -> go.Figure:
    """Row ``row`` of a ``GenerationResult``: each generated token (its text when ``model`` has
    a tokenizer, else its id) in a cell coloured by its steps (``exit_step + 1``), and a bar per
    token. Tokens generated after the row stopped at EOS are left out.

    >>> import torch
    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer, exits
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=1, n_steps=4)
    >>> model = HookedLoopedTransformer(cfg, seed=0)
    >>> out = model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, do_sample=False, stop_at_eos=False,
    ...                      verbose=False, exit=exits.kl(0.1), return_details=True)
    >>> fig = generation_steps_figure(out)
    >>> [t.type for t in fig.data]
    ['heatmap', 'bar']
    """
    steps = to_numpy(result.steps_used[row])
    ids = result.new_tokens[row].tolist()
    keep = steps > 0
    steps, ids = steps[keep], [t for t, k in zip(ids, keep) if k]
    if model is not None and getattr(model, "tokenizer", None) is not None:
        labels = [repr(s)[1:-1] for s in model.to_str_tokens(result.new_tokens[row][: len(ids)])]
    else:
        labels = [str(t) for t in ids]
    x = np.arange(len(ids))
    fig = make_subplots(rows=2, cols=1, row_heights=[0.3, 0.7], shared_xaxes=True, vertical_spacing=0.08)
    hover = [f"token {k}: {lab!r}<br>{int(s)} steps" for k, (lab, s) in enumerate(zip(labels, steps))]
    fig.add_trace(go.Heatmap(
        z=[steps], x=x, y=["text"], text=[labels], texttemplate="%{text}", hovertext=[hover], hoverinfo="text",
        colorscale="Viridis", zmin=1, zmax=result.n_steps, colorbar={"title": {"text": "steps"}},
    ), row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=steps, hovertext=hover, hoverinfo="text", name="steps", showlegend=False), row=2, col=1)
    fig.update_xaxes(tickmode="array", tickvals=x, ticktext=labels, row=2, col=1)
    fig.update_yaxes(range=[0, result.n_steps + 0.5], title_text="steps used", row=2, col=1)
    rule = "every step" if result.exit is None else repr(result.exit)
    return finish(fig, f"{title} (n_steps={result.n_steps}, exit: {rule})", x_title="generated token")
