"""The hot path's shortcuts change no result: hook points that skip the module call when nothing
is attached, the materialised attention (one GEMM with the mask), RoPE without rotate_half, fused
q/k/v biases, and tables cached across calls (also across inference mode)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from transformer_lens.hook_points import HookPoint

from tl_loop._tl_compat import TL_MAJOR

from tl_loop.components.attention import causal_mask_bias
from tl_loop.components.base import LoopHookPoint
from tl_loop.components.rotary import apply_rotary, apply_rotary_tables, rotary_cos_sin, rotary_inv_freq, rotary_tables


# ---------------------------------------------------------------------------- hook points
def test_every_hook_point_is_a_fast_hook_point(variant):
    model = make_model(variant)
    assert model.hook_dict and all(isinstance(hp, LoopHookPoint) for hp in model.hook_dict.values())
    assert all(isinstance(hp, HookPoint) for hp in model.hook_dict.values())  # TransformerLens sees HookPoints


def test_hook_point_with_nothing_attached_returns_its_input():
    hp = LoopHookPoint()
    x = torch.randn(2, 3)
    assert hp(x) is x


def test_every_kind_of_hook_still_fires():
    hp = LoopHookPoint()
    hp.name = "hp"
    x = torch.ones(2, 3)
    seen: list[str] = []
    handle = hp.add_hook(lambda t, hook: t * 2)  # TransformerLens hook replacing the value
    assert torch.equal(hp(x), 2 * x)
    hp.remove_hooks()
    assert hp(x) is x
    h = hp.register_forward_hook(lambda m, args, out: out + 1)  # raw torch forward hook
    assert torch.equal(hp(x), x + 1)
    h.remove()
    h = hp.register_forward_pre_hook(lambda m, args: (args[0] * 3,))  # raw torch pre-hook
    assert torch.equal(hp(x), 3 * x)
    h.remove()
    g = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append("global"))
    try:
        hp(x)
    finally:
        g.remove()
    assert seen == ["global"]
    assert hp(x) is x
    assert handle is not None or TL_MAJOR < 4  # HookPoint.add_hook returns its handle from TransformerLens 4


def test_backward_hooks_fire_through_the_model():
    model = make_model("plain")
    grads: dict[str, torch.Tensor] = {}
    model.add_hook("blocks.1.hook_resid_post", lambda g, hook: grads.setdefault(hook.name, g), dir="bwd")
    loss = model(torch.tensor([[1, 2, 3, 4]]), return_type="loss")
    loss.backward()
    model.reset_hooks(including_permanent=True)
    assert grads["blocks.1.hook_resid_post"].shape == (1, 4, model.cfg.d_model)
    assert grads["blocks.1.hook_resid_post"].abs().sum() > 0


# ---------------------------------------------------------------------------- attention
@pytest.mark.parametrize("variant", ["plain", "ouro_like", "hrm_like", "huginn_like"])
def test_materialised_scores_are_scaled_masked_products(variant):
    """hook_attn_scores = (rot_q @ rot_k^T) * scale with -inf above the diagonal; the pattern
    path and the fused path give the same logits."""
    model = make_model(variant)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(3))
    logits, cache = model.run_with_cache(tokens)
    for i in (0, cfg.n_layers - 1):
        q = cache[f"blocks.{i}.attn.hook_rot_q"].transpose(1, 2)
        k = cache[f"blocks.{i}.attn.hook_rot_k"].transpose(1, 2).repeat_interleave(cfg.n_groups, dim=1)
        scale = cfg.attn_scale if cfg.attn_scale is not None else 1 / math.sqrt(cfg.d_head)
        expected = torch.matmul(q, k.transpose(-1, -2)) * scale
        expected = expected.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_attn_scores"], expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], expected.softmax(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(tokens), logits, rtol=1e-5, atol=1e-5)


def test_causal_mask_is_built_once_and_correct():
    a = causal_mask_bias(5, torch.float32, torch.device("cpu"))
    assert causal_mask_bias(5, torch.float32, torch.device("cpu")) is a
    assert torch.equal(a == 0, torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.isneginf(a[~torch.ones(5, 5, dtype=torch.bool).tril()]).all()
    assert causal_mask_bias(5, torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16


def test_tables_built_in_inference_mode_serve_training_later():
    """The RoPE table and the mask are cached across calls: one first built under
    torch.inference_mode must still work in a pass that is differentiated."""
    model = make_model("hrm_like")
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        model.run_with_cache(tokens)
        causal_mask_bias(9, torch.float32, torch.device("cpu"))
    model.train()
    loss = model(tokens, return_type="loss")
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)]):
        loss = loss + model(tokens, return_type="loss")
    loss.backward()
    assert model.embed.W_E.grad is not None


@pytest.mark.parametrize("variant", ["huginn_like", "layernorm_plain_mlp"])
def test_fused_projection_biases(variant):
    """q/k/v biases added inside the fused projection equal adding them afterwards."""
    model = make_model(variant)
    attn = model.blocks[0].attn
    w = attn.weights
    x = torch.randn(2, 5, model.cfg.d_model)
    q, k, v = attn._project(x)
    eq, ek, ev = F.linear(x, w.w_qkv).split([w.q_dim, w.kv_dim, w.kv_dim], dim=-1)
    if w.b_q is not None:
        eq, ek = eq + w.b_q, ek + w.b_k
    if w.b_v is not None:
        ev = ev + w.b_v
    assert (w.b_q is not None) or (w.b_v is not None)
    for got, want in ((q, eq), (k, ek), (v, ev)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["hrm_like", "huginn_like", "layernorm_plain_mlp", "olmo_retro_like"])
def test_fused_and_split_projections_agree(variant, monkeypatch):
    """Fused q/k/v and gate/up matrices run as one GEMM (GPU path) or one per row block (CPU
    path): the same model either way."""
    from tl_loop.components import attention, mlp

    model = make_model(variant)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(4))
    split_logits, split_cache = model.run_with_cache(tokens)
    monkeypatch.setattr(attention, "split_projections", lambda x: False)
    monkeypatch.setattr(mlp, "split_projections", lambda x: False)
    fused_logits, fused_cache = model.run_with_cache(tokens)
    torch.testing.assert_close(fused_logits, split_logits, rtol=1e-5, atol=1e-5)
    for name in ("blocks.0.attn.hook_q", "blocks.0.attn.hook_v", "blocks.0.mlp.hook_pre"):
        torch.testing.assert_close(fused_cache[name], split_cache[name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- norms
@pytest.mark.parametrize("norm_type", ["RMS", "LN"])
def test_norm_paths(norm_type):
    """No hook on the scale: x * rsqrt(var + eps) (Hugging Face's RMSNorm bit for bit); with one,
    division by whatever the hook returns (a replaced scale takes effect)."""
    from tl_loop.components.norm import HookedNorm, NormWeights

    weights = NormWeights(12, norm_type)
    with torch.no_grad():
        weights.w.normal_()
    norm = HookedNorm(weights, norm_type, 1e-6)
    norm.hook_scale.name = "hook_scale"
    x = torch.randn(3, 5, 12)
    xc = x - x.mean(-1, keepdim=True) if norm_type == "LN" else x
    fast = norm(x)
    var = xc.pow(2).mean(-1, keepdim=True) + 1e-6
    expected = xc * torch.rsqrt(var) * weights.w + (weights.b if weights.b is not None else 0)
    assert torch.equal(fast, expected)
    seen = []
    norm.hook_scale.add_hook(lambda s, hook: seen.append(s))
    torch.testing.assert_close(norm(x), fast, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen[0], var.sqrt())
    norm.hook_scale.remove_hooks()
    norm.hook_scale.add_hook(lambda s, hook: 2 * s)
    bias = weights.b if weights.b is not None else 0
    torch.testing.assert_close(norm(x) - bias, (fast - bias) / 2, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- rotary
def rotate_half_reference(x, cos, sin, in_float32):
    """Hugging Face's formula: x * cos + rotate_half(x) * sin with full-width tables."""
    rot = 2 * cos.shape[-1]
    xr, rest = x[..., :rot], x[..., rot:]
    dtype = torch.float32 if in_float32 else x.dtype
    cos2 = torch.cat([cos, cos], -1)[:, None].to(dtype)
    sin2 = torch.cat([sin, sin], -1)[:, None].to(dtype)
    xr = xr.to(dtype)
    half = rot // 2
    out = (xr * cos2 + torch.cat([-xr[..., half:], xr[..., :half]], -1) * sin2).to(x.dtype)
    return torch.cat([out, rest], -1)


def complex_reference(x, cos, sin):
    """Huginn's formula: the complex product of adjacent pairs, in float32."""
    rot = 2 * cos.shape[-1]
    xr, rest = x[..., :rot], x[..., rot:]
    pairs = torch.view_as_complex(xr.float().reshape(*xr.shape[:-1], -1, 2).contiguous())
    out = torch.view_as_real(pairs * torch.complex(cos, sin)[:, None])
    return torch.cat([out.flatten(-2).to(x.dtype), rest], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [16, 8])
def test_rope_matches_the_reference_formulas(dtype, rot_dim):
    x = torch.randn(2, 7, 3, 16).to(dtype)
    cos, sin = rotary_cos_sin(7, rotary_inv_freq(rot_dim, 10000.0))
    for in_f32 in (False, True):
        assert torch.equal(apply_rotary(x, cos, sin, "half", in_f32), rotate_half_reference(x, cos, sin, in_f32))
    got = apply_rotary(x, cos, sin, "interleaved", True)
    torch.testing.assert_close(got, complex_reference(x, cos, sin), rtol=1e-5, atol=1e-5)
    # the forward pass's table-driven version: the same bits
    inv = rotary_inv_freq(rot_dim, 10000.0)
    for layout, in_f32 in (("half", False), ("half", True), ("interleaved", True)):
        tables = rotary_tables(7, inv, layout, dtype, in_f32)
        assert torch.equal(apply_rotary_tables(x, tables), apply_rotary(x, cos, sin, layout, in_f32))
