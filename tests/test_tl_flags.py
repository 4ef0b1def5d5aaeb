"""TransformerLens's hook flags (``use_attn_result``, ``use_split_qkv_input``, ``use_attn_in``,
``use_hook_mlp_in``) with their ``set_use_*`` setters, and the config fields TL reads."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, make_model, rel_dev

from tl_loop import LoopedConfig
from tl_loop.errors import InputError

SETTERS = {
    "use_attn_result": ["attn.hook_result"],
    "use_split_qkv_input": ["attn.hook_q_input", "attn.hook_k_input", "attn.hook_v_input"],
    "use_attn_in": ["attn.hook_attn_in"],
    "use_hook_mlp_in": ["hook_mlp_in"],
}


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("flag", list(SETTERS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_flag_adds_its_hooks_at_every_layer_and_changes_no_number(variant, flag, tokens):
    model = make_model(variant, use_attn_result=False)
    if flag == "use_attn_in" and model.cfg.n_groups > 1:
        with pytest.raises(InputError, match="use_split_qkv_input"):
            model.set_use_attn_in(True)
        return
    before = model(tokens)
    names = [f"blocks.{i}.{suffix}" for i in range(model.cfg.n_layers) for suffix in SETTERS[flag]]
    assert not any(n in model.hook_dict for n in names)
    getattr(model, f"set_{flag}")(True)
    assert getattr(model.cfg, flag) is True
    logits, cache = model.run_with_cache(tokens)
    assert all(n in cache for n in names)
    assert rel_dev(logits, before) < 1e-5 and rel_dev(model(tokens), before) < 1e-5
    model.set_n_steps(model.cfg.n_steps + 2)  # views of new depths carry the flag's hooks too
    assert all(f"blocks.{model.cfg.n_layers - 1}.{suffix}" in model.hook_dict for suffix in SETTERS[flag])
    getattr(model, f"set_{flag}")(False)
    assert not any(n in model.hook_dict for n in names)


def test_split_qkv_inputs_are_per_head_copies_of_the_stream_before_ln1(tokens):
    model = make_model("ouro_like")  # GQA: 4 query heads, 2 key-value heads
    model.set_use_split_qkv_input(True)
    _, cache = model.run_with_cache(tokens)
    q_in, k_in = cache["blocks.1.attn.hook_q_input"], cache["blocks.1.attn.hook_k_input"]
    assert q_in.shape == (2, 6, 4, 32) and k_in.shape == (2, 6, 2, 32)
    for h in range(4):
        torch.testing.assert_close(q_in[:, :, h], cache["blocks.1.hook_resid_pre"])

    # Patching one key-value head's input changes that head's keys only, and no query.
    def shift(x, hook):
        x = x.clone()
        x[:, :, 1] += 1.0
        return x

    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_k_input", shift)]):
        _, patched = model.run_with_cache(tokens)
    torch.testing.assert_close(patched["blocks.1.attn.hook_k"][:, :, 0], cache["blocks.1.attn.hook_k"][:, :, 0])
    assert not torch.allclose(patched["blocks.1.attn.hook_k"][:, :, 1], cache["blocks.1.attn.hook_k"][:, :, 1])
    torch.testing.assert_close(patched["blocks.1.attn.hook_q"], cache["blocks.1.attn.hook_q"])
    torch.testing.assert_close(patched["blocks.1.attn.hook_v"], cache["blocks.1.attn.hook_v"])


def test_mlp_in_patches_the_mlp_input_only(tokens):
    model = make_model("prelude_coda_add")
    model.set_use_hook_mlp_in(True)
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.2.hook_mlp_in"], cache["blocks.2.hook_resid_mid"])
    delta = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with model.hooks(fwd_hooks=[("blocks.2.hook_mlp_in", lambda x, hook: x + delta)]):
        _, patched = model.run_with_cache(tokens)
    block = model.blocks[2]
    mlp_out = block.mlp(block.ln2(cache["blocks.2.hook_resid_mid"] + delta))
    torch.testing.assert_close(patched["blocks.2.hook_resid_post"], cache["blocks.2.hook_resid_mid"] + mlp_out)


def test_a_hook_on_a_flagged_point_that_is_switched_off_raises_until_reset(tokens):
    model = make_model("plain")
    model.set_use_hook_mlp_in(True)
    model.add_hook("blocks.1.hook_mlp_in", lambda x, hook: x * 2)
    model.set_use_hook_mlp_in(False)
    with pytest.raises(InputError, match=r"blocks\.1\.hook_mlp_in.*use_\* flags"):
        model(tokens)
    model.reset_hooks()
    model(tokens)


def test_flags_are_checked():
    model = make_model("plain")
    model.set_use_attn_in(True)
    with pytest.raises(InputError, match="mutually exclusive"):
        model.set_use_split_qkv_input(True)
    assert model.cfg.use_split_qkv_input is False and model.cfg.use_attn_in is True
    with pytest.raises(InputError, match="True or False"):
        model.set_use_hook_mlp_in(1)


def test_edge_attribution_patching_runs_on_a_looped_model(tokens):
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    model = make_model("plain")
    clean, corrupt = tokens[:1], tokens[:1].clone()
    corrupt[0, 2] = (corrupt[0, 2] + 1) % 61
    result = attribution_patch(model, clean, corrupt, lambda logits: logits[0, -1, 3] - logits[0, -1, 5],
                               EdgeAttributionConfig(granularity="edge"))
    layers = {node.layer for edge in result.edge_scores for node in edge if node.layer is not None}
    assert layers == set(range(model.cfg.n_layers))  # every effective layer is a node of the graph
    assert not (model.cfg.use_attn_result or model.cfg.use_split_qkv_input or model.cfg.use_hook_mlp_in)


# ------------------------------------------------------------------ config fields honoured or refused
def test_normalization_type_and_norm_fields_agree_or_raise():
    assert LoopedConfig(normalization_type="LN").norm_type == "LN"
    cfg = LoopedConfig(normalization_type="RMSPre")
    assert (cfg.norm_type, cfg.norm_weights) == ("RMS", False)
    assert LoopedConfig(norm_type="LN", norm_weights=False).normalization_type == "LNPre"
    with pytest.raises(ValueError, match="normalization_type='LN' disagrees with norm_type='RMS'"):
        LoopedConfig(normalization_type="LN", norm_type="RMS")
    with pytest.raises(ValueError, match="norm_weights=False"):
        LoopedConfig(normalization_type="RMS", norm_weights=False)
    with pytest.raises(ValueError, match="'RMSNorm'"):
        LoopedConfig(normalization_type="RMSNorm")


@pytest.mark.parametrize("injection", ["none", "add", "linear"])
def test_injection_is_honoured_with_inner_cycles(injection, tokens):
    model = make_model("hrm_like", injection=injection)
    assert model.cfg.injection == injection
    ops = [op for op in model.program if op.kind == "inject"]
    assert {op.how for op in ops} == {injection}
    _, cache = model.run_with_cache(tokens)
    inner = cache["loops.0.inner.1.hook_state_out"]
    state_in = cache["loops.0.hook_state_in"]
    first = cache[f"blocks.{model.schedule.index(0, model.cfg.layers_per_step - model.cfg.n_core_layers)}.hook_resid_pre"]
    if injection == "none":
        torch.testing.assert_close(first, state_in)
    elif injection == "add":
        torch.testing.assert_close(first, state_in + inner)
    else:
        torch.testing.assert_close(first, model.adapter(state_in, inner))
    assert make_model("hrm_like").cfg.injection == "add"  # the family default
