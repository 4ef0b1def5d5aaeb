"""Fixed-point convergence of each layer of the recurrent block.

The state of layer ``j`` of the cycle at step ``r`` is ``states[r, j]`` (by default the residual
stream after that layer, ``cache.stack_loop("resid_post")``). A layer has reached its fixed
point when that state stops moving from one step to the next:

* :func:`step_distances` -- ``d(states[r, j], states[r-1, j])`` for ``r >= 1``;
* :func:`distance_to_final` -- ``d(states[r, j], states[-1, j])``;
* :func:`distance_to_reference` -- ``d(states[r, j], reference[j])``, e.g. the state after many
  more steps (see ``tl_loop.analysis.fixed_points``);
* :func:`convergence_step` / :func:`convergence_steps` -- the first step from which every later
  step moves the state by at most ``tol``;
* :func:`residual_stats` -- step distances, norms and matrix entropy of every layer and step.

Distances are ``"l2"``, ``"relative"`` (to the norm of the state compared with) or ``"cosine"``
(``1 - cos``), see ``tl_loop.analysis._common``. Every function takes a tensor
``[step, layer_in_cycle, *token, d_model]`` or a ``LoopedActivationCache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from tl_loop.analysis._common import Metric, first_settled, loop_states, reduce_tokens, vector_distance


def step_distances(
    states: Any, metric: Metric = "relative", per_token: bool = False, name: str = "resid_post"
) -> Float[torch.Tensor, "step_minus_1 layer_in_cycle ..."]:
    """Distance of every layer's state to its state one step earlier.

    Row ``r - 1`` compares step ``r`` with step ``r - 1``. Returns ``[step - 1, layer_in_cycle]``
    (mean over tokens) or ``[step - 1, layer_in_cycle, *token]`` with ``per_token``.

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=4)
    >>> _, cache = HookedLoopedTransformer(cfg, seed=0).run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> step_distances(cache).shape
    torch.Size([3, 2])
    >>> x = torch.tensor([1.0, 0.5, 0.25]).view(3, 1, 1) * torch.ones(3, 1, 4)  # halves every step
    >>> step_distances(x, metric="relative").flatten()
    tensor([0.5000, 0.5000])
    """
    x = loop_states(states, name)
    return reduce_tokens(vector_distance(x[1:], x[:-1], metric), 2, per_token)


def distance_to_final(
    states: Any, metric: Metric = "relative", per_token: bool = False, name: str = "resid_post"
) -> Float[torch.Tensor, "step layer_in_cycle ..."]:
    """Distance of every layer's state at each step to the same layer's state at the last step,
    ``[step, layer_in_cycle]`` (or per token). The last row is 0.

    >>> x = torch.tensor([4.0, 2.0, 1.0]).view(3, 1, 1) * torch.ones(3, 1, 2)
    >>> distance_to_final(x, metric="relative").flatten()
    tensor([3., 1., 0.])
    """
    x = loop_states(states, name)
    return reduce_tokens(vector_distance(x, x[-1:].expand_as(x), metric), 2, per_token)


def distance_to_reference(
    states: Any,
    reference: Float[torch.Tensor, "layer_in_cycle ... d_model"],
    metric: Metric = "relative",
    per_token: bool = False,
    name: str = "resid_post",
) -> Float[torch.Tensor, "step layer_in_cycle ..."]:
    """Distance of every layer's state at each step to ``reference[layer_in_cycle]`` (e.g. the
    approximate fixed point), ``[step, layer_in_cycle]`` (or per token).

    >>> x = torch.tensor([3.0, 2.0]).view(2, 1, 1) * torch.ones(2, 1, 2)
    >>> distance_to_reference(x, torch.ones(1, 2), metric="relative").flatten()
    tensor([2., 1.])
    """
    x = loop_states(states, name)
    return reduce_tokens(vector_distance(x, reference[None].to(x.device).expand_as(x), metric), 2, per_token)


def convergence_step(distances: Float[torch.Tensor, "n ..."], tol: float) -> torch.Tensor:
    """First index ``r`` of axis 0 from which every later distance is ``<= tol``; ``-1`` where the
    last one is above ``tol`` (not converged). Applied to :func:`step_distances` it gives the
    *step* ``r`` from which the state moves by at most ``tol`` per step; applied to a distance to
    a reference, the first step from which the state stays within ``tol`` of it.

    >>> d = torch.tensor([[0.9, 0.8], [0.2, 0.7], [0.01, 0.6]])   # [step - 1, layer_in_cycle]
    >>> convergence_step(d, tol=0.05)                            # layer 1 has not converged
    tensor([ 2, -1])
    """
    return first_settled(distances, tol)


def convergence_steps(
    states: Any,
    tol: float = 1e-3,
    metric: Metric = "relative",
    per_token: bool = False,
    name: str = "resid_post",
) -> torch.Tensor:
    """Step at which each layer of the cycle has converged: ``convergence_step`` of
    ``step_distances``. ``[layer_in_cycle]`` (token-averaged distances) or
    ``[layer_in_cycle, *token]``; ``-1`` where a layer has not converged within the run.

    >>> x = 0.5 ** torch.arange(12.0).view(12, 1, 1)   # one layer, d_model = 1, halves every step
    >>> convergence_steps(x, tol=0.01, metric="l2")   # |x[r+1] - x[r]| = 0.5**(r+1) <= 0.01 from r = 6
    tensor([6])
    """
    return convergence_step(step_distances(states, metric, per_token, name), tol)


@dataclass(frozen=True)
class ResidualStreamStats:
    """Step-to-step movement, norm and matrix entropy of every layer of the cycle."""

    step_distance: Float[torch.Tensor, "step_minus_1 layer_in_cycle ..."]  # see step_distances
    norm: Float[torch.Tensor, "step layer_in_cycle ..."]  # ||state||
    matrix_entropy: Float[torch.Tensor, "step layer_in_cycle"]  # batch mean, see paper_metrics
    metric: str = "relative"


def residual_stats(
    states: Any, metric: Metric = "relative", per_token: bool = False, name: str = "resid_post"
) -> ResidualStreamStats:
    """:func:`step_distances`, norms and the residual-stream matrix entropy in one call (the
    cache-based twin of ``tl_loop.analysis.streaming.ResidualStats``). ``states`` is
    ``[step, layer_in_cycle, batch, pos, d_model]`` or a ``LoopedActivationCache``.

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=4)
    >>> _, cache = HookedLoopedTransformer(cfg, seed=0).run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> s = residual_stats(cache)
    >>> s.step_distance.shape, s.norm.shape, s.matrix_entropy.shape
    (torch.Size([3, 2]), torch.Size([4, 2]), torch.Size([4, 2]))
    """
    from tl_loop.analysis.paper_metrics import matrix_entropy

    x = loop_states(states, name)
    if x.ndim != 5:
        raise ValueError(f"expected states [step, layer_in_cycle, batch, pos, d_model], got {tuple(x.shape)}")
    return ResidualStreamStats(
        step_distance=step_distances(x, metric, per_token),
        norm=reduce_tokens(x.float().norm(dim=-1), 2, per_token),
        matrix_entropy=matrix_entropy(x).mean(-1),
        metric=metric,
    )
