"""Stages of inference along effective depth, for looped and feedforward models alike.

For every effective layer ``i`` the residual stream after the layer (``blocks.{i}.hook_resid_post``)
is read out with the logit lens (the model's final norm, then the unembedding) and compared with
the final prediction (the logit lens of the last layer, which is the model's output whenever
``ln_final`` reads the last block's output -- every layout of this library except a loop norm
with no coda; pass ``final_logits`` to compare with something else):

* ``entropy``             entropy (nats) of the layer's next-token distribution;
* ``rank``                rank of the final prediction (its argmax) there, 1 = top;
* ``prob``                probability the layer gives the final prediction;
* ``kl_to_final``         ``KL(p_final || p_layer)`` (nats);
* ``cosine_to_previous``  cosine of the residual stream after layer ``i`` with that after layer
                          ``i - 1`` (for ``i = 0``: with ``blocks.0.hook_resid_pre``);
* ``resid_norm``          ``||resid_post||``.

The same function runs on a ``LoopedActivationCache`` and on the cache of any TransformerLens
model with ``cfg.n_layers``, ``blocks.{i}.hook_resid_post``, ``ln_final``, ``W_U`` and ``b_U``
(``HookedTransformer``, ``TransformerBridge``), so a looped and a feedforward model can be drawn
on one figure (``tl_loop.plot.inference_stages``).
``tl_loop.analysis.streaming.streaming_inference_stages`` computes the same without a cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float

from tl_loop.analysis._common import cosine_similarity

STAGE_FIELDS: tuple[str, ...] = ("entropy", "rank", "prob", "kl_to_final", "cosine_to_previous", "resid_norm")


@dataclass(frozen=True)
class InferenceStages:
    """Logit-lens statistics per effective layer: ``[n_layers]`` or ``[n_layers, *token]``."""

    labels: list[str]  # one per effective layer, e.g. "prelude.0", "core.3.1", "L5"
    entropy: torch.Tensor
    rank: torch.Tensor
    prob: torch.Tensor
    kl_to_final: torch.Tensor
    cosine_to_previous: torch.Tensor
    resid_norm: torch.Tensor

    @property
    def n_layers(self) -> int:
        return len(self.labels)

    @property
    def depth_fraction(self) -> Float[torch.Tensor, "n_layers"]:
        """``(i + 1) / n_layers``: puts models of different depth on one axis."""
        return torch.arange(1, self.n_layers + 1, dtype=torch.float32) / self.n_layers


def logit_lens(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``resid [..., d_model] -> logits [..., d_vocab]``: the model's final norm,
    then its unembedding. For a looped model the norm is a hook-free copy of ``ln_final``, so
    using it inside a hook never fires the model's own hooks."""
    if hasattr(model, "unembed_residual") and hasattr(model, "final_norm"):
        from tl_loop.components.norm import HookedNorm

        cfg = model.cfg
        norm = HookedNorm(model.final_norm, cfg.norm_type, cfg.eps)
        return lambda x: model.unembed_residual(norm(x))
    ln_final, W_U, b_U = model.ln_final, model.W_U, model.b_U
    return lambda x: ln_final(x) @ W_U + b_U


def layer_stage_stats(
    resid: Float[torch.Tensor, "*token d_model"],
    previous: Float[torch.Tensor, "*token d_model"],
    logits: Float[torch.Tensor, "*token d_vocab"],
    final_logprobs: Float[torch.Tensor, "*token d_vocab"],
    target: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The statistics of one layer, per token (shared by the cache and the streaming paths)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    target_logit = logits.float().gather(-1, target[..., None])
    return {
        "entropy": 0.0 - (p * logp).sum(-1),
        "rank": (logits.float() > target_logit).sum(-1).float() + 1.0,
        "prob": p.gather(-1, target[..., None])[..., 0],
        "kl_to_final": (final_logprobs.exp() * (final_logprobs - logp)).sum(-1),
        "cosine_to_previous": cosine_similarity(resid, previous),
        "resid_norm": resid.float().norm(dim=-1),
    }


def layer_labels(model: Any, n_layers: int) -> list[str]:
    schedule = getattr(model, "schedule", None)
    if schedule is not None and len(schedule) == n_layers:
        return [layer.label for layer in schedule]
    return [f"L{i}" for i in range(n_layers)]


def stack_stages(labels: list[str], rows: list[dict[str, torch.Tensor]], per_token: bool) -> InferenceStages:
    fields = {}
    for key in STAGE_FIELDS:
        stacked = torch.stack([row[key] for row in rows])
        fields[key] = stacked if per_token else stacked.flatten(1).mean(-1)
    return InferenceStages(labels=labels, **fields)


@torch.no_grad()
def inference_stages(
    cache: Any,
    model: Any = None,
    final_logits: Float[torch.Tensor, "batch pos d_vocab"] | None = None,
    per_token: bool = False,
) -> InferenceStages:
    """Stages of inference from a cache (see the module docstring). ``model`` defaults to
    ``cache.model``. Logits are formed one layer at a time, so memory stays at one
    ``[batch, pos, d_vocab]`` tensor whatever the depth.

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_prelude_layers=1, n_core_layers=2,
    ...                    n_coda_layers=1, n_steps=3, injection="add")
    >>> _, cache = HookedLoopedTransformer(cfg, seed=0).run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> s = inference_stages(cache)
    >>> s.labels[:3], s.entropy.shape, s.rank[-1].item(), round(s.kl_to_final[-1].item(), 6)
    (['prelude.0', 'core.0.0', 'core.0.1'], torch.Size([8]), 1.0, 0.0)
    """
    model = cache.model if model is None else model
    n = int(model.cfg.n_layers)
    if n == 0:
        raise ValueError("the model has no layers")
    lens = logit_lens(model)
    resid = [cache[f"blocks.{i}.hook_resid_post"] for i in range(n)]
    final = lens(resid[-1]) if final_logits is None else final_logits
    final_logprobs = F.log_softmax(final.float(), dim=-1)
    target = final.argmax(-1)
    previous = cache["blocks.0.hook_resid_pre"]
    rows = []
    for x in resid:
        rows.append(layer_stage_stats(x, previous, lens(x), final_logprobs, target))
        previous = x
    return stack_stages(layer_labels(model, n), rows, per_token)
