"""A transformer block with the three norm placements looped LMs use.

``pre_norm`` (Llama): ``x + attn(ln1(x))``; ``output_norm`` (Ouro, OLMo-2): the sublayer output
is normed before the add, ``x + ln1_post(attn(.))``; ``resid_norm`` (Huginn "sandwich"): the
sum is normed after the add, ``ln_resid_mid(x + attn(.))``. The same holds for the MLP half
(``ln2``, ``ln2_post``, ``ln_resid_post``). Any combination is allowed.

Hook points of the block itself (sub-module hooks are listed in their files)::

    hook_resid_pre   [batch, pos, d_model]
    hook_attn_out    [batch, pos, d_model]   what attention adds (after ln1_post where present)
    hook_resid_mid   [batch, pos, d_model]   (after ln_resid_mid where present)
    hook_mlp_in      [batch, pos, d_model]   the MLP half's input, before ln2 (cfg.use_hook_mlp_in)
    hook_mlp_out     [batch, pos, d_model]   (after ln2_post where present)
    hook_resid_post  [batch, pos, d_model]   (after ln_resid_post where present)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float

from tl_loop.components.attention import AttentionContext, AttentionWeights, HookedAttention, show_flagged_hooks
from tl_loop.components.base import LoopHookPoint, WeightView
from tl_loop.components.mlp import HookedMLP, MLPWeights
from tl_loop.components.norm import HookedNorm, NormWeights
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
        self.hook_mlp_in = LoopHookPoint()  # [batch, pos, d_model] (cfg.use_hook_mlp_in)
        self.mlp = HookedMLP(weights.mlp, cfg)
        self.hook_mlp_out = LoopHookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = LoopHookPoint()  # [batch, pos, d_model]
        show_flagged_hooks(self, cfg)

    def _norm(self, slot: str, x: torch.Tensor) -> torch.Tensor:
        norm = self._modules.get(slot)
        return x if norm is None else norm(x)

    def refresh_flagged_hooks(self) -> None:
        """Show exactly the hook points whose TransformerLens flag (``cfg.use_*``) is on."""
        show_flagged_hooks(self, self.cfg)
        show_flagged_hooks(self.attn, self.cfg)

    def _attn_input(self, resid_pre: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's input: ``ln1(resid_pre)``, or with ``use_split_qkv_input`` /
        ``use_attn_in`` one copy of ``resid_pre`` per head through its hook, each normed."""
        cfg, attn = self.cfg, self.attn
        if not (cfg.use_split_qkv_input or cfg.use_attn_in):
            return self._norm("ln1", resid_pre)

        def per_head(hook: nn.Module, n_heads: int) -> torch.Tensor:
            return self._norm("ln1", hook(resid_pre.unsqueeze(2).expand(-1, -1, n_heads, -1)))

        if cfg.use_split_qkv_input:
            kv = cfg.n_key_value_heads
            return per_head(attn.hook_q_input, cfg.n_heads), per_head(attn.hook_k_input, kv), per_head(attn.hook_v_input, kv)
        shared = per_head(attn.hook_attn_in, cfg.n_heads)
        return shared, shared, shared

    def forward(
        self,
        resid_pre: Float[torch.Tensor, "batch pos d_model"],
        context: AttentionContext | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self._norm("ln1_post", self.attn(self._attn_input(resid_pre), context)))
        resid_mid = self.hook_resid_mid(self._norm("ln_resid_mid", resid_pre + attn_out))
        mlp_in = self.hook_mlp_in(resid_mid) if self.cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self._norm("ln2_post", self.mlp(self._norm("ln2", mlp_in))))
        return self.hook_resid_post(self._norm("ln_resid_post", resid_mid + mlp_out))
