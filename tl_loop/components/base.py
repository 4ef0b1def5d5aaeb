"""Weights live in one place; hook points live in per-effective-layer *views*.

The recurrent block's weights are stored once (``model.core[j]``), but each time the loop runs
it the block must fire its own, uniquely named hook points (``model.blocks[i]``). A view is an
``nn.Module`` holding ``HookPoint`` children and a plain (unregistered) reference to the
weights it computes with, so ``state_dict`` / ``parameters`` list every weight exactly once
while ``named_modules`` lists every hook point of every effective layer.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import torch.nn.modules.module as _torch_module
from transformer_lens.hook_points import HookPoint


class WeightView(nn.Module):
    """Base class of hook-bearing views: ``self.weights`` is the shared weight module."""

    weights: nn.Module | None

    def __init__(self, weights: nn.Module | None) -> None:
        super().__init__()
        # Bypass nn.Module registration: the weights belong to the model's physical stacks.
        object.__setattr__(self, "weights", weights)


def has_hooks(hook_point: nn.Module) -> bool:
    """Whether anything (a TransformerLens hook or a raw torch hook) is attached."""
    return bool(hook_point._forward_hooks or hook_point._backward_hooks)


def _global_module_hooks() -> bool:
    """Whether torch's global module hooks (``register_module_forward_hook`` & co.) are set."""
    m = _torch_module
    return bool(
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )


class LoopHookPoint(HookPoint):
    """A TransformerLens ``HookPoint`` that costs one plain function call when nothing is attached.

    ``nn.Module.__call__`` goes through ``_wrapped_call_impl`` and ``_call_impl`` (tracing-state
    query, eight hook-dict checks) even for an identity module; a looped model fires hundreds of
    hook points per forward pass. With no hook of any kind attached (its own forward / backward
    hooks and pre-hooks, or torch's global module hooks) the input is returned directly; otherwise
    the ordinary module call runs, so TransformerLens hooks, raw torch hooks and backward hooks
    behave exactly as on a ``HookPoint`` (which this is: ``isinstance(hp, HookPoint)``).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (
            self._forward_hooks
            or self._forward_pre_hooks
            or self._backward_hooks
            or self._backward_pre_hooks
            or _global_module_hooks()
            or kwargs
        ):
            return super().__call__(*args, **kwargs)
        return args[0]
