"""tl-loop: looped (recurrent-depth) language models as TransformerLens hooked models.

Public names::

    LoopedConfig, HookedLoopedTransformer, Schedule, EffectiveLayer,
    LoopedActivationCache, attribution_names_filter, patching (module), errors (module)
"""

from tl_loop import errors, patching
from tl_loop.cache import LoopedActivationCache, attribution_names_filter
from tl_loop.config import LoopedConfig
from tl_loop.errors import CheckpointError, InputError, ModelInUseError, UnsupportedError
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
    "errors",
    "CheckpointError",
    "InputError",
    "ModelInUseError",
    "UnsupportedError",
    "__version__",
]
