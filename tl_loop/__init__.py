"""tl-loop: looped (recurrent-depth) language models as TransformerLens hooked models.

Public names::

    LoopedConfig, HookedLoopedTransformer, Schedule, EffectiveLayer,
    LoopedActivationCache, attribution_names_filter, patching (module), exits (module), errors (module)
"""

from tl_loop import errors, exits, patching
from tl_loop.cache import LoopedActivationCache, attribution_names_filter
from tl_loop.config import LoopedConfig
from tl_loop.errors import CheckpointError, InputError, UnsupportedError
from tl_loop.model import HookedLoopedTransformer
from tl_loop.schedule import EffectiveLayer, Schedule

__version__ = "0.1.0"

__all__ = [
    "LoopedConfig",
    "HookedLoopedTransformer",
    "Schedule",
    "EffectiveLayer",
    "LoopedActivationCache",
    "attribution_names_filter",
    "patching",
    "exits",
    "errors",
    "CheckpointError",
    "InputError",
    "UnsupportedError",
    "__version__",
]
