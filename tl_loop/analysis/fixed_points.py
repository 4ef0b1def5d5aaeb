"""Approximate fixed points, the degenerate-fixed-point check and limiting behaviour.

* :func:`approximate_fixed_points` -- each layer's state after many steps (default 128): the
  paper's approximate fixed point ``x*_j`` of layer ``j`` of the cycle.
* :func:`distance_to_fixed_point` -- distance of each layer at each step of a (shorter) run to
  ``x*_j``; streamed, so no cache of either run is kept.
* :func:`degenerate_fixed_point` -- do all layers of the cycle collapse onto one point?
* :func:`classify_limiting_behaviour` / :func:`limiting_behaviour` -- per token, *fixed point*,
  *orbit*, *slider* or *unknown*, from the cosine similarity ``c_r = cos(x_r, x_{S-1})`` of the last
  layer's state at step ``r`` to its final state, over ``S`` steps.

Limiting-behaviour classes (tolerance ``tau = 0.05``, fixed-point fraction ``rho = 0.9`` as in the
paper). Only the *tail window* -- the last ``ceil(tail * S)`` steps, ``tail = 0.5`` -- is judged,
so the transient at the start of the loop does not count:

1. **fixed point**: ``c_r >= 1 - tau`` for at least a fraction ``rho`` of the window's steps (the
   state stays, in direction, at its final value).
2. **orbit**: not a fixed point, and the window's cosines are *periodic without settling*: for
   some period ``2 <= p <= w // 2`` at least a fraction ``rho`` of the window satisfies
   ``|c_r - c_{r-p}| <= tau``, and the sequence changes direction (rises and falls by more than
   ``tau``) at least twice -- the state keeps returning to its final value (e.g. a 2-cycle
   alternating between two states).
3. **slider**: neither, and the window's cosines drift steadily towards the final state: at
   least a fraction ``rho`` of the steps strictly increase ``c`` (``c_{r+1} > c_r``) and ``c``
   rises by more than ``tau`` over the window (the state keeps moving, e.g. it rotates slowly or
   slides along a direction; a state that sits still and jumps at the end is not a slider).
4. **unknown**: anything else (irregular motion, or a window too short to tell).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from tl_loop.analysis._common import Metric, cosine_similarity, vector_distance
from tl_loop.hook_names import block_hook
from tl_loop.threads import exclusive

LIMITING_CLASSES: tuple[str, ...] = ("fixed_point", "orbit", "slider", "unknown")
FIXED_POINT, ORBIT, SLIDER, UNKNOWN = range(4)


@exclusive
@torch.no_grad()
def approximate_fixed_points(
    model: Any, tokens: Any, ref_steps: int = 128, name: str = "resid_post", **forward_kwargs: Any
) -> Float[torch.Tensor, "layer_in_cycle batch pos d_model"]:
    """The state of every layer of the cycle after ``ref_steps`` steps (only those hooks are
    cached), ``[layer_in_cycle, batch, pos, d_model]``.

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=4)
    >>> model = HookedLoopedTransformer(cfg, seed=0)
    >>> approximate_fixed_points(model, torch.tensor([[1, 2, 3]]), ref_steps=16).shape
    torch.Size([2, 1, 3, 16])
    """
    from tl_loop.schedule import Schedule

    if model.check_n_steps(ref_steps, force=True) < 1:
        raise ValueError("ref_steps must be >= 1")
    schedule = Schedule.from_config(model.cfg, ref_steps)
    names = [block_hook(i, name) for i in schedule.step_indices(ref_steps - 1)]
    _, cache = model.run_with_cache(
        tokens,
        n_steps=ref_steps,
        force=True,
        names_filter=names,
        return_type=None,
        return_cache_object=False,
        **forward_kwargs,
    )
    return torch.stack([cache[n] for n in names])


@exclusive
@torch.no_grad()
def distance_to_fixed_point(
    model: Any,
    tokens: Any,
    n_steps: int | None = None,
    ref_steps: int = 128,
    metric: Metric = "relative",
    per_token: bool = False,
    name: str = "resid_post",
    **forward_kwargs: Any,
) -> Float[torch.Tensor, "step layer_in_cycle ..."]:
    """Distance of every layer at every step of an ``n_steps`` run (default ``cfg.n_steps``) to its
    approximate fixed point (:func:`approximate_fixed_points` at ``ref_steps``). Two forward
    passes, neither cached. ``[n_steps, layer_in_cycle]`` (or per token).

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=6)
    >>> model = HookedLoopedTransformer(cfg, seed=0)
    >>> d = distance_to_fixed_point(model, torch.tensor([[1, 2, 3]]), ref_steps=6)
    >>> d.shape, d[-1].abs().max().item()        # the last step of a 6-step run *is* the reference
    (torch.Size([6, 2]), 0.0)
    """
    from tl_loop.analysis.streaming import DistanceToReference, run_streaming

    reference = approximate_fixed_points(model, tokens, ref_steps, name, **forward_kwargs)
    reducer = DistanceToReference(reference, metric, per_token, name)
    return run_streaming(
        model, tokens, reducer, n_steps=model.cfg.n_steps if n_steps is None else n_steps, **forward_kwargs
    )


@dataclass(frozen=True)
class DegeneracyCheck:
    """Pairwise distances between the fixed points of the layers of the cycle."""

    pairwise: Float[torch.Tensor, "layer_in_cycle layer_in_cycle"]  # token-averaged distance
    tol: float

    @property
    def max_distance(self) -> float:
        return float(self.pairwise.max()) if self.pairwise.numel() else 0.0

    @property
    def degenerate(self) -> bool:
        """True when every pair of layers is within ``tol``: one point, not a cycle (always true
        for a one-layer block)."""
        return self.max_distance <= self.tol


def degenerate_fixed_point(
    fixed_points: Float[torch.Tensor, "layer_in_cycle ... d_model"],
    tol: float = 0.05,
    metric: Metric = "relative",
) -> DegeneracyCheck:
    """Do all layers of the cycle collapse onto one point? ``fixed_points`` is
    :func:`approximate_fixed_points` (or ``states[-1]`` of a converged run). The pairwise
    distance uses the mean of both states as reference for ``"relative"`` so it is symmetric.

    >>> v = torch.tensor([1.0, 2.0, 3.0])
    >>> degenerate_fixed_point(torch.stack([v, v, 1.001 * v])).degenerate
    True
    >>> degenerate_fixed_point(torch.stack([v, -v])).degenerate
    False
    """
    x = fixed_points.float()
    n = x.shape[0]
    pairwise = torch.zeros(n, n)
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            if metric == "relative":
                mean_norm = 0.5 * (x[a].norm(dim=-1) + x[b].norm(dim=-1))
                d = (x[a] - x[b]).norm(dim=-1) / mean_norm.clamp_min(1e-12)
            else:
                d = vector_distance(x[a], x[b], metric)
            pairwise[a, b] = d.mean()
    return DegeneracyCheck(pairwise, tol)


def cosine_to_final(states: Float[torch.Tensor, "step ... d_model"]) -> Float[torch.Tensor, "step ..."]:
    """``cos(states[r], states[-1])`` for every step ``r``.

    >>> cosine_to_final(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    tensor([1., 0., 1.])
    """
    return cosine_similarity(states, states[-1:].expand_as(states))


@dataclass(frozen=True)
class LimitingBehaviour:
    """Per-token limiting behaviour. ``codes`` index :data:`LIMITING_CLASSES`."""

    codes: torch.Tensor  # int64 [*token]
    cosine: Float[torch.Tensor, "step ..."]  # cosine to the final state, per step and token
    tau: float
    rho: float

    def labels(self) -> Any:
        """The class names, nested like ``codes`` (a str for a single token)."""
        names = [LIMITING_CLASSES[int(c)] for c in self.codes.flatten()]
        if self.codes.ndim == 0:
            return names[0]
        return _nest(names, list(self.codes.shape))

    def fractions(self) -> dict[str, float]:
        """Share of tokens in each class."""
        n = max(self.codes.numel(), 1)
        return {name: float((self.codes == k).sum()) / n for k, name in enumerate(LIMITING_CLASSES)}


def _nest(flat: list[str], shape: list[int]) -> Any:
    if len(shape) == 1:
        return flat
    size = len(flat) // shape[0]
    return [_nest(flat[i * size : (i + 1) * size], shape[1:]) for i in range(shape[0])]


def classify_limiting_behaviour(
    cosine: Float[torch.Tensor, "step ..."],
    tau: float = 0.05,
    rho: float = 0.9,
    tail: float = 0.5,
) -> LimitingBehaviour:
    """Classify every token from its cosine-to-final sequence ``[step, *token]`` (see the module
    docstring for the exact rules). Needs at least 4 steps.

    >>> S = 64
    >>> fixed = torch.ones(S)                                         # never moves
    >>> orbit = torch.tensor([0.0, 1.0] * (S // 2))                   # alternates between 2 states
    >>> slider = torch.cos(0.02 * torch.arange(S - 1, -1, -1.0))      # rotates slowly towards the end
    >>> classify_limiting_behaviour(torch.stack([fixed, orbit, slider], -1)).labels()
    ['fixed_point', 'orbit', 'slider']
    """
    c = cosine.float()
    s = c.shape[0]
    if s < 4:
        raise ValueError(f"limiting behaviour needs at least 4 steps, got {s}")
    w = max(4, math.ceil(tail * s))
    w = min(w, s)
    win = c[-w:]  # [w, *token]
    codes = torch.full(c.shape[1:], UNKNOWN, dtype=torch.long, device=c.device)

    fixed = (win >= 1.0 - tau).float().mean(0) >= rho

    periodic = torch.zeros_like(fixed)
    for p in range(2, w // 2 + 1):
        periodic |= ((win[p:] - win[:-p]).abs() <= tau).float().mean(0) >= rho
    delta = win[1:] - win[:-1]
    big = delta.abs() > tau
    sign = torch.sign(delta) * big
    # direction changes: consecutive *large* moves of opposite sign (small moves are skipped)
    changes = torch.zeros_like(codes)
    last = torch.zeros_like(sign[0])
    for d in sign:
        flip = (d != 0) & (last != 0) & (d != last)
        changes = changes + flip.long()
        last = torch.where(d != 0, d, last)
    orbit = periodic & (changes >= 2)

    rising = (delta > 0).float().mean(0) >= rho
    slider = rising & ((win[-1] - win[0]) > tau)

    codes = torch.where(slider, torch.full_like(codes, SLIDER), codes)
    codes = torch.where(orbit, torch.full_like(codes, ORBIT), codes)
    codes = torch.where(fixed, torch.full_like(codes, FIXED_POINT), codes)
    return LimitingBehaviour(codes, c, tau, rho)


@exclusive
@torch.no_grad()
def limiting_behaviour(
    model: Any,
    tokens: Any,
    n_steps: int = 128,
    layer_in_cycle: int = -1,
    tau: float = 0.05,
    rho: float = 0.9,
    tail: float = 0.5,
    name: str = "resid_post",
    **forward_kwargs: Any,
) -> LimitingBehaviour:
    """Run ``n_steps`` steps keeping only one layer's state per step (default the last layer of
    the cycle), and classify every token (:func:`classify_limiting_behaviour`).

    >>> from tl_loop import LoopedConfig, HookedLoopedTransformer
    >>> cfg = LoopedConfig(d_model=16, d_head=4, d_vocab=20, n_core_layers=2, n_steps=4)
    >>> lb = limiting_behaviour(HookedLoopedTransformer(cfg, seed=0), torch.tensor([[1, 2, 3]]), n_steps=32)
    >>> lb.codes.shape, lb.cosine.shape, sum(lb.fractions().values())
    (torch.Size([1, 3]), torch.Size([32, 1, 3]), 1.0)
    """
    from tl_loop.analysis.streaming import LayerStates, run_streaming

    model.check_n_steps(n_steps, force=True)
    states = run_streaming(
        model, tokens, LayerStates(layer_in_cycle, name), n_steps=n_steps, force=True, **forward_kwargs
    )
    return classify_limiting_behaviour(cosine_to_final(states), tau, rho, tail)
