"""The one table of MLP activations: every accepted name, Hugging Face aliases included.

Names follow ``transformers.activations.ACT2FN`` and compute what it computes for them (up to
float rounding: ``gelu_new`` / ``gelu_fast`` are the tanh approximation, which
``F.gelu(approximate="tanh")`` evaluates in one kernel). ``LoopedConfig.act_fn`` accepts any
key; loaders store the canonical name.

>>> canonical_activation("swish"), canonical_activation("gelu_fast")
('silu', 'gelu_new')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class Activation(NamedTuple):
    """An activation function and the canonical name of what it computes."""

    canonical: str
    fn: Callable[[torch.Tensor], torch.Tensor]


_SILU = Activation("silu", F.silu)
_GELU_NEW = Activation("gelu_new", _gelu_tanh)

#: Accepted name -> activation. Aliases share their canonical entry.
ACTIVATIONS: dict[str, Activation] = {
    "silu": _SILU,
    "swish": _SILU,
    "relu": Activation("relu", F.relu),
    "gelu": Activation("gelu", F.gelu),
    "gelu_new": _GELU_NEW,
    "gelu_fast": _GELU_NEW,
    "gelu_pytorch_tanh": Activation("gelu_pytorch_tanh", _gelu_tanh),
}


def _entry(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def canonical_activation(name: str) -> str:
    """The canonical name for ``name`` (``swish`` -> ``silu``); ``ValueError`` if unknown."""
    return _entry(name).canonical


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function ``name`` computes; ``ValueError`` if unknown."""
    return _entry(name).fn
