"""Devices and dtypes: the config follows the weights.

TransformerLens reads ``cfg.device`` to allocate (patching metrics, caches, ``to_tokens``) and
``cfg.dtype`` to build inputs, so both must say where the weights are. :class:`PlacementMixin`
re-reads them from the parameters after every ``nn.Module._apply`` -- the one method behind
``.to(device)``, ``.to(dtype)``, ``.cuda()``, ``.cpu()``, ``.half()``, ``.bfloat16()``,
``.double()`` and ``.float()`` -- so none of them can leave the config stale.

>>> import torch
>>> from tl_loop import LoopedConfig, HookedLoopedTransformer
>>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=8, d_vocab=20, n_core_layers=1))
>>> model.to(torch.float64).cfg.dtype
torch.float64
>>> model.cfg.device
'cpu'
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def weight_placement(model: nn.Module) -> tuple[list[torch.device], torch.dtype | None]:
    """The distinct devices of ``model``'s parameters (in registration order, the embedding's
    first) and the dtype of its floating parameters (the embedding's when they differ)."""
    devices: list[torch.device] = []
    dtype = None
    for p in model.parameters():
        if p.device not in devices:
            devices.append(p.device)
        if dtype is None and p.is_floating_point():
            dtype = p.dtype
    return devices, dtype


def sync_config(model: nn.Module) -> None:
    """Set ``model.cfg.device`` / ``.n_devices`` / ``.dtype`` from where its weights are."""
    devices, dtype = weight_placement(model)
    if devices:
        model.cfg.device = str(devices[0])
        model.cfg.n_devices = len(devices)
    if dtype is not None:
        model.cfg.dtype = dtype
    if hasattr(model, "_placement"):
        from tl_loop.placement import Placement

        model._placement = Placement.of(model) if len(devices) > 1 else None


class PlacementMixin(nn.Module):
    """Keeps ``cfg.device``, ``cfg.n_devices`` and ``cfg.dtype`` true after any move or cast."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[override]
        out = super()._apply(fn, recurse)
        sync_config(self)
        return out
