"""Weights live in one place; hook points live in per-effective-layer *views*.

The recurrent block's weights are stored once (``model.core[j]``), but each time the loop runs
it the block must fire its own, uniquely named hook points (``model.blocks[i]``). A view is an
``nn.Module`` holding ``HookPoint`` children and a plain (unregistered) reference to the
weights it computes with, so ``state_dict`` / ``parameters`` list every weight exactly once
while ``named_modules`` lists every hook point of every effective layer.
"""

from __future__ import annotations

import torch.nn as nn


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
