"""The one place that knows which TransformerLens version is installed (3.9+ or 4.x).

tl-loop uses the same public TransformerLens names under both majors (``HookedRootModule``,
``HookPoint``, ``ActivationCache``, ``FactoredMatrix``, ``transformer_lens.config``,
``transformer_lens.patching``, ``transformer_lens.utilities``). What differs:

* ``transformer_lens.tools.analysis`` grew between them: 4.3 adds ``logit_lens``,
  ``interchange`` (with DAS) and ``sparse_probing``, and moves ``get_act_patch_direct_path``
  into ``transformer_lens.patching``. :data:`HAS_TL4_ANALYSIS` says whether they are there.
* ``transformer_lens.model_protocol`` (the ``TransformerLensModelWithWeights`` protocol) is 4.x only:
  :data:`MODEL_PROTOCOL` is ``None`` under 3.x.

SAELens 6.x requires ``transformer-lens<4``, so an SAELens environment is a TL 3.x environment.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

TL_VERSION: str = version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

#: ``transformer_lens.tools.analysis`` has 4.3's tools (logit_lens, interchange, sparse_probing).
HAS_TL4_ANALYSIS: bool
try:
    from transformer_lens.tools.analysis import logit_lens as _logit_lens  # noqa: F401

    HAS_TL4_ANALYSIS = True
except ImportError:
    HAS_TL4_ANALYSIS = False

#: ``transformer_lens.model_protocol.TransformerLensModelWithWeights`` (TL >= 4), else ``None``.
MODEL_PROTOCOL: Any
try:
    from transformer_lens.model_protocol import TransformerLensModelWithWeights as MODEL_PROTOCOL
except ImportError:
    MODEL_PROTOCOL = None


def needs_tl4_analysis(tool: str) -> str | None:
    """Why ``tool`` cannot run here (``None`` when it can): the reason a test skips with."""
    if HAS_TL4_ANALYSIS:
        return None
    return f"{tool} ships in transformer_lens.tools.analysis from TransformerLens 4.3 (installed: {TL_VERSION})"
