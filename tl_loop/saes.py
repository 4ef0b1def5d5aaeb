"""Sparse autoencoders per step of the loop (SAELens or any ``nn.Module`` with HookPoints).

* Splice a trained SAE with ``model.splice("hook_resid_post", sae, layer_in_cycle=0)``: it runs
  at that layer of the cycle at every step, and its own hook points are cached per step
  (``blocks.{i}.hook_resid_post.hook_sae_acts_post``, see ``tl_loop.splice``).
  :func:`sae_acts_by_step` stacks them as ``[step, batch, pos, d_sae]``.
* Train one SAE on the states of every step pooled together: :func:`step_activations` collects
  ``[step, n_tokens, d_model]``, and :func:`activation_batches` feeds them, shuffled, to a
  trainer that reads an iterator of batches (SAELens's ``SAETrainer(cfg, sae, data_provider)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from jaxtyping import Float

from tl_loop.errors import InputError
from tl_loop.threads import exclusive


@exclusive
@torch.no_grad()
def step_activations(
    model: Any, tokens: Any, hook: str = "hook_resid_post", layer_in_cycle: int = 0, **forward_kwargs: Any
) -> Float[torch.Tensor, "step token d"]:
    """``blocks.{i}.{hook}`` at layer ``layer_in_cycle`` of the cycle at every step, every token
    of the batch flattened: ``[n_steps, batch * pos, d]``."""
    n_steps = forward_kwargs.pop("n_steps", None)
    with model.steps(n_steps) if n_steps is not None else nullcontext():
        names = [f"blocks.{i}.{hook}" for i in model.schedule.loop_indices(layer_in_cycle)]
        _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None, **forward_kwargs)
        return torch.stack([cache[name].flatten(0, -2) for name in names])


def activation_batches(
    activations: Float[torch.Tensor, "... d"], batch_size: int, seed: int = 0
) -> Iterator[Float[torch.Tensor, "batch d"]]:
    """Endless shuffled batches of the rows of ``activations`` (all leading axes pooled), each
    epoch a fresh permutation."""
    rows = activations.reshape(-1, activations.shape[-1])
    if not 0 < batch_size <= len(rows):
        raise InputError(f"batch_size must be in [1, {len(rows)}] (the number of activations), got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=gen)
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield rows[order[start : start + batch_size]]


def sae_acts_by_step(
    cache: Any, hook: str = "hook_resid_post", layer_in_cycle: int = 0, point: str = "hook_sae_acts_post"
) -> Float[torch.Tensor, "step batch pos d_sae"]:
    """A spliced SAE's hook point ``point`` at every step, ``[n_steps, batch, pos, d_sae]``, from a
    cache of a model with the SAE spliced at ``hook`` (layer ``layer_in_cycle`` of the cycle)."""
    names = [f"blocks.{i}.{hook}.{point}" for i in cache.schedule.loop_indices(layer_in_cycle)]
    missing = [n for n in names if n not in cache.cache_dict]
    if missing:
        raise InputError(f"the cache holds no {missing[0]!r}: splice the SAE at {hook!r} and cache its hook points")
    return torch.stack([cache[name] for name in names])

