"""Shared fixtures: tiny random looped models in every layout variant."""

from __future__ import annotations

import pytest
import torch

from tl_loop import HookedLoopedTransformer, LoopedConfig

#: Layout variants exercised by the unit tests (name -> LoopedConfig overrides).
VARIANTS: dict[str, dict] = {
    "plain": dict(n_core_layers=2, n_steps=3),
    "prelude_coda_add": dict(n_prelude_layers=1, n_core_layers=2, n_coda_layers=1, n_steps=3,
                             injection="add", state_init="prelude"),
    "huginn_like": dict(n_prelude_layers=1, n_core_layers=2, n_coda_layers=1, n_steps=3,
                        injection="linear", state_init="random", state_init_scale=8.0,
                        resid_norm=True, norm_after_loop=True, qk_bias=True,
                        rotary_layout="interleaved", rope_in_float32=True, tie_embeddings=True,
                        embed_scale=5.0),
    "ouro_like": dict(n_core_layers=2, n_steps=3, output_norm=True, norm_between_steps=True,
                      exit_gate=True, n_key_value_heads=2, qkv_layout="split", mlp_layout="split"),
    "olmo_retro_like": dict(n_prelude_layers=1, n_core_layers=2, n_coda_layers=1, n_steps=2,
                            injection="linear", state_init="random", pre_norm=False, output_norm=True,
                            qk_norm=True, n_key_value_heads=2),
    "hrm_like": dict(n_core_layers=2, n_inner_layers=1, inner_cycles=2, n_steps=2, state_init="prelude",
                     inner_state_init="learned", norm_weights=False, norm_between_steps=True,
                     inner_norm=True, attn_output_gate=True, embed_scale=3.0),
    "layernorm_plain_mlp": dict(n_prelude_layers=1, n_core_layers=1, n_steps=4, injection="add",
                                norm_type="LN", gated_mlp=False, act_fn="gelu", mlp_bias=True,
                                v_bias=True, o_bias=True, unembed_bias=True, norm_between_steps=True,
                                loop_norm_weights="own", use_attn_result=True),
}


def make_cfg(variant: str = "plain", **overrides) -> LoopedConfig:
    base = dict(d_model=32, d_head=8, n_heads=4, d_mlp=48, d_vocab=61, n_ctx=32)
    base.update(VARIANTS[variant])
    base.update(overrides)
    return LoopedConfig(**base)


def rel_dev(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute deviation relative to the largest magnitude of ``expected``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).abs().max() / expected.abs().max())


def make_model(variant: str = "plain", seed: int = 0, **overrides) -> HookedLoopedTransformer:
    model = HookedLoopedTransformer(make_cfg(variant, **overrides), seed=seed)
    # Non-trivial norm weights and biases so every parameter matters in the tests.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.mul_(5.0)
    return model


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation overhead (and stall on a busy
    2-core machine), so the suite runs single-threaded."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
