"""Normalisation: RMSNorm / LayerNorm, with or without learned weights.

Hook points (shapes for a ``[batch, pos, d]`` input)::

    hook_scale       [batch, pos, 1]   sqrt(mean(x^2) + eps) (RMS) or sqrt(var(x) + eps) (LN)
    hook_normalized  [batch, pos, d]   the norm's output (weight and bias applied)

Numerics follow the reference implementations: statistics in float32, ``x * rsqrt(var + eps)``
cast back to the input dtype, *then* multiplied by the weight. A hook on ``hook_scale`` sees
``sqrt(var + eps)``; if it leaves the scale unchanged (returns it, or None, without writing into
it: see ``run_hook_point``) the output is the no-hook one bit for bit, and the gradient flows
through the scale. A scale the hook changed divides the input instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float

from tl_loop.components.base import LoopHookPoint, WeightView, exact_with_gradient_of, is_hooked, run_hook_point


class NormWeights(nn.Module):
    """Learned weight (and LayerNorm bias) of one norm."""

    def __init__(self, d: int, norm_type: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(d, dtype=dtype)) if norm_type == "LN" else None


class HookedNorm(WeightView):
    """One application of a norm. ``weights=None`` gives a parameter-free norm."""

    def __init__(self, weights: NormWeights | None, norm_type: str, eps: float) -> None:
        super().__init__(weights)
        self.norm_type = norm_type
        self.eps = eps
        self.hook_scale = LoopHookPoint()  # [batch, pos, 1]
        self.hook_normalized = LoopHookPoint()  # [batch, pos, d]

    @property
    def w(self) -> torch.Tensor | None:
        return None if self.weights is None else self.weights.w

    @property
    def b(self) -> torch.Tensor | None:
        return None if self.weights is None else self.weights.b

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        # statistics in float32 (never below: float64 stays float64)
        xf = x if x.dtype == torch.float64 else x.float()
        if self.norm_type == "LN":
            xf = xf - xf.mean(-1, keepdim=True)
        var = xf.pow(2).mean(-1, keepdim=True) + self.eps
        if is_hooked(self.hook_scale):
            scale, changed = run_hook_point(self.hook_scale, var.sqrt())
            if changed:  # a hook replaced the scale (or wrote into it): normalise by it
                y = xf / scale
            else:  # read only: the no-hook numbers, the gradient through the scale
                y = exact_with_gradient_of(xf * var.rsqrt(), lambda: xf / scale)
        else:
            # x * rsqrt(var) (Hugging Face's RMSNorm, bit for bit): a multiply instead of a
            # divide over the whole tensor; the scale itself is never needed
            y = xf * var.rsqrt()
        y = y.to(x.dtype)
        if self.weights is not None:
            y = y * self.weights.w
            if self.weights.b is not None:
                y = y + self.weights.b
        return self.hook_normalized(y)

    def apply_fixed_scale(
        self, x: Float[torch.Tensor, "... d"], scale: Float[torch.Tensor, "... 1"]
    ) -> Float[torch.Tensor, "... d"]:
        """The norm's *linear part* with a given (cached) scale: no bias, no new statistics.

        Used to propagate residual-stream components exactly through a norm.
        """
        if self.norm_type == "LN":
            x = x - x.mean(-1, keepdim=True)
        y = x / scale.to(x.dtype)
        return y * self.weights.w if self.weights is not None else y
