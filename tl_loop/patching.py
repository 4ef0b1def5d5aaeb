"""Patching a loop, not only a layer.

``transformer_lens.patching`` works on a ``HookedLoopedTransformer`` unchanged: its sweeps run
over the full *effective* depth (``blocks.{i}`` for every layer the unrolled model executes),
so ``get_act_patch_resid_pre`` returns ``[cfg.n_layers, pos]`` with one row per (step, layer of
the cycle). What its one-hook-per-run design cannot express is an intervention on the *loop*:
the same layer of the recurrent block at every step at once, a range of steps, or the state
handed from one step to the next. This module adds those, in TransformerLens's own terms:

* **Hook builders** return ``[(hook_name, hook_fn), ...]`` for ``model.run_with_hooks(fwd_hooks=...)``
  (or ``with model.hooks(fwd_hooks=...)``): :func:`patch_cycle_hooks` / :func:`ablate_cycle_hooks`
  act on layer ``layer_in_cycle`` of the cycle at each of ``steps``; :func:`patch_state_hooks` /
  :func:`ablate_state_hooks` act on the recurrent state (``loops.{r}.hook_state_in``,
  ``hook_injected``, ``hook_state_out``). ``pos`` and ``head`` restrict a patch as in
  ``transformer_lens.patching``'s setters (heads for ``q/k/v/z/result``, ``[head, dest_pos]``
  for ``pattern``/``attn_scores``).
* :func:`cycle_index_df` builds an ``index_df`` for ``transformer_lens.patching.generic_activation_patch``
  whose ``layer`` column holds the effective indices of one layer of the cycle at the chosen
  steps, so TransformerLens's sweep runs over ``(step, pos)`` of that layer (one step per run).
* **Sweeps** shaped like TransformerLens's: :func:`get_act_patch_cycle` patches a layer of the
  cycle at *all* chosen steps in each run (``[layer_in_cycle, pos]``), :func:`get_act_patch_state`
  patches the recurrent state step by step (``[step, pos]``).
* **Batched sweeps**, one per sweep of ``transformer_lens.patching`` and per loop sweep here,
  named after it with ``_batched`` (:func:`get_act_patch_resid_pre_batched`,
  :func:`get_act_patch_attn_head_out_by_pos_batched`, :func:`get_act_patch_block_every_batched`,
  :func:`generic_activation_patch_batched` with an ``index_df``, :func:`get_act_patch_cycle_batched`,
  :func:`get_act_patch_state_batched`, ...). Each returns what its twin returns (same shape,
  ``reduce``/``baseline``/metric mappings included) but runs many patches per forward pass,
  each from where it diverges from the corrupted run (``tl_loop.batched``).

Hook names refer to one depth. Every builder works at ``n_steps`` (default: the model's current
``cfg.n_steps``) and refuses a ``clean_cache`` recorded at another depth; to work at another depth
pass ``n_steps=`` here *and* to ``run_with_hooks`` (the sweeps do that themselves).
"""

from __future__ import annotations

import difflib
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens.hook_points import HookPoint

from tl_loop.batched import Cell, run_cells, scalar_evaluate
from tl_loop.cache import ModelAtSteps
from tl_loop.errors import InputError
from tl_loop.hook_names import block_hook
from tl_loop.schedule import Schedule
from tl_loop.threads import exclusive

__all__ = [
    "ablate_cycle_hooks",
    "ablate_state_hooks",
    "cycle_hook_names",
    "cycle_index_df",
    "generic_activation_patch_batched",
    "get_act_patch_attn_head_all_pos_every_batched",
    "get_act_patch_attn_head_by_pos_every_batched",
    "get_act_patch_attn_head_k_all_pos_batched",
    "get_act_patch_attn_head_k_by_pos_batched",
    "get_act_patch_attn_head_out_all_pos_batched",
    "get_act_patch_attn_head_out_by_pos_batched",
    "get_act_patch_attn_head_pattern_all_pos_batched",
    "get_act_patch_attn_head_pattern_by_pos_batched",
    "get_act_patch_attn_head_pattern_dest_src_pos_batched",
    "get_act_patch_attn_head_q_all_pos_batched",
    "get_act_patch_attn_head_q_by_pos_batched",
    "get_act_patch_attn_head_v_all_pos_batched",
    "get_act_patch_attn_head_v_by_pos_batched",
    "get_act_patch_attn_out_batched",
    "get_act_patch_block_every_batched",
    "get_act_patch_cycle",
    "get_act_patch_cycle_batched",
    "get_act_patch_mlp_out_batched",
    "get_act_patch_resid_mid_batched",
    "get_act_patch_resid_pre_batched",
    "get_act_patch_state",
    "get_act_patch_state_batched",
    "patch_cycle_hooks",
    "patch_state_hooks",
    "state_hook_names",
]

StepsArg = int | Sequence[int] | range | slice | None
PosArg = int | Sequence[int] | slice | torch.Tensor | None
HookList = list[tuple[str, Callable[..., torch.Tensor]]]
AblationMode = Literal["zero", "mean"]

#: Hook points laid out ``[batch, pos, head, ...]`` (head-indexed vectors).
_HEAD_VECTOR = {"hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_result", "hook_gate"}
#: Hook points laid out ``[batch, head, dest_pos, src_pos]``.
_HEAD_PATTERN = {"hook_pattern", "hook_attn_scores"}
#: Head-indexed hook points whose head axis counts key/value heads (GQA).
_KV_HEADS = {"hook_k", "hook_v", "hook_rot_k"}


# ---------------------------------------------------------------------------- resolution helpers
def _base_model(model: Any) -> Any:
    """The ``HookedLoopedTransformer`` behind ``model`` (which may be a cache's ``ModelAtSteps``)."""
    return model.model if isinstance(model, ModelAtSteps) else model


def _model_depth(model: Any) -> int:
    return int(model.n_steps if isinstance(model, ModelAtSteps) else model.cfg.n_steps)


def _cache_depth(cache: Any) -> tuple[int | None, bool]:
    """``(n_steps, exact)``: the depth a cache was recorded at. A ``LoopedActivationCache`` knows
    it exactly; for a plain dict the highest ``loops.{r}`` key gives a lower bound only (a
    ``names_filter`` may have dropped later steps)."""
    bound = getattr(cache, "model", None)
    if isinstance(bound, ModelAtSteps):
        return int(bound.n_steps), True
    keys = cache.cache_dict.keys() if hasattr(cache, "cache_dict") else cache.keys() if isinstance(cache, Mapping) else ()
    steps = {int(k.split(".")[1]) for k in keys if k.startswith("loops.") and k.split(".")[1].isdigit()}
    return (max(steps) + 1 if steps else None), False


def _resolve_depth(model: Any, n_steps: int | None, *caches: tuple[str, Any]) -> int:
    """The depth hooks are named at; every given cache must have been recorded at it."""
    base = _base_model(model)
    depth = _model_depth(model) if n_steps is None else base.check_n_steps(n_steps, force=True)
    for label, cache in caches:
        if cache is None:
            continue
        recorded, exact = _cache_depth(cache)
        if recorded is not None and (recorded != depth if exact else recorded > depth):
            where = "the model runs" if n_steps is None else "you asked for"
            at = f"n_steps={recorded}" if exact else f"n_steps>={recorded}"
            raise InputError(
                f"{label} was recorded at {at} but {where} n_steps={depth}: hook names "
                f"differ between depths. Patch at the cache's depth (pass n_steps={recorded}, or use "
                f"`with model.steps({recorded}):`) or re-record the cache at n_steps={depth}"
            )
    return depth


def _schedule(model: Any, depth: int) -> Schedule:
    base = _base_model(model)
    return base.views_at(depth).schedule


def _resolve_steps(steps: StepsArg, n_steps: int) -> list[int]:
    """``None`` (all), an int (negative counts from the end), a range, a slice or a sequence of
    ints -> the steps in the order given."""
    if n_steps == 0:
        raise InputError("the model runs 0 steps: there is no loop to patch (run with n_steps >= 1)")
    if steps is None:
        return list(range(n_steps))
    if isinstance(steps, slice):
        chosen = list(range(n_steps))[steps]
        if not chosen:
            raise InputError(f"steps={steps!r} selects no step of n_steps={n_steps}")
        return chosen
    if isinstance(steps, torch.Tensor):
        steps = steps.flatten().tolist()
    if isinstance(steps, bool):
        raise InputError(f"steps must be an int, a sequence of ints, a range or a slice, got {steps!r}")
    items = [steps] if isinstance(steps, int) else list(steps)
    out: list[int] = []
    for r in items:
        if isinstance(r, bool) or not isinstance(r, int):
            raise InputError(f"steps must contain ints, got {r!r} ({type(r).__name__})")
        if not -n_steps <= r < n_steps:
            raise InputError(f"step {r} out of range: the model runs n_steps={n_steps} steps (0..{n_steps - 1})")
        r = r % n_steps
        if r in out:
            raise InputError(f"step {r} is listed twice in steps={steps!r}")
        out.append(r)
    if not out:
        raise InputError(f"steps={steps!r} selects no step")
    return out


def _check_layer_in_cycle(layer_in_cycle: Any, schedule: Schedule) -> int:
    if isinstance(layer_in_cycle, bool) or not isinstance(layer_in_cycle, int):
        raise InputError(f"layer_in_cycle must be an int, got {layer_in_cycle!r}")
    n = schedule.layers_per_step
    if not 0 <= layer_in_cycle < n:
        raise InputError(
            f"layer_in_cycle {layer_in_cycle} out of range: one step of this model runs {n} layers (0..{n - 1})"
        )
    return layer_in_cycle


def _hook_points(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, HookPoint)]


def _block_suffix(model: Any, activation: str, depth: int, index: int) -> str:
    """The hook name below ``blocks.{i}.`` for ``activation`` (TL short name or suffix)."""
    if not isinstance(activation, str) or not activation:
        raise InputError(f"activation must be a hook name such as 'resid_pre' or 'attn.hook_z', got {activation!r}")
    prefix = f"blocks.{index}."
    name = activation.removeprefix(prefix)
    full = block_hook(index, name)  # expands TransformerLens short names ("z" -> "attn.hook_z")
    suffix = full[len(prefix) :] if full.startswith(prefix) else name
    available = _hook_points(_base_model(model).views_at(depth).blocks[index])
    if suffix not in available:
        leaves = {s.rsplit(".", 1)[-1].removeprefix("hook_") for s in available}
        short = sorted(leaf for leaf in leaves if block_hook(index, leaf).removeprefix(prefix) in available)
        close = [s for s in available if s.startswith(name + ".")][:3] or difflib.get_close_matches(
            suffix, available, n=3, cutoff=0.5
        )
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(
            f"unknown activation {activation!r}: effective layer {index} has no hook point "
            f"'blocks.{index}.{suffix}'{hint}. Short names: {', '.join(short)}; or pass the part of a "
            "hook name after 'blocks.{i}.', e.g. 'attn.hook_z'"
        )
    return suffix


def _state_suffix(model: Any, where: str, depth: int, step: int) -> str:
    """The hook name below ``loops.{r}.`` for ``where`` ('state_in', 'injected', 'inner.0.state_out', ...)."""
    if not isinstance(where, str) or not where:
        raise InputError(f"where must be a loop hook name such as 'state_in', got {where!r}")
    head, _, last = where.rpartition(".")
    suffix = (head + "." if head else "") + (last if last.startswith("hook_") else f"hook_{last}")
    available = _hook_points(_base_model(model).views_at(depth).loops[step])
    if suffix not in available:
        cfg = _base_model(model).cfg
        extra = ""
        if last.removeprefix("hook_") == "injected":
            extra = f" (this model injects nothing: cfg.injection={cfg.injection!r}; use where='state_in')"
        raise InputError(
            f"unknown loop activation {where!r}: step {step} has no hook point 'loops.{step}.{suffix}'{extra}; "
            f"it has {', '.join(available)}"
        )
    return suffix


def _layout(hook_name: str) -> str:
    leaf = hook_name.rsplit(".", 1)[-1]
    if leaf in _HEAD_PATTERN:
        return "pattern"
    if leaf in _HEAD_VECTOR:
        return "head"
    return "pos"


def _n_heads(model: Any, hook_name: str) -> int:
    cfg = _base_model(model).cfg
    leaf = hook_name.rsplit(".", 1)[-1]
    return int(cfg.n_key_value_heads if leaf in _KV_HEADS else cfg.n_heads)


def _check_head(model: Any, hook_name: str, head: PosArg) -> None:
    if head is None:
        return
    if _layout(hook_name) == "pos":
        raise InputError(
            f"head= given but {hook_name} has no head axis; heads can be chosen for "
            "q, k, v, z, result, pattern and attn_scores"
        )
    n = _n_heads(model, hook_name)
    try:
        torch.zeros(n, dtype=torch.bool)[head]
    except (IndexError, TypeError, ValueError) as e:
        raise InputError(f"head={head!r} is not a valid head index for {hook_name} ({n} heads): {e}") from None


def _cached(cache: Any, name: str, label: str) -> torch.Tensor:
    try:
        t = cache[name]
    except KeyError:
        raise InputError(
            f"{label} has no activation {name!r}: record it (run_with_cache without a names_filter "
            "that drops it, at the same n_steps)"
        ) from None
    if not getattr(cache, "has_batch_dim", True):
        t = t[None]
    return t


# ---------------------------------------------------------------------------- the hook
def _mask(shape: torch.Size, layout: str, pos: PosArg, head: PosArg, device: torch.device, name: str) -> torch.Tensor:
    """A boolean mask broadcastable to ``shape`` selecting ``pos`` (and ``head``)."""
    mask = torch.ones([1] * len(shape), dtype=torch.bool, device=device)
    pos_dim, head_dim = {"pos": (1, None), "head": (1, 2), "pattern": (2, 1)}[layout]
    for dim, sel, what in ((pos_dim, pos, "pos"), (head_dim, head, "head")):
        if sel is None or dim is None:
            continue
        axis = torch.zeros(shape[dim], dtype=torch.bool, device=device)
        try:
            axis[sel] = True
        except (IndexError, TypeError, ValueError) as e:
            raise InputError(f"{what}={sel!r} does not index {name} ({shape[dim]} entries on that axis): {e}") from None
        view = [1] * len(shape)
        view[dim] = shape[dim]
        mask = mask & axis.view(view)
    return mask


class _ReplaceHook:
    """Forward hook replacing the (``pos``/``head``-selected part of an) activation by ``value``.

    ``value``: a tensor (broadcast over the batch where it has batch size 1) or a callable
    ``activation -> tensor``.
    """

    def __init__(self, value: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], pos: PosArg, head: PosArg, what: str) -> None:
        self.value, self.pos, self.head, self.what = value, pos, head, what

    def __repr__(self) -> str:  # TransformerLens names the torch hook after this: keep it cheap
        return f"<tl_loop {self.what} hook pos={self.pos!r} head={self.head!r}>"

    def __call__(self, activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        value = self.value(activation) if callable(self.value) else self.value
        value = value.to(device=activation.device, dtype=activation.dtype)
        if value.shape[1:] != activation.shape[1:] or value.shape[0] not in (1, activation.shape[0]):
            raise InputError(
                f"{self.what}: the replacement for {hook.name} has shape {tuple(value.shape)} but the "
                f"run's activation has shape {tuple(activation.shape)} (clean and corrupted prompts must "
                "have the same length; the batch must match or be 1)"
            )
        if self.pos is None and self.head is None:
            return value.expand_as(activation).clone()
        mask = _mask(activation.shape, _layout(hook.name), self.pos, self.head, activation.device, hook.name)
        return torch.where(mask, value, activation)


def _ablation_value(mode: str, mean_cache: Any, name: str) -> torch.Tensor | Callable[[torch.Tensor], torch.Tensor]:
    if mode == "zero":
        if mean_cache is not None:
            raise InputError("mean_cache is only used with mode='mean'")
        return torch.zeros_like
    if mode == "mean":
        if mean_cache is None:
            return lambda act: act.mean(0, keepdim=True)
        return _cached(mean_cache, name, "mean_cache").mean(0, keepdim=True)
    raise InputError(f"mode must be 'zero' or 'mean', got {mode!r}")


# ---------------------------------------------------------------------------- names
def cycle_hook_names(
    model: Any, activation: str, layer_in_cycle: int, steps: StepsArg = None, *, n_steps: int | None = None
) -> list[str]:
    """Hook names of ``activation`` at layer ``layer_in_cycle`` of the cycle, one per step.

    ``activation`` is a TransformerLens short name (``"resid_pre"``, ``"z"``, ``"pattern"``) or
    the part of the hook name after ``blocks.{i}.`` (``"ln1.hook_scale"``). ``steps``: ``None``
    (all), an int (negative counts from the end), a range, a slice or a list.

    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_prelude_layers=1,
    ...                    n_core_layers=2, n_coda_layers=1, n_steps=3, injection="add")
    >>> model = HookedLoopedTransformer(cfg, seed=0)
    >>> cycle_hook_names(model, "resid_pre", layer_in_cycle=1)
    ['blocks.2.hook_resid_pre', 'blocks.4.hook_resid_pre', 'blocks.6.hook_resid_pre']
    >>> cycle_hook_names(model, "z", 0, steps=range(1, 3))
    ['blocks.3.attn.hook_z', 'blocks.5.attn.hook_z']
    """
    depth = _resolve_depth(model, n_steps)
    schedule = _schedule(model, depth)
    j = _check_layer_in_cycle(layer_in_cycle, schedule)
    indices = [schedule.index(r, j) for r in _resolve_steps(steps, depth)]
    suffix = _block_suffix(model, activation, depth, indices[0])
    return [f"blocks.{i}.{suffix}" for i in indices]


def state_hook_names(
    model: Any, where: str = "state_in", steps: StepsArg = None, *, n_steps: int | None = None
) -> list[str]:
    """Loop-level hook names ``loops.{r}.hook_{where}`` for each of ``steps``.

    ``where``: ``"state_in"`` (state entering step ``r``; at ``r=0`` the initial state),
    ``"injected"`` (after input injection), ``"state_out"`` (state leaving the step), or any
    other hook below ``loops.{r}.`` (``"exit_gate"``, ``"inner.0.state_out"``, ...).

    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_steps=3), seed=0)
    >>> state_hook_names(model, "state_out", steps=-1)
    ['loops.2.hook_state_out']
    """
    depth = _resolve_depth(model, n_steps)
    return [f"loops.{r}.{_state_suffix(model, where, depth, r)}" for r in _resolve_steps(steps, depth)]


# ---------------------------------------------------------------------------- hook builders
def patch_cycle_hooks(
    model: Any,
    clean_cache: Any,
    activation: str = "resid_pre",
    layer_in_cycle: int = 0,
    steps: StepsArg = None,
    pos: PosArg = None,
    head: PosArg = None,
    *,
    n_steps: int | None = None,
) -> HookList:
    """Hooks patching ``clean_cache``'s ``activation`` into layer ``layer_in_cycle`` of the cycle
    at each of ``steps`` (default: every step), restricted to ``pos`` / ``head`` if given.

    >>> import torch
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_prelude_layers=1,
    ...                    n_core_layers=2, n_coda_layers=1, n_steps=3, injection="add")
    >>> model = HookedLoopedTransformer(cfg, seed=0)
    >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 9, 3, 4]])
    >>> clean_logits, clean_cache = model.run_with_cache(clean)
    >>> hooks = patch_cycle_hooks(model, clean_cache, "resid_post", layer_in_cycle=1, steps=-1)
    >>> [name for name, _ in hooks]
    ['blocks.6.hook_resid_post']
    >>> patched = model.run_with_hooks(corrupted, fwd_hooks=hooks)  # the last step's output is clean
    >>> torch.allclose(patched, clean_logits, atol=1e-5)
    True
    """
    depth = _resolve_depth(model, n_steps, ("clean_cache", clean_cache))
    names = cycle_hook_names(model, activation, layer_in_cycle, steps, n_steps=depth)
    _check_head(model, names[0], head)
    return [(n, _ReplaceHook(_cached(clean_cache, n, "clean_cache"), pos, head, "patch")) for n in names]


def ablate_cycle_hooks(
    model: Any,
    activation: str = "resid_pre",
    layer_in_cycle: int = 0,
    steps: StepsArg = None,
    mode: AblationMode = "zero",
    mean_cache: Any = None,
    pos: PosArg = None,
    head: PosArg = None,
    *,
    n_steps: int | None = None,
) -> HookList:
    """Hooks zero- or mean-ablating ``activation`` of layer ``layer_in_cycle`` at each of ``steps``.

    ``mode="mean"`` replaces the activation by its mean over the batch of ``mean_cache`` (per
    position), or over the batch of the run itself when ``mean_cache`` is None.

    >>> import torch
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2,
    ...                                              n_steps=3), seed=0)
    >>> hooks = ablate_cycle_hooks(model, "z", layer_in_cycle=0, head=1)   # head 1 of layer 0, every step
    >>> [name for name, _ in hooks]
    ['blocks.0.attn.hook_z', 'blocks.2.attn.hook_z', 'blocks.4.attn.hook_z']
    >>> with model.hooks(fwd_hooks=hooks):
    ...     _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> float(cache["blocks.2.attn.hook_z"][:, :, 1].abs().max()), bool(cache["blocks.2.attn.hook_z"][:, :, 0].any())
    (0.0, True)
    """
    depth = _resolve_depth(model, n_steps, ("mean_cache", mean_cache))
    names = cycle_hook_names(model, activation, layer_in_cycle, steps, n_steps=depth)
    _check_head(model, names[0], head)
    return [(n, _ReplaceHook(_ablation_value(mode, mean_cache, n), pos, head, f"{mode}-ablation")) for n in names]


def patch_state_hooks(
    model: Any,
    clean_cache: Any,
    steps: StepsArg = None,
    where: str = "state_in",
    pos: PosArg = None,
    *,
    n_steps: int | None = None,
) -> HookList:
    """Hooks patching the recurrent state between steps (``loops.{r}.hook_{where}``) from
    ``clean_cache`` at each of ``steps``, restricted to ``pos`` if given.

    ``where="state_in"`` at step ``r > 0`` is the state handed over by step ``r - 1`` (after any
    norm between steps); at ``r = 0`` it is the initial state. Families that re-inject the
    prelude output every step (``cfg.injection != "none"``) still see the corrupted input there;
    ``where="injected"`` patches the state after that injection.

    >>> import torch
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_steps=3), seed=0)
    >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 9, 3, 4]])
    >>> clean_logits, clean_cache = model.run_with_cache(clean)
    >>> hooks = patch_state_hooks(model, clean_cache, steps=2, where="state_in", pos=1)
    >>> [name for name, _ in hooks]
    ['loops.2.hook_state_in']
    >>> patched = model.run_with_hooks(corrupted, fwd_hooks=hooks)
    >>> torch.equal(patched[:, 0], model(corrupted)[:, 0])    # causal: position 0 is untouched
    True
    """
    depth = _resolve_depth(model, n_steps, ("clean_cache", clean_cache))
    names = state_hook_names(model, where, steps, n_steps=depth)
    return [(n, _ReplaceHook(_cached(clean_cache, n, "clean_cache"), pos, None, "patch")) for n in names]


def ablate_state_hooks(
    model: Any,
    steps: StepsArg = None,
    where: str = "state_in",
    mode: AblationMode = "zero",
    mean_cache: Any = None,
    pos: PosArg = None,
    *,
    n_steps: int | None = None,
) -> HookList:
    """Hooks zero- or mean-ablating the recurrent state ``loops.{r}.hook_{where}`` at ``steps``.

    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_steps=3), seed=0)
    >>> [name for name, _ in ablate_state_hooks(model, steps=[0, 1], mode="mean")]
    ['loops.0.hook_state_in', 'loops.1.hook_state_in']
    """
    depth = _resolve_depth(model, n_steps, ("mean_cache", mean_cache))
    names = state_hook_names(model, where, steps, n_steps=depth)
    return [(n, _ReplaceHook(_ablation_value(mode, mean_cache, n), pos, None, f"{mode}-ablation")) for n in names]


# ---------------------------------------------------------------------------- generic_activation_patch
def cycle_index_df(
    model: Any,
    layer_in_cycle: int,
    steps: StepsArg = None,
    n_pos: int | None = None,
    n_heads: int | None = None,
    *,
    n_steps: int | None = None,
) -> pd.DataFrame:
    """An ``index_df`` for ``transformer_lens.patching.generic_activation_patch`` sweeping one
    layer of the cycle over ``(step, pos)`` (and ``head`` when ``n_heads`` is given).

    Columns ``layer`` (the *effective* index of ``layer_in_cycle`` at each step), ``pos`` and
    optionally ``head``, the index layout of TransformerLens's ``layer_pos_patch_setter`` and
    ``layer_pos_head_vector_patch_setter``. Rows run step by step, then position, so the flat
    result reshapes to ``[len(steps), n_pos(, n_heads)]``; ``model.schedule.locate(layer)``
    gives a row's ``(step, layer_in_cycle)`` back. Each run still patches one step (one hook):
    for all steps at once use :func:`get_act_patch_cycle`.

    >>> import torch
    >>> from transformer_lens import patching
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_prelude_layers=1,
    ...                                              n_core_layers=2, n_steps=3), seed=0)
    >>> clean, corrupted = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 9, 3]])
    >>> _, clean_cache = model.run_with_cache(clean)
    >>> df = cycle_index_df(model, layer_in_cycle=1, n_pos=3)
    >>> df["layer"].unique().tolist()
    [2, 4, 6]
    >>> out = patching.generic_activation_patch(model, corrupted, clean_cache, lambda l: l[0, -1, 5],
    ...     patching.layer_pos_patch_setter, "resid_pre", index_df=df)
    >>> out.reshape(3, 3).shape                                    # [step, pos]
    torch.Size([3, 3])
    """
    depth = _resolve_depth(model, n_steps)
    schedule = _schedule(model, depth)
    j = _check_layer_in_cycle(layer_in_cycle, schedule)
    if n_pos is None or isinstance(n_pos, bool) or not isinstance(n_pos, int) or n_pos < 1:
        raise InputError(f"n_pos must be a positive int (the corrupted prompt's length), got {n_pos!r}")
    layers = [schedule.index(r, j) for r in _resolve_steps(steps, depth)]
    axes: list[Iterable[int]] = [layers, range(n_pos)]
    columns = ["layer", "pos"]
    if n_heads is not None:
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
            raise InputError(f"n_heads must be a positive int, got {n_heads!r}")
        axes.append(range(n_heads))
        columns.append("head")
    return pd.DataFrame(list(itertools.product(*axes)), columns=columns)


# ---------------------------------------------------------------------------- sweeps
def _axis_range(axis: str, model: Any, schedule: Schedule, n_pos: int, hook_name: str | None) -> int:
    if axis == "layer_in_cycle":
        return schedule.layers_per_step
    if axis == "step":
        return schedule.n_steps
    if axis == "pos":
        return n_pos
    assert hook_name is not None
    return _n_heads(model, hook_name)


def _sweep(
    model: Any,
    corrupted_tokens: torch.Tensor,
    patching_metric: Callable[[torch.Tensor], Any],
    depth: int,
    axis_sizes: list[int],
    hooks_for: Callable[[dict[int, int]], HookList],
) -> torch.Tensor:
    if not isinstance(corrupted_tokens, torch.Tensor) or corrupted_tokens.ndim != 2:
        raise InputError("corrupted_tokens must be a LongTensor [batch, pos]")
    values = []
    with torch.no_grad():
        for index in itertools.product(*(range(n) for n in axis_sizes)):
            logits = model.run_with_hooks(
                corrupted_tokens, fwd_hooks=hooks_for(dict(enumerate(index))), n_steps=depth, force=True
            )
            values.append(torch.as_tensor(patching_metric(logits)).detach())
    out = torch.stack(values)
    return out.reshape(*axis_sizes, *out.shape[1:])


@exclusive
def get_act_patch_cycle(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: Callable[[Float[torch.Tensor, "batch pos d_vocab"]], Any],
    activation_name: str = "resid_pre",
    steps: StepsArg = None,
    index_axis_names: Sequence[str] = ("layer_in_cycle", "pos"),
    *,
    n_steps: int | None = None,
) -> torch.Tensor:
    """Patch each layer of the cycle at *all* ``steps`` at once: ``[layer_in_cycle, pos]``.

    Cell ``[j, p]`` is the metric of the corrupted run with ``activation_name`` of layer ``j``
    of the cycle replaced by the clean activation at position ``p``, at every chosen step in
    the same run. ``index_axis_names`` is any ordering of a subset of ``("layer_in_cycle",
    "pos", "head")``; an axis left out is patched whole (leaving out ``layer_in_cycle`` patches
    every layer of the step). With ``steps=r`` (one step) the result equals the rows of
    ``transformer_lens.patching.get_act_patch_resid_pre`` for that step's layers.

    >>> import torch
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2,
    ...                                              n_steps=3), seed=0)
    >>> clean, corrupted = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 9, 3]])
    >>> _, clean_cache = model.run_with_cache(clean)
    >>> get_act_patch_cycle(model, corrupted, clean_cache, lambda l: l[0, -1, 5]).shape
    torch.Size([2, 3])
    >>> get_act_patch_cycle(model, corrupted, clean_cache, lambda l: l[0, -1, 5], "z",
    ...                     index_axis_names=("layer_in_cycle", "head")).shape
    torch.Size([2, 4])
    """
    return _sweep(model, corrupted_tokens, patching_metric,
                  *_cycle_plan(model, corrupted_tokens, clean_cache, activation_name, steps, index_axis_names, n_steps))


def _cycle_plan(
    model: Any, corrupted_tokens: Any, clean_cache: Any, activation_name: str, steps: StepsArg,
    index_axis_names: Sequence[str], n_steps: int | None,
) -> tuple[int, list[int], Callable[[dict[int, int]], HookList]]:
    """``(depth, axis sizes, hooks of a cell)`` of :func:`get_act_patch_cycle`."""
    depth = _resolve_depth(model, n_steps, ("clean_cache", clean_cache))
    schedule = _schedule(model, depth)
    axes = list(index_axis_names)
    allowed = ("layer_in_cycle", "pos", "head")
    if not axes or any(a not in allowed for a in axes) or len(set(axes)) != len(axes):
        raise InputError(f"index_axis_names must be distinct names from {allowed}, got {tuple(index_axis_names)}")
    names_by_layer = [cycle_hook_names(model, activation_name, j, steps, n_steps=depth) for j in range(schedule.layers_per_step)]
    if "head" in axes:
        _check_head(model, names_by_layer[0][0], 0)
    for names in names_by_layer:
        for n in names:
            _cached(clean_cache, n, "clean_cache")
    sizes = [_axis_range(a, model, schedule, int(corrupted_tokens.shape[-1]), names_by_layer[0][0]) for a in axes]

    def hooks_for(index: dict[int, int]) -> HookList:
        at = {axes[k]: v for k, v in index.items()}
        layers = [at["layer_in_cycle"]] if "layer_in_cycle" in at else range(schedule.layers_per_step)
        return [
            (n, _ReplaceHook(_cached(clean_cache, n, "clean_cache"), at.get("pos"), at.get("head"), "patch"))
            for j in layers
            for n in names_by_layer[j]
        ]

    return depth, sizes, hooks_for


@exclusive
def get_act_patch_state(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: Callable[[Float[torch.Tensor, "batch pos d_vocab"]], Any],
    where: str = "state_in",
    index_axis_names: Sequence[str] = ("step", "pos"),
    *,
    n_steps: int | None = None,
) -> torch.Tensor:
    """Patch the recurrent state step by step: ``[step, pos]``.

    Cell ``[r, p]`` is the metric of the corrupted run with ``loops.{r}.hook_{where}`` replaced
    by the clean state at position ``p`` (one step per run). ``index_axis_names`` is
    ``("step", "pos")``, ``("pos", "step")`` or ``("step",)`` (the whole state of a step).

    >>> import torch
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_steps=3), seed=0)
    >>> clean, corrupted = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 9, 3]])
    >>> clean_logits, clean_cache = model.run_with_cache(clean)
    >>> out = get_act_patch_state(model, corrupted, clean_cache, lambda l: l[0, -1, 5], index_axis_names=("step",))
    >>> out.shape, bool(torch.isclose(out[0], clean_logits[0, -1, 5]))   # step 0 gets the whole clean state
    (torch.Size([3]), True)
    """
    return _sweep(model, corrupted_tokens, patching_metric,
                  *_state_plan(model, corrupted_tokens, clean_cache, where, index_axis_names, n_steps))


def _state_plan(
    model: Any, corrupted_tokens: Any, clean_cache: Any, where: str, index_axis_names: Sequence[str],
    n_steps: int | None,
) -> tuple[int, list[int], Callable[[dict[int, int]], HookList]]:
    """``(depth, axis sizes, hooks of a cell)`` of :func:`get_act_patch_state`."""
    depth = _resolve_depth(model, n_steps, ("clean_cache", clean_cache))
    schedule = _schedule(model, depth)
    axes = list(index_axis_names)
    if "step" not in axes or any(a not in ("step", "pos") for a in axes) or len(set(axes)) != len(axes):
        raise InputError(f"index_axis_names must be ('step', 'pos'), ('pos', 'step') or ('step',), got {tuple(index_axis_names)}")
    names = state_hook_names(model, where, None, n_steps=depth)
    for n in names:
        _cached(clean_cache, n, "clean_cache")
    sizes = [_axis_range(a, model, schedule, int(corrupted_tokens.shape[-1]), None) for a in axes]

    def hooks_for(index: dict[int, int]) -> HookList:
        at = {axes[k]: v for k, v in index.items()}
        n = names[at["step"]]
        return [(n, _ReplaceHook(_cached(clean_cache, n, "clean_cache"), at.get("pos"), None, "patch"))]

    return depth, sizes, hooks_for


# ---------------------------------------------------------------------------- batched sweeps
MetricArg = Callable[[torch.Tensor], Any] | Mapping[str, Callable[[torch.Tensor], Any]]


def _batched_model(model: Any, clean_cache: Any, batch_size: Any, n_steps: int | None, what: str) -> tuple[Any, int]:
    """``(model, depth)`` for a batched sweep, after the checks every one of them makes."""
    depth = _resolve_depth(model, n_steps, ("clean_cache", clean_cache))
    base = _base_model(model)
    if base.training:
        raise InputError("activation patching needs the model in eval mode (model.eval())")
    if base._any_hooks_attached():
        raise InputError(
            f"{what} runs stacked, resumed forward passes: hooks attached to the model would see the "
            "stacked batch and not fire before the patched operation. Remove them "
            "(model.reset_hooks(including_permanent=True)) or use the one-run-per-patch sweep of "
            "transformer_lens.patching"
        )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be a positive int (patched runs per forward pass), got {batch_size!r}")
    return base, depth


def _tokens(base: Any, corrupted_tokens: Any) -> torch.Tensor:
    if not isinstance(corrupted_tokens, torch.Tensor) or corrupted_tokens.ndim != 2:
        raise InputError("corrupted_tokens must be a LongTensor [batch, pos]")
    return base._validate_tokens(corrupted_tokens)


#: TransformerLens's patch setters that patch one (query) position: the entry of ``index``
#: holding it and the activation's axis of query positions. Their cells run from that
#: position on; any other setter's cells run every position.
_POSITION_SETTERS = {
    "layer_pos_patch_setter": (1, 1),
    "layer_pos_head_vector_patch_setter": (1, 1),
    "layer_head_pos_pattern_patch_setter": (2, 2),
    "layer_head_dest_src_pos_pattern_patch_setter": (2, 2),
}


def _position_setter(patch_setter: Any) -> tuple[int, int] | None:
    from transformer_lens import patching as tl_patching

    for name, where in _POSITION_SETTERS.items():
        if patch_setter is getattr(tl_patching, name, None):
            return where
    return None


def _setter_hook(patch_setter: Callable[..., torch.Tensor], index: list[int], clean: torch.Tensor,
                 where: tuple[int, int] | None, activation: torch.Tensor, hook: HookPoint,
                 start: int = 0) -> torch.Tensor:
    """TransformerLens's patching hook: ``patch_setter(activation, index, clean_activation)``;
    for an activation of positions ``start..`` only, the position and the clean activation are
    shifted to match."""
    if start:
        assert where is not None
        entry, axis = where
        index = [*index[:entry], index[entry] - start, *index[entry + 1 :]]
        clean = clean.narrow(axis, start, clean.shape[axis] - start)
    if clean.shape[1:] != activation.shape[1:] or clean.shape[0] not in (1, activation.shape[0]):
        raise InputError(
            f"clean_cache's {hook.name} has shape {tuple(clean.shape)} but the corrupted run's is "
            f"{tuple(activation.shape)} (prompts must have the same length; the clean batch must match or be 1)"
        )
    return patch_setter(activation, index, clean)


@exclusive
def generic_activation_patch_batched(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: MetricArg,
    patch_setter: Callable[[torch.Tensor, Sequence[int], torch.Tensor], torch.Tensor],
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: pd.DataFrame | None = None,
    return_index_df: bool = False,
    *,
    reduce: str = "scalar",
    baseline: bool = False,
    batch_size: int | None = None,
    verbose: bool = True,
    n_steps: int | None = None,
) -> Any:
    """``transformer_lens.patching.generic_activation_patch``, many patches per forward pass.

    Takes the same arguments and returns the same thing (a tensor ``[*axes]`` or, with an
    ``index_df``, one value per row; a ``PatchingResult`` with ``reduce="none"``,
    ``baseline=True`` or a mapping of several metrics). Cell by cell it computes what
    TransformerLens computes: the corrupted run with ``patch_setter(activation, index,
    clean_activation)`` applied at ``activation_name`` of layer ``index[0]``, the metric(s)
    called once per cell on logits of the corrupted batch's size. Unlike TransformerLens, the
    runs start where they diverge from the unpatched corrupted run (the prefix is computed
    once) and run ``batch_size`` at a time stacked on the batch axis (see ``tl_loop.batched``).

    ``batch_size``: patched runs per forward pass (default: what fits in a quarter of the free
    memory, at most 2048 token rows on a CPU); ``verbose``: a progress bar over cells;
    ``n_steps``: sweep at that depth (the clean cache must be recorded there). Hooks attached
    to the model are refused. ``activation_name`` is a TransformerLens short name (``"z"``) or
    the part of a hook name after ``blocks.{i}.`` (``"ln1.hook_scale"``).

    >>> import torch
    >>> from transformer_lens import patching
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2,
    ...                                              n_steps=2), seed=0)
    >>> clean, corrupted = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 9, 3]])
    >>> _, clean_cache = model.run_with_cache(clean)
    >>> metric = lambda logits: logits[0, -1, 5]
    >>> fast = generic_activation_patch_batched(model, corrupted, clean_cache, metric,
    ...     patching.layer_head_vector_patch_setter, "z", ("layer", "head"), verbose=False)
    >>> fast.shape                                                   # [n_layers, n_heads]
    torch.Size([4, 4])
    >>> slow = patching.generic_activation_patch(model, corrupted, clean_cache, metric,
    ...     patching.layer_head_vector_patch_setter, "z", ("layer", "head"))
    >>> torch.allclose(fast, slow, atol=1e-5)
    True
    """
    from transformer_lens import patching as tl_patching

    base, depth = _batched_model(model, clean_cache, batch_size, n_steps, "generic_activation_patch_batched")
    if reduce not in ("scalar", "mean", "none"):
        raise InputError(f"reduce must be one of ('scalar', 'mean', 'none'), got {reduce!r}")
    if isinstance(patching_metric, Mapping):
        metrics = dict(patching_metric)
        if not metrics:
            raise InputError("patching_metric mapping must contain at least one metric")
    elif callable(patching_metric):
        metrics = {"metric": patching_metric}
    else:
        raise InputError(f"patching_metric must be a callable or a mapping of names to callables, got {patching_metric!r}")
    has_metric_axis = isinstance(patching_metric, Mapping)
    want_result = has_metric_axis or reduce == "none" or baseline
    result_cls = getattr(tl_patching, "PatchingResult", None)
    if want_result and result_cls is None:
        raise InputError("reduce='mean'/'none', baseline=True and metric mappings need transformer-lens >= 4.0 (PatchingResult)")
    if want_result and return_index_df:
        raise InputError("return_index_df only applies to the tensor return; a PatchingResult carries index_df")
    with base.steps(depth, force=True), torch.no_grad():
        tokens = _tokens(base, corrupted_tokens)
        batch, n_pos = int(tokens.shape[0]), int(tokens.shape[1])
        if index_df is None:
            if index_axis_names is None:
                raise InputError("give index_axis_names (e.g. ('layer', 'pos')) or an index_df")
            n_heads = base.cfg.n_heads
            if activation_name in ("k", "v") and base.cfg.n_key_value_heads is not None:
                n_heads = base.cfg.n_key_value_heads
            ranges = {"layer": base.cfg.n_layers, "pos": n_pos, "head_index": n_heads, "head": n_heads,
                      "src_pos": n_pos, "dest_pos": n_pos}
            unknown = [a for a in index_axis_names if a not in ranges]
            if unknown:
                raise InputError(f"unknown index axis {unknown[0]!r}; axes are {', '.join(ranges)}")
            axis_sizes = [ranges[a] for a in index_axis_names]
            index_df = tl_patching.make_df_from_ranges(axis_sizes, list(index_axis_names))
            flattened = False
        else:
            if index_axis_names is not None:
                raise InputError("give index_axis_names or index_df, not both")
            if not isinstance(index_df, pd.DataFrame) or len(index_df) == 0:
                raise InputError("index_df must be a non-empty pandas DataFrame whose first column is the layer")
            axis_sizes = index_df.max().to_list()
            flattened = True
        rows = [row.to_list() for _, row in index_df.iterrows()]
        clean: dict[int, tuple[str, torch.Tensor]] = {}  # layer -> (hook name, clean activation)
        where = _position_setter(patch_setter)
        cells = []
        for index in rows:
            layer = int(index[0])
            if not 0 <= layer < base.cfg.n_layers:
                raise InputError(f"index_df layer {layer} is out of range: the model runs {base.cfg.n_layers} effective layers")
            if layer not in clean:
                name = f"blocks.{layer}.{_block_suffix(base, activation_name, depth, layer)}"
                clean[layer] = name, _cached(clean_cache, name, "clean_cache").to(tokens.device)
            name, value = clean[layer]
            pos = int(index[where[0]]) if where is not None else 0
            hook = functools.partial(_setter_hook, patch_setter, index, value, where)
            cells.append(Cell(((name, hook),), pos=pos if 0 <= pos < n_pos else 0))
        evaluate = scalar_evaluate(metrics, batch, reduce != "scalar", reduce)
        values, corrupted_logits = run_cells(base, tokens, cells, evaluate, batch_size=batch_size, verbose=verbose,
                                             desc=f"patching {activation_name}")
        cell_shape = (len(rows),) if flattened else tuple(axis_sizes)
        store = torch.zeros((len(metrics), *cell_shape, *((batch,) if reduce != "scalar" else ())),
                            device=getattr(base.cfg, "device", None))
        for c, (index, value) in enumerate(zip(rows, values)):
            store[(slice(None), c) if flattened else (slice(None), *index)] = value.to(store.dtype)
        baseline_values = evaluate(corrupted_logits).to(store.dtype) if baseline else None
    if reduce == "mean":
        store = store.mean(dim=-1)
        baseline_values = None if baseline_values is None else baseline_values.mean(dim=-1)
    if not want_result:
        return (store[0], index_df) if return_index_df else store[0]
    return result_cls(
        values=store if has_metric_axis else store[0],
        axis_names=[] if flattened else list(index_axis_names or []),
        index_df=index_df,
        metric_names=list(metrics),
        reduced=reduce != "none",
        baseline=None if baseline_values is None else (baseline_values if has_metric_axis else baseline_values[0]),
        has_metric_axis=has_metric_axis,
    )


def _tl_sweep(name: str, setter: str, activation: str, axes: tuple[str, ...], shape: str) -> Callable[..., Any]:
    """The batched twin of ``transformer_lens.patching.<name>`` (a partial of its generic sweep)."""

    @exclusive
    def sweep(
        model: Any,
        corrupted_tokens: Int[torch.Tensor, "batch pos"],
        clean_cache: Any,
        patching_metric: MetricArg,
        batch_size: int | None = None,
        *,
        reduce: str = "scalar",
        baseline: bool = False,
        verbose: bool = True,
        n_steps: int | None = None,
    ) -> Any:
        from transformer_lens import patching as tl_patching

        return generic_activation_patch_batched(
            model, corrupted_tokens, clean_cache, patching_metric, getattr(tl_patching, setter), activation, axes,
            reduce=reduce, baseline=baseline, batch_size=batch_size, verbose=verbose, n_steps=n_steps,
        )

    sweep.__name__ = sweep.__qualname__ = f"{name}_batched"
    sweep.__doc__ = (
        f"``transformer_lens.patching.{name}`` (``{shape}``), computed by "
        "``generic_activation_patch_batched``: same arguments and result (``reduce``, ``baseline`` and "
        "metric mappings included), plus ``batch_size``, ``verbose`` and ``n_steps``."
    )
    return sweep


_POS, _HEAD_POS, _HEAD = "layer_pos_patch_setter", "layer_pos_head_vector_patch_setter", "layer_head_vector_patch_setter"
get_act_patch_resid_pre_batched = _tl_sweep("get_act_patch_resid_pre", _POS, "resid_pre", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_resid_mid_batched = _tl_sweep("get_act_patch_resid_mid", _POS, "resid_mid", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_attn_out_batched = _tl_sweep("get_act_patch_attn_out", _POS, "attn_out", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_mlp_out_batched = _tl_sweep("get_act_patch_mlp_out", _POS, "mlp_out", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_attn_head_out_by_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_out_by_pos", _HEAD_POS, "z", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_q_by_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_q_by_pos", _HEAD_POS, "q", ("layer", "pos", "head"), "[n_layers, pos, n_heads]")
get_act_patch_attn_head_k_by_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_k_by_pos", _HEAD_POS, "k", ("layer", "pos", "head"), "[n_layers, pos, n_key_value_heads]")
get_act_patch_attn_head_v_by_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_v_by_pos", _HEAD_POS, "v", ("layer", "pos", "head"), "[n_layers, pos, n_key_value_heads]")
get_act_patch_attn_head_pattern_by_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_pattern_by_pos", "layer_head_pos_pattern_patch_setter", "pattern",
    ("layer", "head_index", "dest_pos"), "[n_layers, n_heads, dest_pos]")
get_act_patch_attn_head_pattern_dest_src_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_pattern_dest_src_pos", "layer_head_dest_src_pos_pattern_patch_setter", "pattern",
    ("layer", "head_index", "dest_pos", "src_pos"), "[n_layers, n_heads, dest_pos, src_pos]")
get_act_patch_attn_head_out_all_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_out_all_pos", _HEAD, "z", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_q_all_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_q_all_pos", _HEAD, "q", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_k_all_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_k_all_pos", _HEAD, "k", ("layer", "head"), "[n_layers, n_key_value_heads]")
get_act_patch_attn_head_v_all_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_v_all_pos", _HEAD, "v", ("layer", "head"), "[n_layers, n_key_value_heads]")
get_act_patch_attn_head_pattern_all_pos_batched = _tl_sweep(
    "get_act_patch_attn_head_pattern_all_pos", "layer_head_pattern_patch_setter", "pattern",
    ("layer", "head_index"), "[n_layers, n_heads]")

get_act_patch_resid_pre_batched.__doc__ = """``transformer_lens.patching.get_act_patch_resid_pre``
    (``[n_layers, pos]`` over the full effective depth), computed by ``generic_activation_patch_batched``.

    >>> import torch
    >>> from transformer_lens import patching
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_prelude_layers=1,
    ...                                              n_core_layers=2, n_steps=3, injection="add"), seed=0)
    >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 9, 3, 4]])
    >>> _, clean_cache = model.run_with_cache(clean)
    >>> metric = lambda logits: logits[0, -1, 5]
    >>> fast = get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric, batch_size=5, verbose=False)
    >>> fast.shape                                                   # [n_layers, pos]
    torch.Size([7, 4])
    >>> torch.allclose(fast, patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric), atol=1e-5)
    True
    """


def _every(
    sweeps: Sequence[Callable[..., Any]], axes: Sequence[tuple[str, ...]], model: Any, corrupted_tokens: Any,
    clean_cache: Any, metric: MetricArg, reduce: str, baseline: bool, batch_size: int | None, verbose: bool,
    n_steps: int | None,
) -> list[Any]:
    """TransformerLens's ``_run_sweeps``: every sweep of an ``*_every`` helper, the baseline once."""
    from transformer_lens import patching as tl_patching

    results = []
    for i, (sweep, names) in enumerate(zip(sweeps, axes)):
        out = sweep(model, corrupted_tokens, clean_cache, metric, batch_size, reduce=reduce,
                    baseline=baseline and i == 0, verbose=verbose, n_steps=n_steps)
        if baseline and isinstance(out, torch.Tensor):
            out = tl_patching.PatchingResult(
                values=out, axis_names=list(names), metric_names=["metric"], reduced=True,
                index_df=tl_patching.make_df_from_ranges(list(out.shape), list(names)))
        results.append(out)
    return results


def _stack_every(results: list[Any], axis_order: tuple[str, ...], n_heads: int, type_names: tuple[str, ...],
                 head_sweep: bool, pattern_by_pos: bool) -> Any:
    """Stack the sweeps of an ``*_every`` helper as TransformerLens does."""
    if all(isinstance(r, torch.Tensor) for r in results):
        tensors = list(results)
        if head_sweep:  # GQA k / v padded to n_heads; the by-pos pattern sweep is [layer, head, pos]
            for i in (2, 3):
                tensors[i] = torch.nn.functional.pad(tensors[i], (0, n_heads - tensors[i].size(-1)))
            if pattern_by_pos:
                tensors[4] = tensors[4].transpose(-1, -2)
        return torch.stack(tensors, dim=0)
    from transformer_lens import patching as tl_patching

    stack = getattr(tl_patching, "_stack_patch_types", None)
    if stack is None:
        raise InputError("per-example or multi-metric *_every sweeps need transformer-lens >= 4.0")
    return stack(results, axis_order=axis_order, n_heads=n_heads, type_names=type_names)


def _every_sweep(name: str, parts: tuple[Callable[..., Any], ...], axes: tuple[tuple[str, ...], ...],
                 axis_order: tuple[str, ...], type_names: tuple[str, ...], shape: str) -> Callable[..., Any]:
    @exclusive
    def sweep(
        model: Any,
        corrupted_tokens: Int[torch.Tensor, "batch pos"],
        clean_cache: Any,
        metric: MetricArg,
        batch_size: int | None = None,
        *,
        reduce: str = "scalar",
        baseline: bool = False,
        verbose: bool = True,
        n_steps: int | None = None,
    ) -> Any:
        results = _every(parts, axes, model, corrupted_tokens, clean_cache, metric, reduce, baseline, batch_size,
                         verbose, n_steps)
        n_heads = int(_base_model(model).cfg.n_heads) if "head" in axis_order else 0
        return _stack_every(results, axis_order, n_heads, type_names, "head" in axis_order, "pos" in axis_order)

    sweep.__name__ = sweep.__qualname__ = f"{name}_batched"
    sweep.__doc__ = (
        f"``transformer_lens.patching.{name}`` (``{shape}``: {', '.join(type_names)}), each sweep batched; "
        "same arguments and result, plus ``batch_size``, ``verbose`` and ``n_steps``."
    )
    return sweep


get_act_patch_block_every_batched = _every_sweep(
    "get_act_patch_block_every",
    (get_act_patch_resid_pre_batched, get_act_patch_attn_out_batched, get_act_patch_mlp_out_batched),
    (("layer", "pos"),) * 3, ("layer", "pos"), ("resid_pre", "attn_out", "mlp_out"), "[3, n_layers, pos]")
get_act_patch_attn_head_all_pos_every_batched = _every_sweep(
    "get_act_patch_attn_head_all_pos_every",
    (get_act_patch_attn_head_out_all_pos_batched, get_act_patch_attn_head_q_all_pos_batched,
     get_act_patch_attn_head_k_all_pos_batched, get_act_patch_attn_head_v_all_pos_batched,
     get_act_patch_attn_head_pattern_all_pos_batched),
    (("layer", "head"),) * 4 + (("layer", "head_index"),), ("layer", "head"),
    ("out", "q", "k", "v", "pattern"), "[5, n_layers, n_heads]")
get_act_patch_attn_head_by_pos_every_batched = _every_sweep(
    "get_act_patch_attn_head_by_pos_every",
    (get_act_patch_attn_head_out_by_pos_batched, get_act_patch_attn_head_q_by_pos_batched,
     get_act_patch_attn_head_k_by_pos_batched, get_act_patch_attn_head_v_by_pos_batched,
     get_act_patch_attn_head_pattern_by_pos_batched),
    (("layer", "pos", "head"),) * 4 + (("layer", "head_index", "dest_pos"),), ("layer", "pos", "head"),
    ("out", "q", "k", "v", "pattern"), "[5, n_layers, pos, n_heads]")


# ---------------------------------------------------------------------------- batched loop sweeps
def _sweep_batched(
    model: Any,
    corrupted_tokens: torch.Tensor,
    patching_metric: Callable[[torch.Tensor], Any],
    depth: int,
    axis_sizes: list[int],
    hooks_for: Callable[[dict[int, int]], HookList],
    batch_size: int | None,
    verbose: bool,
    clean_cache: Any,
    what: str,
) -> torch.Tensor:
    """:func:`_sweep` through the batched engine."""
    base, _ = _batched_model(model, clean_cache, batch_size, depth, what)
    with base.steps(depth, force=True), torch.no_grad():
        tokens = _tokens(base, corrupted_tokens)
        cells = [Cell(tuple(hooks_for(dict(enumerate(index)))))
                 for index in itertools.product(*(range(n) for n in axis_sizes))]
        values, _ = run_cells(base, tokens, cells, lambda logits: torch.as_tensor(patching_metric(logits)).detach(),
                              batch_size=batch_size, verbose=verbose, desc=what)
    out = torch.stack(values)
    return out.reshape(*axis_sizes, *out.shape[1:])


@exclusive
def get_act_patch_cycle_batched(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: Callable[[Float[torch.Tensor, "batch pos d_vocab"]], Any],
    activation_name: str = "resid_pre",
    steps: StepsArg = None,
    index_axis_names: Sequence[str] = ("layer_in_cycle", "pos"),
    batch_size: int | None = None,
    *,
    verbose: bool = True,
    n_steps: int | None = None,
) -> torch.Tensor:
    """:func:`get_act_patch_cycle` (same arguments and result), many patched runs per forward
    pass, each started where it first patches (the first chosen step of its layer).

    >>> import torch
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2,
    ...                                              n_steps=3), seed=0)
    >>> clean, corrupted = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 9, 3]])
    >>> _, clean_cache = model.run_with_cache(clean)
    >>> metric = lambda l: l[0, -1, 5]
    >>> fast = get_act_patch_cycle_batched(model, corrupted, clean_cache, metric, "z",
    ...                                    index_axis_names=("layer_in_cycle", "head"), verbose=False)
    >>> torch.allclose(fast, get_act_patch_cycle(model, corrupted, clean_cache, metric, "z",
    ...                                          index_axis_names=("layer_in_cycle", "head")), atol=1e-5)
    True
    """
    plan = _cycle_plan(model, corrupted_tokens, clean_cache, activation_name, steps, index_axis_names, n_steps)
    return _sweep_batched(model, corrupted_tokens, patching_metric, *plan, batch_size, verbose, clean_cache,
                          "get_act_patch_cycle_batched")


@exclusive
def get_act_patch_state_batched(
    model: Any,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache: Any,
    patching_metric: Callable[[Float[torch.Tensor, "batch pos d_vocab"]], Any],
    where: str = "state_in",
    index_axis_names: Sequence[str] = ("step", "pos"),
    batch_size: int | None = None,
    *,
    verbose: bool = True,
    n_steps: int | None = None,
) -> torch.Tensor:
    """:func:`get_act_patch_state` (same arguments and result), many patched runs per forward
    pass, each started at the step it patches.

    >>> import torch
    >>> from tl_loop import HookedLoopedTransformer, LoopedConfig
    >>> model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_steps=3), seed=0)
    >>> clean, corrupted = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 9, 3]])
    >>> _, clean_cache = model.run_with_cache(clean)
    >>> metric = lambda l: l[0, -1, 5]
    >>> torch.allclose(get_act_patch_state_batched(model, corrupted, clean_cache, metric, verbose=False),
    ...                get_act_patch_state(model, corrupted, clean_cache, metric), atol=1e-5)
    True
    """
    plan = _state_plan(model, corrupted_tokens, clean_cache, where, index_axis_names, n_steps)
    return _sweep_batched(model, corrupted_tokens, patching_metric, *plan, batch_size, verbose, clean_cache,
                          "get_act_patch_state_batched")
