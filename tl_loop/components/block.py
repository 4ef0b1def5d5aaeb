"""A transformer block with the three norm placements looped LMs use.

``pre_norm`` (Llama): ``x + attn(ln1(x))``; ``output_norm`` (Ouro, OLMo-2): the sublayer output
is normed before the add, ``x + ln1_post(attn(.))``; ``resid_norm`` (Huginn "sandwich"): the
sum is normed after the add, ``ln_resid_mid(x + attn(.))``. The same holds for the MLP half
(``ln2``, ``ln2_post``, ``ln_resid_post``). Any combination is allowed.

Hook points of the block itself (sub-module hooks are listed in their files)::

    hook_resid_pre   [batch, pos, d_model]
    hook_attn_out    [batch, pos, d_model]   what attention adds (after ln1_post where present)
    hook_resid_mid   [batch, pos, d_model]   (after ln_resid_mid where present)
    hook_mlp_out     [batch, pos, d_model]   (after ln2_post where present)
    hook_resid_post  [batch, pos, d_model]   (after ln_resid_post where present)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float

from tl_loop.components.attention import AttentionWeights, HookedAttention
from tl_loop.components.base import LoopHookPoint, WeightView
from tl_loop.components.mlp import HookedMLP, MLPWeights
from tl_loop.components.norm import HookedNorm, NormWeights
from tl_loop.components.rotary import RotaryTables
from tl_loop.config import LoopedConfig

#: Norm slots of a block and the config flag that enables each.
NORM_SLOTS = {
    "ln1": "pre_norm",
    "ln2": "pre_norm",
    "ln1_post": "output_norm",
    "ln2_post": "output_norm",
    "ln_resid_mid": "resid_norm",
    "ln_resid_post": "resid_norm",
}


def enabled_norm_slots(cfg: LoopedConfig) -> list[str]:
    return [slot for slot, flag in NORM_SLOTS.items() if getattr(cfg, flag)]


class BlockWeights(nn.Module):
    """The parameters of one physical block (shared by every step that runs it)."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.attn = AttentionWeights(cfg)
        self.mlp = MLPWeights(cfg)
        for slot in enabled_norm_slots(cfg):
            setattr(self, slot, NormWeights(cfg.d_model, cfg.norm_type, cfg.dtype) if cfg.norm_weights else None)


class HookedBlock(WeightView):
    """Effective layer ``i`` of the unrolled model, computing with a shared ``BlockWeights``."""

    weights: BlockWeights
    #: ``ActivationCache.logit_lens`` reads this: resid_post is the whole residual stream.
    hook_out_is_single_residual_stream = True

    def __init__(self, weights: BlockWeights, cfg: LoopedConfig) -> None:
        super().__init__(weights)
        self.cfg = cfg
        self.hook_resid_pre = LoopHookPoint()  # [batch, pos, d_model]
        for slot in enabled_norm_slots(cfg):
            setattr(self, slot, HookedNorm(getattr(weights, slot), cfg.norm_type, cfg.eps))
        self.attn = HookedAttention(weights.attn, cfg)
        self.hook_attn_out = LoopHookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = LoopHookPoint()  # [batch, pos, d_model]
        self.mlp = HookedMLP(weights.mlp, cfg)
        self.hook_mlp_out = LoopHookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = LoopHookPoint()  # [batch, pos, d_model]

    def _norm(self, slot: str, x: torch.Tensor) -> torch.Tensor:
        norm = self._modules.get(slot)
        return x if norm is None else norm(x)

    def forward(
        self,
        resid_pre: Float[torch.Tensor, "batch pos d_model"],
        rotary: RotaryTables | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self._norm("ln1_post", self.attn(self._norm("ln1", resid_pre), rotary)))
        resid_mid = self.hook_resid_mid(self._norm("ln_resid_mid", resid_pre + attn_out))
        mlp_out = self.hook_mlp_out(self._norm("ln2_post", self.mlp(self._norm("ln2", resid_mid))))
        return self.hook_resid_post(self._norm("ln_resid_post", resid_mid + mlp_out))
