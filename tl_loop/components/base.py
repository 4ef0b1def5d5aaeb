"""Weights live in one place; hook points live in per-effective-layer *views*.

The recurrent block's weights are stored once (``model.core[j]``), but each time the loop runs
it the block must fire its own, uniquely named hook points (``model.blocks[i]``). A view is an
``nn.Module`` holding ``HookPoint`` children and a plain (unregistered) reference to the
weights it computes with, so ``state_dict`` / ``parameters`` list every weight exactly once
while ``named_modules`` lists every hook point of every effective layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
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

    def bind(self, weights: nn.Module | None) -> None:
        """Compute with ``weights`` from now on; child views follow the attribute of the same
        name (``attn`` -> ``weights.attn``). Hook points, and the hooks on them, stay."""
        object.__setattr__(self, "weights", weights)
        for name, child in self._modules.items():
            if isinstance(child, WeightView):
                child.bind(getattr(weights, name, None) if weights is not None else None)


def set_present(module: nn.Module, name: str, present: bool) -> None:
    """Show or hide the child ``name`` of ``module`` without losing it (or the hooks on it).

    A hidden child is kept in ``module._hidden_children``: it is no sub-module (so no hook name
    of the model) until shown again. Used for hook points that exist at some depths only.
    """
    hidden = module.__dict__.setdefault("_hidden_children", {})
    if present and name in hidden:
        module._modules[name] = hidden.pop(name)
    elif not present and name in module._modules:
        hidden[name] = module._modules.pop(name)


def all_hook_points(module: nn.Module, prefix: str) -> Iterator[tuple[str, HookPoint]]:
    """Every hook point below ``module``, hidden children included, with its full name."""
    children = dict(module._modules)
    children.update(module.__dict__.get("_hidden_children", {}))
    for name, child in children.items():
        if child is None:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, HookPoint):
            yield full, child
        yield from all_hook_points(child, full)


def has_hooks(hook_point: nn.Module) -> bool:
    """Whether anything (a TransformerLens hook or a raw torch hook) is attached."""
    return bool(hook_point._forward_hooks or hook_point._backward_hooks)


# torch's global module hooks (``register_module_forward_hook`` & co.): dicts that torch mutates
# in place and never rebinds, so they are read here directly.
_GLOBAL_HOOK_DICTS = (
    _torch_module._global_forward_hooks,
    _torch_module._global_forward_pre_hooks,
    _torch_module._global_backward_hooks,
    _torch_module._global_backward_pre_hooks,
)
_GFH, _GFPH, _GBH, _GBPH = _GLOBAL_HOOK_DICTS


def _global_module_hooks() -> bool:
    """Whether any of torch's global module hooks is set."""
    return bool(_GFH or _GFPH or _GBH or _GBPH)


def is_hooked(point: nn.Module) -> bool:
    """Whether calling ``point`` could do anything: hooks or pre-hooks of any direction, splices,
    torch's global module hooks, or an instance-level ``forward`` (nnsight's interleaver)."""
    return bool(
        point._forward_hooks
        or point._forward_pre_hooks
        or point._backward_hooks
        or point._backward_pre_hooks
        or getattr(point, "splices", ())
        or "forward" in point.__dict__
    ) or _global_module_hooks()


def run_hook_point(point: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Fire ``point`` on ``x``: what it returns, and whether that differs from ``x``.

    The one test of "did the hooks change the activation?" for hook points whose presence could
    change the computation (``hook_scale`` of a norm, ``hook_attn_scores`` / ``hook_pattern``):
    unchanged means the hooks returned ``x`` itself (or None) and wrote nothing into it. A write
    in place (TransformerLens's patching setters write in place and return the same tensor) shows
    as a new ``x._version``. Inference tensors have no version counter: for them a copy of ``x``
    is kept and compared with ``torch.equal`` (one extra copy of the activation while the hooks
    run). A changed activation is used as returned; an unchanged one lets the caller keep its
    exact no-hook result.
    """
    if x.is_inference():
        kept = x.clone()
        out = point(x)
        return out, not (out is x and torch.equal(x, kept))
    version = x._version
    out = point(x)
    return out, not (out is x and x._version == version)


def exact_with_gradient_of(exact: torch.Tensor, hooked: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``exact``'s values, with the gradient of ``hooked()`` where one is recorded.

    Where hooks left an activation unchanged the no-hook result is kept, but a gradient must still
    flow through the hook point (backward hooks, ``retain_grad`` on a cached tensor): then
    ``exact.detach() + (h - h.detach())`` adds an exact zero whose gradient is ``h``'s. Under
    ``no_grad`` / inference mode ``hooked`` is never computed.
    """
    if not (torch.is_grad_enabled() and exact.requires_grad):
        return exact
    h = hooked()
    return exact.detach() + (h - h.detach())


class LoopHookPoint(HookPoint):
    """A TransformerLens ``HookPoint`` that costs one plain function call when nothing is attached.

    ``nn.Module.__call__`` goes through ``_wrapped_call_impl`` and ``_call_impl`` (tracing-state
    query, eight hook-dict checks) even for an identity module; a looped model fires hundreds of
    hook points per forward pass. With no hook of any kind attached (its own forward / backward
    hooks and pre-hooks, or torch's global module hooks) the input is returned directly; with plain
    forward hooks only (what TransformerLens's ``add_hook`` registers) they are called in order,
    as ``_call_impl`` would call them; anything else (pre-hooks, backward hooks, hooks taking
    kwargs or ``always_call``, global hooks, tracing, a ``forward`` set on the instance as nnsight
    does) takes the ordinary module call. TransformerLens
    hooks, raw torch hooks and backward hooks behave exactly as on a ``HookPoint`` (which this is:
    ``isinstance(hp, HookPoint)``).
    """

    #: Modules spliced in at this hook point (``model.splice``): each runs on the activation, its
    #: output replacing it, before any hook sees it. Set by the model, never by hand.
    splices: tuple[Any, ...] = ()

    def forward(self, x: Any) -> Any:
        for site in self.splices:
            x = site(x)
        return x

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (
            self._forward_pre_hooks
            or self._backward_hooks
            or self._backward_pre_hooks
            or _GFH
            or _GFPH
            or _GBH
            or _GBPH
            or kwargs
            or "forward" in self.__dict__  # an instance-level forward (nnsight's interleaver)
        ):
            return super().__call__(*args, **kwargs)
        x = args[0]
        if not self._forward_hooks:
            return self.forward(x) if self.splices else x
        if self._forward_hooks_with_kwargs or self._forward_hooks_always_called or torch._C._get_tracing_state():
            return super().__call__(*args, **kwargs)
        if self.splices:
            x = self.forward(x)
        # Forward hooks only (what TransformerLens attaches): the loop of nn.Module._call_impl,
        # without its per-call closure and hook-list set-up.
        for hook in tuple(self._forward_hooks.values()):
            result = hook(self, args, x)
            if result is not None:
                if isinstance(result, torch.Tensor) and isinstance(x, torch.Tensor) and result.device != x.device:
                    result = result.to(x.device)  # a model over several devices: a patch from cfg.device
                x = result
        return x

    #: Plain attributes TransformerLens reassigns on every hook removal: set them directly
    #: (``nn.Module.__setattr__`` would only check they are no parameter, buffer or module).
    _PLAIN_ATTRIBUTES = frozenset({"fwd_hooks", "bwd_hooks", "ctx", "name", "splices"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in LoopHookPoint._PLAIN_ATTRIBUTES and not isinstance(value, (nn.Module, torch.Tensor)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def remove_hooks(self, dir: Any = "fwd", including_permanent: bool = False, level: Any = None) -> None:
        """As ``HookPoint.remove_hooks``; returns at once when nothing is attached (the model's
        ``reset_hooks`` visits every hook point after each ``run_with_hooks`` / ``run_with_cache``)."""
        if not self.fwd_hooks and not self.bwd_hooks and dir in ("fwd", "bwd", "both"):
            return
        super().remove_hooks(dir, including_permanent=including_permanent, level=level)


def split_projections(x: torch.Tensor) -> bool:
    """Whether fused projection matrices (q/k/v, gate/up) run as one GEMM per row block.

    On CPU, BLAS runs two or three narrow GEMMs faster than one wide one for the short inputs of
    interpretability work (measured: 5-12% faster up to 256 rows, 2-4% slower at 1024; see
    ``benchmarks/RESULTS.md``). Elsewhere (CUDA) the single fused GEMM is kept: one kernel launch
    instead of two or three. The row blocks are views of the fused matrix (no copy).
    """
    return x.device.type == "cpu"
