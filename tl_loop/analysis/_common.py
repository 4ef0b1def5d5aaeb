"""Shared vocabulary of ``tl_loop.analysis``: state tensors, distance metrics, token reduction.

Shapes used throughout the package::

    states    [step, layer_in_cycle, *token, d_model]   e.g. cache.stack_loop("resid_post")
                                                        with *token = (batch, pos)
    patterns  [step, layer_in_cycle, batch, head, query_pos, key_pos]
    distances [step - 1, layer_in_cycle]                 averaged over tokens, or
              [step - 1, layer_in_cycle, *token]         with ``per_token=True``

Distance metrics between two states ``a`` (the state examined) and ``ref`` (the state it is
compared with: the previous step, the last step, the approximate fixed point)::

    "l2"        ||a - ref||
    "relative"  ||a - ref|| / ||ref||          (0 where both are 0)
    "cosine"    1 - cos(a, ref)                 (a distance: 0 for parallel states)

Every metric is computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float

Metric = Literal["l2", "relative", "cosine"]
METRICS: tuple[str, ...] = ("l2", "relative", "cosine")
_TINY = 1e-12


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def cosine_similarity(
    a: Float[torch.Tensor, "... d"], b: Float[torch.Tensor, "... d"]
) -> Float[torch.Tensor, "..."]:
    """Cosine similarity over the last axis, in float32 (0 where either vector is 0)."""
    a, b = a.float(), b.float()
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return (a * b).sum(-1) / denom.clamp_min(_TINY)


def vector_distance(
    a: Float[torch.Tensor, "... d"], ref: Float[torch.Tensor, "... d"], metric: Metric = "relative"
) -> Float[torch.Tensor, "..."]:
    """Distance between ``a`` and ``ref`` over the last axis (see the module docstring).

    >>> a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0])
    >>> [round(float(vector_distance(a, b, m)), 4) for m in ("l2", "relative", "cosine")]
    [3.0, 0.75, 0.2]
    """
    check_metric(metric)
    a, ref = a.float(), ref.float()
    if metric == "cosine":
        return (1.0 - cosine_similarity(a, ref)).clamp(0.0, 2.0)  # rounding can leave cos a hair above 1
    diff = (a - ref).norm(dim=-1)
    if metric == "l2":
        return diff
    return diff / ref.norm(dim=-1).clamp_min(_TINY)


def reduce_tokens(x: torch.Tensor, keep: int, per_token: bool) -> torch.Tensor:
    """Average over every axis after the first ``keep`` ones, unless ``per_token``."""
    if per_token or x.ndim <= keep:
        return x
    return x.flatten(keep).mean(-1)


def loop_states(source: Any, name: str = "resid_post") -> Float[torch.Tensor, "step layer_in_cycle ..."]:
    """``[step, layer_in_cycle, ...]`` states from a ``LoopedActivationCache`` (``stack_loop``),
    or ``source`` itself when it is already a tensor."""
    if isinstance(source, torch.Tensor):
        return source
    stack = getattr(source, "stack_loop", None)
    if stack is None:
        raise TypeError(
            "expected a tensor [step, layer_in_cycle, ...] or a LoopedActivationCache, "
            f"got {type(source).__name__}"
        )
    return stack(name)


def first_settled(values: Float[torch.Tensor, "n ..."], tol: float) -> torch.Tensor:
    """Per trailing index, the first ``r`` such that ``values[s] <= tol`` for every ``s >= r``
    (``-1`` where the last value exceeds ``tol``). Returns an int64 tensor ``values.shape[1:]``.

    >>> first_settled(torch.tensor([0.5, 0.01, 0.3, 0.02, 0.01]), tol=0.05)
    tensor(3)
    >>> first_settled(torch.tensor([0.5, 0.4]), tol=0.05)
    tensor(-1)
    """
    if values.shape[0] == 0:
        return torch.full(values.shape[1:], -1, dtype=torch.long)
    above = values > tol  # [n, ...]
    n = values.shape[0]
    idx = torch.arange(n, device=values.device).view(n, *([1] * (values.ndim - 1)))
    last_above = torch.where(above, idx, torch.full_like(idx, -1)).amax(0)  # -1 where never above
    settled = last_above + 1
    return torch.where(last_above == n - 1, torch.full_like(settled, -1), settled).long()
