"""Causal self-attention with GQA, fused or split QKV, q/k bias, q/k norm, RoPE and an output gate.

Hook points of one application (TransformerLens names)::

    hook_q, hook_rot_q      [batch, pos, head, d_head]      before / after RoPE
    hook_k, hook_rot_k      [batch, pos, kv_head, d_head]
    hook_v                  [batch, pos, kv_head, d_head]
    hook_attn_scores        [batch, head, query_pos, key_pos]   scaled, causally masked (-inf);
                                                            float32 in bf16 / fp16 models
    hook_pattern            [batch, head, query_pos, key_pos]   in the model's dtype
    hook_gate               [batch, pos, head, d_head]      sigmoid output gate (HRM only)
    hook_z                  [batch, pos, head, d_head]      gated where the family gates
    hook_result             [batch, pos, head, d_model]     only with cfg.use_attn_result
    hook_q_input, hook_k_input, hook_v_input
                            [batch, pos, (kv_)head, d_model]  only with cfg.use_split_qkv_input
    hook_attn_in            [batch, pos, head, d_model]     only with cfg.use_attn_in

With ``cfg.use_split_qkv_input`` / ``cfg.use_attn_in`` the block hands the attention one input
per head (TransformerLens's ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` or
``hook_attn_in``, ``[batch, pos, head, d_model]``, fired by the block on the residual stream
before ``ln1``) and each head projects its own copy.

What a pass gives every attention layer besides its input is an ``AttentionContext``: RoPE tables
at the tokens' positions, which keys are real (padding), and, while decoding, the layer's KV
slot (``KVSlot``: past keys and values). Query ``i`` of ``n_q`` new positions sits at key index
``n_k - n_q + i`` and sees the valid keys up to there (and always itself, so a padding query
never has an empty row).

When nothing is attached to ``hook_attn_scores`` or ``hook_pattern`` the pattern is never
materialised: PyTorch's fused scaled-dot-product attention runs. Hooks there see the
materialised scores and pattern, and the output depends on what they do (``run_hook_point``):

- hooks that leave both unchanged (read, cache, return the input or None; no write in place):
  the fused kernel's output, so the numbers are those of the no-hook forward bit for bit, in
  every dtype; where a gradient is recorded it flows through the pattern (backward hooks,
  ``retain_grad``), with the values still the fused kernel's;
- a hook that changes either (returns another tensor, or writes into it): ``pattern @ v`` with
  what it returned, computed as the fused kernel computes attention: scores and softmax in
  float32 at least, the pattern in the model's dtype, ``pattern @ v`` accumulated in float32 and
  cast back once, so a changing hook's numbers stay within the kernel's own bf16 noise. A
  backward hook wraps the activation (a new tensor), so it counts as a change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from tl_loop.components.base import (
    LoopHookPoint,
    WeightView,
    exact_with_gradient_of,
    is_hooked,
    run_hook_point,
    set_present,
    split_projections,
)
from tl_loop.components.norm import HookedNorm, NormWeights
from tl_loop.components.rotary import RotaryTables, apply_rotary_tables
from tl_loop.config import LoopedConfig

_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

_MASKS: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def causal_mask_bias(n_pos: int, dtype: torch.dtype, device: torch.device) -> Float[torch.Tensor, "pos pos"]:
    """Additive causal mask ``[query_pos, key_pos]``: 0 on and below the diagonal, -inf above.
    Built once per (length, dtype, device) and reused (read-only)."""
    key = (n_pos, dtype, str(device))
    mask = _MASKS.get(key)
    if mask is None:
        if len(_MASKS) >= 16:
            _MASKS.clear()
        with torch.inference_mode(False), torch.no_grad():  # usable inside and outside inference mode
            mask = torch.full((n_pos, n_pos), float("-inf"), dtype=dtype, device=device).triu_(1)
        _MASKS[key] = mask
    return mask


class KVSlot(Protocol):
    """One effective layer's key-value memory while decoding (see ``tl_loop.generation``)."""

    def update(
        self, k: Float[torch.Tensor, "batch pos kv_head d_head"], v: Float[torch.Tensor, "batch pos kv_head d_head"]
    ) -> tuple[torch.Tensor, torch.Tensor, Bool[torch.Tensor, "batch key_pos"] | None]:
        """Store this pass's (rotated) keys and values; return every key and value the layer
        attends to, past then new ``[batch, key_pos, kv_head, d_head]``, and which key positions
        hold an entry (None: all)."""
        ...


@dataclasses.dataclass
class AttentionContext:
    """What one pass gives every attention layer besides its input.

    ``rotary``: RoPE tables at the query positions (``[pos, 1, rot]``, or ``[batch, pos, 1, rot]``
    with per-row positions); ``key_valid``: ``[batch, key_pos]``, False on padding (None: every
    key is real); ``positions``: the tokens' positions ``[batch, pos]`` (None: ``0..pos-1``);
    ``kv``: the layer's ``KVSlot`` while decoding.
    """

    rotary: RotaryTables | None = None
    key_valid: Bool[torch.Tensor, "batch key_pos"] | None = None
    positions: Int[torch.Tensor, "batch pos"] | None = None
    kv: KVSlot | None = None
    _bias_memo: dict = dataclasses.field(default_factory=dict, repr=False)

    def bias(
        self, n_q: int, n_k: int, key_valid: torch.Tensor | None, dtype: torch.dtype, device: torch.device
    ) -> Float[torch.Tensor, "batch 1 query_pos key_pos"] | None:
        """The additive mask (0 / -inf) for ``n_q`` queries over ``n_k`` keys, or None where
        plain causal attention is exact (no padding, as many keys as queries). Built once per
        pass and shape."""
        if key_valid is None and n_q == n_k:
            return None
        key = (n_q, n_k, dtype, None if key_valid is None else id(key_valid))
        memo = self._bias_memo.get(key)
        if memo is None or memo[0] is not key_valid:
            valid = key_valid if key_valid is not None else torch.ones(1, n_k, dtype=torch.bool, device=device)
            memo = (key_valid, attention_bias(n_q, valid, dtype, device))
            if len(self._bias_memo) >= 4:
                self._bias_memo.clear()
            self._bias_memo[key] = memo
        return memo[1]


def attention_bias(
    n_q: int, key_valid: Bool[torch.Tensor, "batch key_pos"], dtype: torch.dtype, device: torch.device
) -> Float[torch.Tensor, "batch 1 query_pos key_pos"]:
    """Causal + padding mask: query ``i`` (key index ``n_k - n_q + i``) sees the valid keys up
    to its own index, and always itself."""
    n_k = key_valid.shape[-1]
    q_index = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    k_index = torch.arange(n_k, device=device)[None, :]
    allowed = ((k_index <= q_index) & key_valid.to(device=device, dtype=torch.bool)[:, None, :]) | (k_index == q_index)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return bias[:, None]


class AttentionWeights(nn.Module):
    """Projection weights of one attention layer, stored in ``[out, in]`` (``nn.Linear``) layout."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        assert cfg.n_key_value_heads is not None
        d, q_dim = cfg.d_model, cfg.n_heads * cfg.d_head
        kv_dim = cfg.n_key_value_heads * cfg.d_head
        self.q_dim, self.kv_dim = q_dim, kv_dim

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=cfg.dtype))

        if cfg.qkv_layout == "fused":
            self.w_qkv = param(q_dim + 2 * kv_dim, d)
        else:
            self.w_q, self.w_k, self.w_v = param(q_dim, d), param(kv_dim, d), param(kv_dim, d)
        self.b_q = param(q_dim) if cfg.qk_bias else None
        self.b_k = param(kv_dim) if cfg.qk_bias else None
        self.b_v = param(kv_dim) if cfg.v_bias else None
        self.w_o = param(d, q_dim)
        self.b_o = param(d) if cfg.o_bias else None
        self.w_gate = param(q_dim, d) if cfg.attn_output_gate else None
        self.q_norm = NormWeights(q_dim, cfg.norm_type, cfg.dtype) if cfg.qk_norm and cfg.norm_weights else None
        self.k_norm = NormWeights(kv_dim, cfg.norm_type, cfg.dtype) if cfg.qk_norm and cfg.norm_weights else None

    def qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w_q, w_k, w_v)`` in ``[out, in]`` layout (views of the fused matrix where fused)."""
        if hasattr(self, "w_qkv"):
            return tuple(self.w_qkv.split([self.q_dim, self.kv_dim, self.kv_dim], dim=0))  # type: ignore[return-value]
        return self.w_q, self.w_k, self.w_v


class HookedAttention(WeightView):
    """One effective layer's attention: hook points here, weights in an ``AttentionWeights``."""

    weights: AttentionWeights

    def __init__(self, weights: AttentionWeights, cfg: LoopedConfig) -> None:
        super().__init__(weights)
        self.cfg = cfg
        self.hook_q = LoopHookPoint()  # [batch, pos, head, d_head]
        self.hook_k = LoopHookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = LoopHookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_rot_q = LoopHookPoint()  # [batch, pos, head, d_head]
        self.hook_rot_k = LoopHookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = LoopHookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = LoopHookPoint()  # [batch, head, query_pos, key_pos]
        if cfg.attn_output_gate:
            self.hook_gate = LoopHookPoint()  # [batch, pos, head, d_head]
        self.hook_z = LoopHookPoint()  # [batch, pos, head, d_head]
        # Hook points that exist while a TransformerLens flag is on (see show_flagged_hooks):
        self.hook_result = LoopHookPoint()  # [batch, pos, head, d_model]      use_attn_result
        self.hook_q_input = LoopHookPoint()  # [batch, pos, head, d_model]     use_split_qkv_input
        self.hook_k_input = LoopHookPoint()  # [batch, pos, kv_head, d_model]  use_split_qkv_input
        self.hook_v_input = LoopHookPoint()  # [batch, pos, kv_head, d_model]  use_split_qkv_input
        self.hook_attn_in = LoopHookPoint()  # [batch, pos, head, d_model]     use_attn_in
        if cfg.qk_norm:
            self.q_norm = HookedNorm(weights.q_norm, cfg.norm_type, cfg.eps)
            self.k_norm = HookedNorm(weights.k_norm, cfg.norm_type, cfg.eps)
        show_flagged_hooks(self, cfg)

    # ---- TransformerLens weight views ([head, d_model, d_head] etc.) ----
    def _heads_in(self, w: torch.Tensor) -> torch.Tensor:
        heads = einops.rearrange(w, "(h d_head) d_model -> h d_model d_head", d_head=self.cfg.d_head)
        return heads.repeat_interleave(self.cfg.n_groups, dim=0) if heads.shape[0] != self.cfg.n_heads else heads

    @property
    def W_Q(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return self._heads_in(self.weights.qkv_weights()[0])

    @property
    def W_K(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return self._heads_in(self.weights.qkv_weights()[1])

    @property
    def W_V(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return self._heads_in(self.weights.qkv_weights()[2])

    @property
    def W_O(self) -> Float[torch.Tensor, "head d_head d_model"]:
        return einops.rearrange(self.weights.w_o, "d_model (h d_head) -> h d_head d_model", d_head=self.cfg.d_head)

    def _bias(self, b: torch.Tensor | None, n: int) -> torch.Tensor:
        if b is None:
            return torch.zeros(self.cfg.n_heads, self.cfg.d_head, dtype=self.weights.w_o.dtype, device=self.weights.w_o.device)
        return b.view(n, self.cfg.d_head).repeat_interleave(self.cfg.n_heads // n, dim=0)

    @property
    def b_Q(self) -> Float[torch.Tensor, "head d_head"]:
        return self._bias(self.weights.b_q, self.cfg.n_heads)

    @property
    def b_K(self) -> Float[torch.Tensor, "head d_head"]:
        return self._bias(self.weights.b_k, self.cfg.n_key_value_heads)  # type: ignore[arg-type]

    @property
    def b_V(self) -> Float[torch.Tensor, "head d_head"]:
        return self._bias(self.weights.b_v, self.cfg.n_key_value_heads)  # type: ignore[arg-type]

    @property
    def b_O(self) -> Float[torch.Tensor, "d_model"]:
        w = self.weights
        return w.b_o if w.b_o is not None else torch.zeros(self.cfg.d_model, dtype=w.w_o.dtype, device=w.w_o.device)

    # ---- forward ----
    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.weights
        if hasattr(w, "w_qkv") and not split_projections(x):
            bias = None
            if w.b_q is not None or w.b_v is not None:  # one fused projection, biases included
                zeros_qk = w.w_qkv.new_zeros(w.q_dim + w.kv_dim) if w.b_q is None else None
                zeros_v = w.w_qkv.new_zeros(w.kv_dim) if w.b_v is None else None
                qk = [zeros_qk] if zeros_qk is not None else [w.b_q, w.b_k]
                bias = torch.cat([*qk, w.b_v if w.b_v is not None else zeros_v])
            q, k, v = F.linear(x, w.w_qkv, bias).split([w.q_dim, w.kv_dim, w.kv_dim], dim=-1)
        else:  # separate matrices, or row blocks of the fused one (views, no copy)
            w_q, w_k, w_v = w.qkv_weights()
            q, k, v = F.linear(x, w_q, w.b_q), F.linear(x, w_k, w.b_k), F.linear(x, w_v, w.b_v)
        return q, k, v

    def _project_per_head(
        self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each head projects its own copy of the input (``[batch, pos, head, d_model]``):
        ``[batch, pos, head * d_head]`` results, as ``_project`` returns."""
        w, d_head = self.weights, self.cfg.d_head
        out = []
        for x, weight, bias in zip(inputs, w.qkv_weights(), (w.b_q, w.b_k, w.b_v)):
            heads = weight.view(x.shape[2], d_head, x.shape[3])  # [head, d_head, d_model]
            y = torch.einsum("bphm,hdm->bphd", x, heads).flatten(-2)
            out.append(y if bias is None else y + bias)
        return out[0], out[1], out[2]

    def forward(
        self,
        x: Float[torch.Tensor, "batch pos d_model"] | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        context: AttentionContext | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """``x``: the (normed) input, or one input per head for q, k and v
        (``[batch, pos, head, d_model]``, see the module docstring)."""
        cfg = self.cfg
        context = context if context is not None else AttentionContext()
        per_head = isinstance(x, tuple)
        q, k, v = self._project_per_head(x) if per_head else self._project(x)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        batch, n_pos = q.shape[:2]
        q = self.hook_q(q.view(batch, n_pos, cfg.n_heads, cfg.d_head))
        k = self.hook_k(k.view(batch, n_pos, -1, cfg.d_head))
        v = self.hook_v(v.view(batch, n_pos, -1, cfg.d_head))
        if context.rotary is not None:
            q, k = apply_rotary_tables(q, context.rotary), apply_rotary_tables(k, context.rotary)
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        key_valid = context.key_valid
        if context.kv is not None:
            k, v, from_slot = context.kv.update(k, v)
            key_valid = from_slot if from_slot is not None else key_valid
        scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.d_head)

        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d]
        if is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern):
            pattern, changed = self._hooked_pattern(qh, kh, context, key_valid, scale)
            if changed:  # a hook changed the scores or the pattern: attend with what it returned
                zh = self._pattern_times_values(pattern, vh)
            else:  # read only: the fused kernel's numbers, the gradient through the pattern
                zh = self._fused(qh, kh, vh, context, key_valid, scale)
                if pattern is not None:
                    zh = exact_with_gradient_of(zh, lambda: self._pattern_times_values(pattern, vh))
        else:
            zh = self._fused(qh, kh, vh, context, key_valid, scale)
        z = zh.transpose(1, 2)  # [batch, pos, head, d_head]
        if cfg.attn_output_gate:
            z = self.hook_gate(self._gate(x, batch, n_pos)) * z
        z = self.hook_z(z)
        if cfg.use_attn_result:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            out = result.sum(dim=-2)
            return out + self.weights.b_o if self.weights.b_o is not None else out
        return F.linear(z.reshape(batch, n_pos, cfg.n_heads * cfg.d_head), self.weights.w_o, self.weights.b_o)

    def _fused(
        self,
        qh: torch.Tensor,
        kh: torch.Tensor,
        vh: torch.Tensor,
        context: AttentionContext,
        key_valid: torch.Tensor | None,
        scale: float,
    ) -> Float[torch.Tensor, "batch head query_pos d_head"]:
        """PyTorch's fused scaled-dot-product attention (the pattern is never materialised)."""
        cfg = self.cfg
        bias = context.bias(qh.shape[2], kh.shape[2], key_valid, qh.dtype, qh.device)
        causal = {"is_causal": True} if bias is None else {"attn_mask": bias}
        if cfg.n_groups > 1 and not _SDPA_HAS_GQA:
            kh, vh = self._every_head(kh), self._every_head(vh)
        extra = {"enable_gqa": True} if cfg.n_groups > 1 and _SDPA_HAS_GQA else {}
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale, **causal, **extra)

    def _hooked_pattern(
        self,
        qh: torch.Tensor,
        kh: torch.Tensor,
        context: AttentionContext,
        key_valid: torch.Tensor | None,
        scale: float,
    ) -> tuple[Float[torch.Tensor, "batch head query_pos key_pos"] | None, bool]:
        """Fire ``hook_attn_scores`` and ``hook_pattern``: the pattern (None where nothing needs
        it) and whether a hook changed the scores or the pattern (see ``run_hook_point``).

        As the fused kernel computes them: scores and softmax in float32 at least (bf16 / fp16
        models: ``hook_attn_scores`` is float32, as in TransformerLens's HookedTransformer), the
        pattern in the model's dtype.
        """
        cfg = self.cfg
        batch, _, n_pos, _ = qh.shape
        n_keys = kh.shape[2]
        dtype = torch.promote_types(qh.dtype, torch.float32)
        kh_full = self._every_head(kh)
        # scale * q k^T + mask (0 / -inf) in one batched GEMM: the same values as
        # (q @ k^T) * scale followed by masked_fill, without two more passes over the scores.
        heads = batch * cfg.n_heads
        bias = context.bias(n_pos, n_keys, key_valid, dtype, qh.device)
        if bias is None:
            mask = causal_mask_bias(n_pos, dtype, qh.device)
        else:
            mask = bias.expand(batch, cfg.n_heads, n_pos, n_keys).reshape(heads, n_pos, n_keys)
        scores = torch.baddbmm(
            mask,
            qh.reshape(heads, n_pos, cfg.d_head).to(dtype),
            kh_full.reshape(heads, n_keys, cfg.d_head).transpose(1, 2).to(dtype),
            alpha=scale,
        ).view(batch, cfg.n_heads, n_pos, n_keys)
        changed = False
        if is_hooked(self.hook_attn_scores):
            scores, changed = run_hook_point(self.hook_attn_scores, scores)
        needed = changed or is_hooked(self.hook_pattern) or (torch.is_grad_enabled() and scores.requires_grad)
        if not needed:
            return None, False
        pattern = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(qh.dtype)
        if is_hooked(self.hook_pattern):
            pattern, pattern_changed = run_hook_point(self.hook_pattern, pattern)
            changed = changed or pattern_changed
        return pattern, changed

    def _pattern_times_values(
        self, pattern: Float[torch.Tensor, "batch head query_pos key_pos"], vh: torch.Tensor
    ) -> Float[torch.Tensor, "batch head query_pos d_head"]:
        """``pattern @ v``, accumulated in float32 at least and cast back once (as the fused
        kernel does)."""
        vh_full = self._every_head(vh)
        dtype = torch.promote_types(torch.promote_types(pattern.dtype, vh.dtype), torch.float32)
        return torch.matmul(pattern.to(dtype), vh_full.to(dtype)).to(vh.dtype)

    def _every_head(self, t: Float[torch.Tensor, "batch kv_head pos d"]) -> Float[torch.Tensor, "batch head pos d"]:
        """Keys or values repeated for every query head (GQA); unchanged without groups."""
        return t.repeat_interleave(self.cfg.n_groups, dim=1) if self.cfg.n_groups > 1 else t

    def _gate(self, x: torch.Tensor | tuple[torch.Tensor, ...], batch: int, n_pos: int) -> torch.Tensor:
        """HRM's output gate ``sigmoid(x W_gate)`` per head dim; with per-head inputs each head
        gates with its query input."""
        w_gate = self.weights.w_gate
        assert w_gate is not None
        cfg = self.cfg
        if isinstance(x, tuple):
            heads = w_gate.view(cfg.n_heads, cfg.d_head, cfg.d_model)
            return torch.sigmoid(torch.einsum("bphm,hdm->bphd", x[0], heads))
        return torch.sigmoid(F.linear(x, w_gate).view(batch, n_pos, cfg.n_heads, cfg.d_head))


#: Hook points that exist while a TransformerLens config flag is on: (module attribute, flag).
FLAGGED_HOOKS = {
    "hook_result": "use_attn_result",
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_attn_in": "use_attn_in",
    "hook_mlp_in": "use_hook_mlp_in",
}


def show_flagged_hooks(module: nn.Module, cfg: LoopedConfig) -> None:
    """Show the flagged hook points of ``module`` whose flag is on, hide the others (hidden
    points keep their hooks, see ``set_present``)."""
    for name, flag in FLAGGED_HOOKS.items():
        if name in module._modules or name in module.__dict__.get("_hidden_children", {}):
            set_present(module, name, bool(getattr(cfg, flag, False)))
