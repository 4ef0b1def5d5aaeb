"""Attention stabilisation across the steps of the loop.

Patterns come as ``[step, layer_in_cycle, batch, head, query_pos, key_pos]``
(``cache.stack_loop("pattern")``). Per head and step:

* distance between the head's pattern at step ``r`` and at step ``r - 1`` (:func:`pattern_distance`):
  ``"js"`` -- Jensen-Shannon divergence of each query row, base 2 (in ``[0, 1]``); ``"l1"`` --
  ``sum_k |A_qk - B_qk|`` of each row (in ``[0, 2]``); both averaged over query rows;
* pattern entropy (the paper's mixing score), mass on the first token (sink score), mass on the
  previous token, ColSum concentration;
* the step at which each head stabilises: the first step from which the step-to-step distance
  stays ``<= tol``.

:func:`attention_stabilisation` computes all of these from a cache (or a pattern tensor) and
returns an :class:`AttentionStabilisation`; ``tl_loop.analysis.streaming.AttentionStats``
computes the same numbers during the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float

from tl_loop.analysis._common import first_settled, loop_states
from tl_loop.analysis.paper_metrics import colsum_concentration, mixing_score, sink_rate, sink_score

PatternMetric = Literal["js", "l1"]


def pattern_distance(
    a: Float[torch.Tensor, "... q k"], b: Float[torch.Tensor, "... q k"], metric: PatternMetric = "js"
) -> Float[torch.Tensor, "..."]:
    """Distance between two attention patterns, averaged over query rows.

    >>> p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    >>> pattern_distance(p, p).item(), pattern_distance(torch.eye(2), torch.eye(2).flip(-1), "js").item()
    (0.0, 1.0)
    """
    a, b = a.float(), b.float()
    if metric == "l1":
        return (a - b).abs().sum(-1).mean(-1)
    if metric != "js":
        raise ValueError(f"metric must be 'js' or 'l1', got {metric!r}")
    m = 0.5 * (a + b)
    kl_am = (torch.special.xlogy(a, a) - torch.special.xlogy(a, m)).sum(-1)
    kl_bm = (torch.special.xlogy(b, b) - torch.special.xlogy(b, m)).sum(-1)
    js = (0.5 * (kl_am + kl_bm) / math.log(2.0)).clamp_min(0.0)
    return js.mean(-1)


def previous_token_mass(pattern: Float[torch.Tensor, "... T T"]) -> Float[torch.Tensor, "..."]:
    """Mean attention from each query ``q >= 1`` to key ``q - 1`` (0 when ``T = 1``).

    >>> prev = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> previous_token_mass(prev)
    tensor(1.)
    """
    t = pattern.shape[-1]
    if t < 2:
        return torch.zeros(pattern.shape[:-2], dtype=torch.float32, device=pattern.device)
    return torch.diagonal(pattern.float(), offset=-1, dim1=-2, dim2=-1).mean(-1)


@dataclass(frozen=True)
class AttentionStabilisation:
    """Per-head attention statistics over the steps of the loop (batch-averaged)."""

    distance: Float[torch.Tensor, "step_minus_1 layer_in_cycle head"]  # pattern at r vs r - 1
    entropy: Float[torch.Tensor, "step layer_in_cycle head"]  # mean row entropy (mixing score)
    sink: Float[torch.Tensor, "step layer_in_cycle head"]  # sink score: mean mass on token 0
    previous_token: Float[torch.Tensor, "step layer_in_cycle head"]  # mean mass on token q - 1
    colsum: Float[torch.Tensor, "step layer_in_cycle head"]  # ColSum concentration
    metric: str = "js"

    def stable_step(self, tol: float = 1e-3) -> torch.Tensor:
        """``[layer_in_cycle, head]``: the first step from which the head's pattern changes by at
        most ``tol`` per step (``-1``: still changing at the last step)."""
        return first_settled(self.distance, tol)

    def sink_rate(self, threshold: float = 0.3) -> Float[torch.Tensor, "step"]:  # noqa: F821
        """Per step, the fraction of heads (over all layers of the cycle) with sink score above
        ``threshold``."""
        return sink_rate(self.sink, threshold, dim=(1, 2))


def head_stats(pattern: Float[torch.Tensor, "batch head q k"]) -> dict[str, torch.Tensor]:
    """Batch-averaged per-head statistics of one layer's pattern (``[head]`` each)."""
    return {
        "entropy": mixing_score(pattern).mean(0),
        "sink": sink_score(pattern).mean(0),
        "previous_token": previous_token_mass(pattern).mean(0),
        "colsum": colsum_concentration(pattern).mean(0),
    }


def attention_stabilisation(patterns: Any, metric: PatternMetric = "js") -> AttentionStabilisation:
    """Attention statistics of every head at every step, from a ``LoopedActivationCache`` or a
    tensor ``[step, layer_in_cycle, batch, head, q, k]``.

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=4)
    >>> _, cache = HookedLoopedTransformer(cfg, seed=0).run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> stats = attention_stabilisation(cache)
    >>> stats.distance.shape, stats.entropy.shape, stats.stable_step(tol=1.0).shape
    (torch.Size([3, 2, 4]), torch.Size([4, 2, 4]), torch.Size([2, 4]))
    """
    p = loop_states(patterns, "pattern")
    if p.ndim != 6:
        raise ValueError(f"expected patterns [step, layer_in_cycle, batch, head, q, k], got {tuple(p.shape)}")
    distance = pattern_distance(p[1:], p[:-1], metric).mean(2)  # mean over batch
    return AttentionStabilisation(
        distance=distance,
        entropy=mixing_score(p).mean(2),
        sink=sink_score(p).mean(2),
        previous_token=previous_token_mass(p).mean(2),
        colsum=colsum_concentration(p).mean(2),
        metric=metric,
    )


def head_patterns_across_steps(
    cache: Any, layer_in_cycle: int, head: int, batch: int = 0
) -> Float[torch.Tensor, "step q k"]:
    """One head's pattern at every step, ``[step, q, k]`` (for the Frobenius heat-map and the
    circuitsvis views in ``tl_loop.plot``).

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> from tl_loop.analysis import attention_frobenius_distances
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=4)
    >>> _, cache = HookedLoopedTransformer(cfg, seed=0).run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> attention_frobenius_distances(head_patterns_across_steps(cache, 0, 1)).shape
    torch.Size([4, 4])
    """
    return loop_states(cache, "pattern")[:, layer_in_cycle, batch, head]
