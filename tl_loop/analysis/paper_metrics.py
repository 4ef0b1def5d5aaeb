"""The measures of the seed paper ("A Mechanistic Analysis of Looped Reasoning Language Models",
arXiv 2604.11791), with its definitions so results compare.

Attention patterns ``A`` are ``[..., query_pos, key_pos]`` with rows summing to 1 (``T`` positions):

* :func:`colsum_concentration` -- ``C = 1 + (1 / log T) sum_j c_j log c_j`` with
  ``c_j = (sum_i A_ij) / T``, the share of attention key ``j`` receives. 0 when every key receives
  the same mass, 1 when one key receives all of it.
* :func:`sink_score` -- mass on the first token averaged over queries, ``(1/T) sum_i A_i0``; a
  head is a *sink head* when its score exceeds ``threshold = 0.3``, and :func:`sink_rate` is the
  fraction of sink heads.
* :func:`mixing_score` -- mean row entropy ``-(1/T) sum_i sum_j A_ij log A_ij`` (nats).
* :func:`attention_frobenius_distances` -- ``||A_r - A_s||_F`` between a head's patterns at every
  pair of steps ``(r, s)`` (the heat-map over step pairs).

Residual stream ``X`` ``[..., T, d_model]``:

* :func:`matrix_entropy` -- normalised von Neumann (spectral) entropy of the token-by-token Gram
  matrix: rows of ``X`` scaled to unit norm, ``K = X X^T``, ``lambda`` the eigenvalues of
  ``K / tr K``, ``H = -sum lambda log lambda / log min(T, d_model)``. 1 when the token states are
  orthogonal (spread over as many directions as possible), 0 when they all point the same way.

The distance to the approximate fixed point, the degenerate-fixed-point check and the
limiting-behaviour classification are in ``tl_loop.analysis.fixed_points``.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float

_TINY = 1e-30


def _check_pattern(pattern: torch.Tensor) -> None:
    if pattern.ndim < 2 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"expected an attention pattern [..., T, T], got shape {tuple(pattern.shape)}")


def row_entropy(pattern: Float[torch.Tensor, "... q k"]) -> Float[torch.Tensor, "... q"]:
    """Entropy (nats) of every row of a pattern (``0 log 0 = 0``).

    >>> row_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    tensor([0.0000, 0.6931])
    """
    p = pattern.float()
    return 0.0 - torch.special.xlogy(p, p).sum(-1)  # 0.0 - x: no negative zeros


def colsum_concentration(pattern: Float[torch.Tensor, "... T T"]) -> Float[torch.Tensor, "..."]:
    """ColSum concentration ``C = 1 + (1/log T) sum_j c_j log c_j``, ``c_j = (sum_i A_ij)/T``.
    ``T = 1`` gives 1 (the single key receives all the mass).

    >>> colsum_concentration(torch.full((4, 4), 0.25))            # uniform: every key gets 1/4
    tensor(0.)
    >>> sink = torch.zeros(4, 4); sink[:, 0] = 1.0
    >>> colsum_concentration(sink)                                # all mass on one key
    tensor(1.)
    """
    _check_pattern(pattern)
    t = pattern.shape[-1]
    if t == 1:
        return torch.ones(pattern.shape[:-2], dtype=torch.float32, device=pattern.device)
    c = pattern.float().sum(-2) / t  # [..., k]
    return 1.0 + torch.special.xlogy(c, c).sum(-1) / math.log(t)


def sink_score(pattern: Float[torch.Tensor, "... T T"], sink: int = 0) -> Float[torch.Tensor, "..."]:
    """Mean attention mass on key ``sink`` (the first token) over all query positions.

    >>> all_on_first = torch.zeros(3, 3); all_on_first[:, 0] = 1.0
    >>> sink_score(all_on_first), sink_score(torch.eye(3))
    (tensor(1.), tensor(0.3333))
    """
    _check_pattern(pattern)
    return pattern.float()[..., :, sink].mean(-1)


def sink_rate(
    scores: Float[torch.Tensor, "..."], threshold: float = 0.3, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Fraction of heads whose sink score exceeds ``threshold`` (over ``dim``, default all axes).

    >>> sink_rate(torch.tensor([[0.9, 0.1], [0.35, 0.3]]))          # 0.3 itself is not above
    tensor(0.5000)
    >>> sink_rate(torch.tensor([[0.9, 0.1], [0.35, 0.3]]), dim=-1)
    tensor([0.5000, 0.5000])
    """
    above = (scores > threshold).float()
    return above.mean() if dim is None else above.mean(dim)


def mixing_score(pattern: Float[torch.Tensor, "... T T"]) -> Float[torch.Tensor, "..."]:
    """Mean row entropy (nats) of a pattern: how much each query mixes its keys.

    >>> round(mixing_score(torch.full((4, 4), 0.25)).item(), 4) == round(math.log(4), 4)
    True
    """
    _check_pattern(pattern)
    return row_entropy(pattern).mean(-1)


def matrix_entropy(
    states: Float[torch.Tensor, "... T d"], normalize_tokens: bool = True
) -> Float[torch.Tensor, "..."]:
    """Normalised von Neumann entropy of the Gram matrix of the token states, in ``[0, 1]``
    (see the module docstring). ``normalize_tokens=False`` keeps each token's norm.
    Zero states, ``T = 1`` or ``d = 1`` give 0.

    >>> round(matrix_entropy(torch.eye(4)).item(), 4)                 # orthonormal token states
    1.0
    >>> round(matrix_entropy(torch.ones(4, 8)).item(), 4)             # all tokens identical
    0.0
    """
    x = states.float()
    t, d = x.shape[-2], x.shape[-1]
    if normalize_tokens:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gram = x @ x.transpose(-1, -2)
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    total = eig.sum(-1, keepdim=True)
    p = eig / total.clamp_min(_TINY)
    h = 0.0 - torch.special.xlogy(p, p).sum(-1)
    k = min(t, d)
    if k < 2:
        return torch.zeros_like(h)
    return torch.where(total.squeeze(-1) > 0, h / math.log(k), torch.zeros_like(h))


def attention_frobenius_distances(
    patterns: Float[torch.Tensor, "step ... T T"],
) -> Float[torch.Tensor, "step step ..."]:
    """``||A_r - A_s||_F`` for every pair of steps; ``patterns`` holds one head's pattern at every
    step, ``[step, *rest, T, T]`` (e.g. ``rest = (batch,)``). Returns ``[step, step, *rest]``.

    >>> a, b = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> attention_frobenius_distances(torch.stack([a, a, b]))
    tensor([[0.0000, 0.0000, 1.4142],
            [0.0000, 0.0000, 1.4142],
            [1.4142, 1.4142, 0.0000]])
    """
    _check_pattern(patterns)
    a = patterns.float()
    rows = [(a[r][None] - a).pow(2).sum((-1, -2)).sqrt() for r in range(a.shape[0])]
    return torch.stack(rows)
