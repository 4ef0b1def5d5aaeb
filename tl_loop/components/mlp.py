"""Feed-forward layer: gated (SwiGLU-style) or plain.

Hook points::

    hook_pre         [batch, pos, d_mlp]   gate pre-activation (gated) or W_in output (plain)
    hook_pre_linear  [batch, pos, d_mlp]   up projection (gated only)
    hook_post        [batch, pos, d_mlp]   act(pre) * pre_linear (gated) or act(pre)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float

from tl_loop.components.activations import activation_fn
from tl_loop.components.base import LoopHookPoint, WeightView, split_projections
from tl_loop.config import LoopedConfig


class MLPWeights(nn.Module):
    """Weights in ``[out, in]`` layout. Gated + fused stores ``[gate; up]`` as one matrix."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        assert cfg.d_mlp is not None
        d, m = cfg.d_model, cfg.d_mlp

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=cfg.dtype))

        if cfg.gated_mlp and cfg.mlp_layout == "fused":
            self.w_gate_up = param(2 * m, d)
        elif cfg.gated_mlp:
            self.w_gate, self.w_up = param(m, d), param(m, d)
        else:
            self.w_in = param(m, d)
        self.b_in = param(m) if cfg.mlp_bias and not cfg.gated_mlp else None
        self.w_out = param(d, m)
        self.b_out = param(d) if cfg.mlp_bias else None
        self.d_mlp = m

    def in_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(w_gate or w_in, w_up or None)`` in ``[out, in]`` layout."""
        if hasattr(self, "w_gate_up"):
            gate, up = self.w_gate_up.split([self.d_mlp, self.d_mlp], dim=0)
            return gate, up
        if hasattr(self, "w_gate"):
            return self.w_gate, self.w_up
        return self.w_in, None


class HookedMLP(WeightView):
    weights: MLPWeights

    def __init__(self, weights: MLPWeights, cfg: LoopedConfig) -> None:
        super().__init__(weights)
        self.cfg = cfg
        self.act = activation_fn(cfg.act_fn)
        self.hook_pre = LoopHookPoint()  # [batch, pos, d_mlp]
        if cfg.gated_mlp:
            self.hook_pre_linear = LoopHookPoint()  # [batch, pos, d_mlp]
        self.hook_post = LoopHookPoint()  # [batch, pos, d_mlp]

    # TransformerLens weight views ([d_model, d_mlp] / [d_mlp, d_model])
    @property
    def W_in(self) -> Float[torch.Tensor, "d_model d_mlp"]:
        first, up = self.weights.in_weights()
        return (up if up is not None else first).T

    @property
    def W_gate(self) -> Float[torch.Tensor, "d_model d_mlp"] | None:
        first, up = self.weights.in_weights()
        return first.T if up is not None else None

    @property
    def W_out(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        return self.weights.w_out.T

    @property
    def b_in(self) -> Float[torch.Tensor, "d_mlp"]:
        w = self.weights
        return w.b_in if w.b_in is not None else torch.zeros(w.d_mlp, dtype=w.w_out.dtype, device=w.w_out.device)

    @property
    def b_out(self) -> Float[torch.Tensor, "d_model"]:
        w = self.weights
        return w.b_out if w.b_out is not None else torch.zeros(self.cfg.d_model, dtype=w.w_out.dtype, device=w.w_out.device)

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        w = self.weights
        if hasattr(w, "w_gate_up") and split_projections(x):  # see split_projections
            gate_w, up_w = w.w_gate_up.split([w.d_mlp, w.d_mlp], dim=0)
            post = self.act(self.hook_pre(F.linear(x, gate_w))) * self.hook_pre_linear(F.linear(x, up_w))
        elif hasattr(w, "w_gate_up"):
            pre, pre_linear = F.linear(x, w.w_gate_up).chunk(2, dim=-1)
            post = self.act(self.hook_pre(pre)) * self.hook_pre_linear(pre_linear)
        elif hasattr(w, "w_gate"):
            post = self.act(self.hook_pre(F.linear(x, w.w_gate))) * self.hook_pre_linear(F.linear(x, w.w_up))
        else:
            post = self.act(self.hook_pre(F.linear(x, w.w_in, w.b_in)))
        return F.linear(self.hook_post(post), w.w_out, w.b_out)
