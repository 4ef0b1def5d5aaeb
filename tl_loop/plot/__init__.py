"""Figures for ``tl_loop.analysis``: plotly figures (``go.Figure`` with a title, axis labels,
legends or colour-bar titles, and hover text) and circuitsvis attention views.

=================================  ===================================================
function                           draws
=================================  ===================================================
``convergence_curves``             step-to-step distance (or distance to a fixed point)
                                   per layer of the cycle, over steps, log scale
``step_layer_heatmap``             any ``[step, layer_in_cycle]`` quantity
``residual_stats_figure``          residual norm and matrix entropy over (step, layer)
``pca_trajectory_figure``          a token's PCA trajectory, 2-D or 3-D
``cycle_distances_figure``         distances within a step vs across steps
``head_heatmap``                   any ``[step, layer_in_cycle, head]`` statistic
``stabilisation_heatmap``          per-head pattern distance to the previous step
``step_pair_heatmap``              Frobenius distance between steps for one head
``paper_attention_figure``         ColSum concentration, mixing score, sink rate
``inference_stages_figure``        stages of inference of several models together
``limiting_behaviour_figure``      cosine to the final state per token, by class
``attention_views``                circuitsvis view of one head across steps
``patching_heatmap``               a ``[row, pos]`` patching result, centred on 0
``generation_steps_figure``        generated text coloured by steps used, steps per token
``use_notebook_renderer``          figures that survive HTML export (JSON + HTML, plotly.js once)
=================================  ===================================================

Save with ``fig.write_html("figure.html")`` (or ``fig.show()`` in a notebook).
"""

from tl_loop.plot.attention import (
    attention_views,
    head_heatmap,
    paper_attention_figure,
    stabilisation_heatmap,
    step_pair_heatmap,
)
from tl_loop.plot.generation import generation_steps_figure
from tl_loop.plot.convergence import convergence_curves, residual_stats_figure, step_layer_heatmap
from tl_loop.plot.limiting import limiting_behaviour_figure
from tl_loop.plot.notebook import use_notebook_renderer
from tl_loop.plot.patching import patching_heatmap
from tl_loop.plot.stages import inference_stages_figure
from tl_loop.plot.trajectory import cycle_distances_figure, pca_trajectory_figure

__all__ = [
    "generation_steps_figure",
    "convergence_curves",
    "step_layer_heatmap",
    "residual_stats_figure",
    "pca_trajectory_figure",
    "cycle_distances_figure",
    "head_heatmap",
    "stabilisation_heatmap",
    "step_pair_heatmap",
    "paper_attention_figure",
    "inference_stages_figure",
    "limiting_behaviour_figure",
    "attention_views",
    "patching_heatmap",
    "use_notebook_renderer",
]
