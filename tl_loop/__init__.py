"""tl-loop: looped (recurrent-depth) language models as TransformerLens hooked models.

Public names::

    LoopedConfig, HookedLoopedTransformer, Schedule, EffectiveLayer,
    LoopedActivationCache, attribution_names_filter, patching (module), exits (module), errors (module)

The names are imported on first use (PEP 562), so ``import tl_loop`` -- and the command line's
``--help`` -- does not pay for importing torch and TransformerLens.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tl_loop import errors
from tl_loop.errors import CheckpointError, InputError, ModelInUseError, UnsupportedError

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from tl_loop import exits, patching
    from tl_loop.cache import LoopedActivationCache, attribution_names_filter
    from tl_loop.config import LoopedConfig
    from tl_loop.model import HookedLoopedTransformer
    from tl_loop.schedule import EffectiveLayer, Schedule

__version__ = "0.1.0"

#: public name -> module that defines it (``None``: the name is a submodule)
_LAZY: dict[str, str | None] = {
    "LoopedConfig": "tl_loop.config",
    "HookedLoopedTransformer": "tl_loop.model",
    "Schedule": "tl_loop.schedule",
    "EffectiveLayer": "tl_loop.schedule",
    "LoopedActivationCache": "tl_loop.cache",
    "attribution_names_filter": "tl_loop.cache",
    "patching": None,
    "exits": None,
}

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
    "ModelInUseError",
    "UnsupportedError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tl_loop' has no attribute {name!r}")
    module = _LAZY[name]
    value = importlib.import_module(f"tl_loop.{name}") if module is None else getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
