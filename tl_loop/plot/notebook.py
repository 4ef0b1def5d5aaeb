"""A plotly renderer for notebooks whose figures survive HTML export and code-host viewers.

plotly's default notebook output carries only the plotly JSON mimetype, which ``jupyter nbconvert
--to html`` and most code hosts cannot draw: the figures disappear. :func:`use_notebook_renderer`
stores every figure twice, as that JSON (JupyterLab's plotly extension) and as HTML, and embeds
plotly.js once, in the notebook itself, so nothing is fetched from the network (plotly's own
``"notebook"`` renderer would also load MathJax from a CDN).
"""

from __future__ import annotations

from typing import Any

from plotly.io import renderers, to_html
from plotly.io._base_renderers import NotebookRenderer

RENDERER = "tl_loop_notebook"


class OfflineNotebookRenderer(NotebookRenderer):
    """plotly's ``"notebook"`` renderer (plotly.js embedded once, on first use) without MathJax."""

    def to_mimebundle(self, fig_dict: dict) -> dict[str, Any]:
        html = to_html(fig_dict, config=self.config, auto_play=self.auto_play, include_plotlyjs=False,
                       include_mathjax=False, full_html=False, animation_opts=self.animation_opts,
                       default_width="100%", default_height=525, validate=False)
        return {"text/html": html}


def use_notebook_renderer() -> None:
    """Make ``fig.show()`` store the plotly JSON and self-contained HTML (plotly.js included once).

    >>> import plotly.io as pio
    >>> previous = pio.renderers.default
    >>> use_notebook_renderer()
    >>> pio.renderers.default
    'plotly_mimetype+tl_loop_notebook'
    >>> pio.renderers.default = previous
    """
    if RENDERER not in renderers:
        renderers[RENDERER] = OfflineNotebookRenderer()
    renderers.default = f"plotly_mimetype+{RENDERER}"
