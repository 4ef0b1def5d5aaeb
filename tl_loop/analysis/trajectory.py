"""The trajectory of the recurrent state through the loop: a cycle of fixed points, or one?

At a *cyclic fixed point* every layer ``j`` of the recurrent block converges to its own point
``x*_j``: states stop moving across steps (``d(x[r, j], x[r-1, j]) -> 0``) while consecutive layers
of the cycle stay apart (``d(x[r, j], x[r, j+1]) > 0``). If consecutive layers also coincide, the
whole block has collapsed onto a single point.

* :func:`cycle_distances` -- both kinds of distance, per step;
* :func:`cycle_structure` -- ``"cycle"`` / ``"single_point"`` / ``"not_converged"`` at the last step;
* :func:`detect_period` -- the period of a step-level sequence of states (1: fixed point,
  2: a 2-cycle alternating between two states, ...);
* :func:`pca_trajectory` -- a 2-D / 3-D PCA projection of a token's trajectory, the PCA fitted on
  the states of all steps (and layers); :func:`token_trajectory` picks one token's states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float

from tl_loop.analysis._common import Metric, loop_states, reduce_tokens, vector_distance

CycleKind = Literal["cycle", "single_point", "not_converged"]


@dataclass(frozen=True)
class CycleDistances:
    """Distances within and across steps of the loop (token-averaged unless ``per_token``)."""

    between_layers: Float[torch.Tensor, "step layer_in_cycle ..."]  # d(x[r, j], x[r, (j+1) % L])
    across_steps: Float[torch.Tensor, "step_minus_1 layer_in_cycle ..."]  # d(x[r, j], x[r-1, j])


def cycle_distances(
    states: Any, metric: Metric = "relative", per_token: bool = False, name: str = "resid_post"
) -> CycleDistances:
    """Distances between consecutive layers of the cycle (cyclically: the last layer is compared
    with the first, which is where the next step starts) and across steps.

    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> x = torch.stack([torch.stack([a, b])] * 3)          # [step=3, layer_in_cycle=2, d=2]
    >>> d = cycle_distances(x, metric="l2")
    >>> d.across_steps.max().item(), round(d.between_layers[-1, 0].item(), 4)
    (0.0, 1.4142)
    """
    x = loop_states(states, name)
    nxt = torch.roll(x, shifts=-1, dims=1)
    between = reduce_tokens(vector_distance(x, nxt, metric), 2, per_token)
    across = reduce_tokens(vector_distance(x[1:], x[:-1], metric), 2, per_token)
    return CycleDistances(between, across)


def cycle_structure(
    states: Any, tol: float = 1e-2, metric: Metric = "relative", name: str = "resid_post"
) -> CycleKind:
    """Classify the block's limit from the last step (token-averaged distances):

    * ``"not_converged"``: some layer still moves by more than ``tol`` between the last two steps;
    * ``"single_point"``: converged, and every pair of consecutive layers is within ``tol`` (the
      layers collapse onto one point; always the case for a one-layer block);
    * ``"cycle"``: converged, and at least two consecutive layers are further than ``tol`` apart:
      a stable cycle of distinct fixed points.

    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> two_points, one_point = torch.stack([torch.stack([a, b])] * 3), torch.stack([torch.stack([a, a])] * 3)
    >>> cycle_structure(two_points), cycle_structure(one_point)
    ('cycle', 'single_point')
    """
    d = cycle_distances(states, metric, per_token=False, name=name)
    if d.across_steps.shape[0] == 0:
        raise ValueError("cycle_structure needs at least two steps")
    if bool((d.across_steps[-1] > tol).any()):
        return "not_converged"
    return "cycle" if bool((d.between_layers[-1] > tol).any()) else "single_point"


def detect_period(
    states: Float[torch.Tensor, "step ... d_model"],
    tol: float = 1e-3,
    max_period: int | None = None,
    window: int | None = None,
    metric: Metric = "relative",
) -> torch.Tensor:
    """Period of a step-level sequence of states ``[step, *token, d_model]`` (e.g. the state after
    the last layer of the cycle, ``states[:, -1]``).

    The period is the smallest ``p`` in ``1..max_period`` such that ``d(x[r], x[r - p]) <= tol``
    for every ``r`` in the last ``window`` steps (default: the second half of the run, at least
    ``2 * max_period`` steps long); 1 means a fixed point, 2 a 2-cycle. ``0`` where no period is
    found. Returns an int64 tensor ``[*token]``.

    >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5])
    >>> detect_period(torch.stack([a, b] * 6)).item(), detect_period(torch.stack([a] * 12)).item()
    (2, 1)
    """
    n = states.shape[0]
    max_period = max_period if max_period is not None else max(1, n // 4)
    window = window if window is not None else max(n // 2, 2 * max_period)
    window = min(window, n - 1)
    if n < 2 or window < 1:
        raise ValueError(f"detect_period needs at least 2 steps, got {n}")
    period = torch.zeros(states.shape[1:-1], dtype=torch.long, device=states.device)
    for p in range(1, max_period + 1):
        start = max(n - window, p)
        if start >= n:
            break
        d = vector_distance(states[start:], states[start - p : n - p], metric)  # [w, *token]
        found = (d <= tol).all(0) & (period == 0)
        period = torch.where(found, torch.full_like(period, p), period)
    return period


@dataclass(frozen=True)
class PCAProjection:
    """Principal-component coordinates of states, with the fitted basis."""

    coords: Float[torch.Tensor, "... k"]  # projection of the input states
    components: Float[torch.Tensor, "k d_model"]  # orthonormal principal directions
    mean: Float[torch.Tensor, "d_model"]  # noqa: F821 - centre the PCA was fitted around
    explained_variance_ratio: Float[torch.Tensor, "k"]  # noqa: F821 - fraction of the variance per component


def pca_trajectory(
    states: Float[torch.Tensor, "... d_model"],
    n_components: int = 2,
    fit_on: Float[torch.Tensor, "... d_model"] | None = None,
) -> PCAProjection:
    """Project states onto the top principal components of ``fit_on`` (default: the states
    themselves, i.e. every step and layer of the trajectory). ``states`` is usually one token's
    trajectory ``[step, layer_in_cycle, d_model]`` (see :func:`token_trajectory`); ``fit_on``
    may hold the states of all tokens.

    >>> x = torch.zeros(6, 1, 5); x[:, 0, 0] = torch.arange(6.0)     # a line along axis 0
    >>> p = pca_trajectory(x, n_components=2)
    >>> p.coords.shape, round(p.explained_variance_ratio[0].item(), 4)
    (torch.Size([6, 1, 2]), 1.0)
    """
    x = states.float()
    fit = (x if fit_on is None else fit_on.float()).reshape(-1, x.shape[-1])
    if n_components > min(fit.shape):
        raise ValueError(f"n_components={n_components} exceeds min(n_states, d_model) = {min(fit.shape)}")
    mean = fit.mean(0)
    _, s, vh = torch.linalg.svd(fit - mean, full_matrices=False)
    var = s.pow(2)
    comps = vh[:n_components]
    # Deterministic signs: the largest-magnitude loading of each component is positive.
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True))).squeeze(1)
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    ratio = var[:n_components] / var.sum().clamp_min(1e-30)
    return PCAProjection((x - mean) @ comps.T, comps, mean, ratio)


def token_trajectory(
    cache: Any, batch: int = 0, pos: int = -1, name: str = "resid_post"
) -> Float[torch.Tensor, "step layer_in_cycle d_model"]:
    """One token's states through the loop, ``[step, layer_in_cycle, d_model]``.

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=5)
    >>> _, cache = HookedLoopedTransformer(cfg, seed=0).run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> pca_trajectory(token_trajectory(cache), n_components=3).coords.shape
    torch.Size([5, 2, 3])
    """
    x = loop_states(cache, name)
    return x[:, :, batch, pos]
