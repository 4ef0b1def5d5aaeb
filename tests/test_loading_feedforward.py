"""Feedforward checkpoints (Llama, Qwen2, Mistral, OLMo-2, GPT-2) loaded as looped models.

The reduction: with one step and no prelude/coda the looped model *is* the original transformer.
Random tiny ``transformers`` models are saved and reloaded with ``from_pretrained``.
"""

from __future__ import annotations

import json

import pytest
import torch

from tl_loop import HookedLoopedTransformer, attribution_names_filter
from tl_loop.errors import InputError
from tl_loop.loading.families.feedforward import parse_layout

transformers = pytest.importorskip("transformers")

VOCAB = 101
SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
             vocab_size=VOCAB, intermediate_size=96, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

#: name -> (config class, model class, config kwargs)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, rope_theta=10000.0)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, rope_parameters=LLAMA3_ROPE)),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                                       "factor": 4.0})),
    "llama_tied_bias": ("LlamaConfig", "LlamaForCausalLM",
                        dict(SMALL, tie_word_embeddings=True, attention_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, sliding_window=16)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(SMALL)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_head=4, n_layer=3, vocab_size=VOCAB, n_positions=32, initializer_range=0.1)),
}


def _hf_model(name: str, seed: int = 0):
    cfg_cls, model_cls, kwargs = MODELS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norm weights and biases
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (HF model, folder it was saved to); built lazily, once per module."""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            hf = _hf_model(name)
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder)
            made[name] = (hf, folder)
        return made[name]

    return get


def _tokens(n_pos: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------- (a), (b)
@pytest.mark.parametrize("name", ["llama", "llama3_rope", "llama_linear_rope", "llama_tied_bias"])
def test_llama_one_step_is_the_original(checkpoint, name):
    hf, folder = checkpoint(name)
    model = HookedLoopedTransformer.from_pretrained(folder)
    cfg = model.cfg
    assert cfg.family == "feedforward"
    assert (cfg.n_prelude_layers, cfg.n_core_layers, cfg.n_coda_layers, cfg.n_steps) == (0, 3, 0, 1)
    assert (cfg.injection, cfg.state_init) == ("none", "prelude")
    tokens = _tokens()
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens)
    diff = _max_diff(ours, ref)
    print(f"{name}: max |logits - HF| = {diff:.3g} (max |logit| {ref.abs().max():.3g})")
    assert diff < 1e-5
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers


def test_llama3_rope_scaling_is_in_effect(checkpoint):
    hf, _ = checkpoint("llama3_rope")
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert not torch.allclose(hf.model.rotary_emb.inv_freq, default)  # so the test above checks llama3


@pytest.mark.parametrize("name", ["qwen2", "gpt2", "mistral", "olmo2"])
def test_other_families_one_step_is_the_original(checkpoint, name):
    hf, folder = checkpoint(name)
    model = HookedLoopedTransformer.from_pretrained(folder)
    tokens = _tokens(16)
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens)
    rel = _max_diff(ours, ref) / ref.abs().max().item()
    print(f"{name}: max |logits - HF| / max |logit| = {rel:.3g}")
    assert rel < 1e-5


def test_qwen2_and_gpt2_biases_are_loaded(checkpoint):
    q = HookedLoopedTransformer.from_pretrained(checkpoint("qwen2")[1])
    assert q.cfg.qk_bias and q.cfg.v_bias and not q.cfg.o_bias
    hf_q = checkpoint("qwen2")[0].model.layers[1].self_attn
    torch.testing.assert_close(q.core[1].attn.b_k, hf_q.k_proj.bias)
    g = HookedLoopedTransformer.from_pretrained(checkpoint("gpt2")[1])
    assert g.cfg.positional_embedding_type == "standard" and g.cfg.tie_embeddings
    hf_g = checkpoint("gpt2")[0].transformer
    torch.testing.assert_close(g.W_pos, hf_g.wpe.weight)
    torch.testing.assert_close(g.core[0].attn.w_qkv, hf_g.h[0].attn.c_attn.weight.T)  # Conv1D is [in, out]
    assert "hook_pos_embed" in g.hook_dict and "hook_pos_embed" not in q.hook_dict


def test_sliding_window_caps_the_context(checkpoint):
    model = HookedLoopedTransformer.from_pretrained(checkpoint("mistral")[1])
    assert model.cfg.n_ctx == 16
    with pytest.raises(InputError, match="exceeds the model's context"):
        model(_tokens(17))


# ---------------------------------------------------------------------------------------- (c)
def _llama_reference(hf, tokens: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Run HF's own modules by hand: embed, the layers in ``order``, final norm, lm_head."""
    base = hf.model
    n_pos = tokens.shape[1]
    x = base.embed_tokens(tokens)
    position_ids = torch.arange(n_pos)[None]
    position_embeddings = base.rotary_emb(x, position_ids)
    mask = torch.full((n_pos, n_pos), float("-inf")).triu(1)[None, None]
    for layer in order:
        x = base.layers[layer](x, attention_mask=mask, position_ids=position_ids,
                               position_embeddings=position_embeddings)
    return hf.lm_head(base.norm(x))


def _gpt2_reference(hf, tokens: torch.Tensor, order: list[int]) -> torch.Tensor:
    base = hf.transformer
    n_pos = tokens.shape[1]
    x = base.wte(tokens) + base.wpe(torch.arange(n_pos))[None]
    mask = torch.full((n_pos, n_pos), float("-inf")).triu(1)[None, None]
    for layer in order:
        x = base.h[layer](x, attention_mask=mask)
    return hf.lm_head(base.ln_f(x))


REFERENCES = {"llama": _llama_reference, "gpt2": _gpt2_reference}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_looped_layout_matches_hand_written_reference(checkpoint, name):
    hf, folder = checkpoint(name)
    reference = REFERENCES[name]
    tokens = _tokens()
    with torch.no_grad():
        # The reference itself reproduces HF's forward when run in the original order.
        assert _max_diff(reference(hf, tokens, [0, 1, 2]), hf(tokens).logits) < 1e-5

        model = HookedLoopedTransformer.from_pretrained(folder, layout="1,1,1")
        assert _max_diff(model(tokens), hf(tokens).logits) < 1e-5  # n_steps=1: still the original

        looped = HookedLoopedTransformer.from_pretrained(folder, layout="1,1,1", n_steps=3)
        assert looped.cfg.n_layers == 5
        logits, cache = looped.run_with_cache(tokens)
        ref = reference(hf, tokens, [0, 1, 1, 1, 2])
    diff = _max_diff(logits, ref)
    print(f"{name} layout 1,1,1 x3 steps: max |logits - reference| = {diff:.3g}")
    assert diff < 1e-5
    assert _max_diff(logits, hf(tokens).logits) > 1e-2  # looping changed the model
    physical = [layer.physical for layer in looped.schedule]
    assert physical == ["prelude.0", "core.0", "core.0", "core.0", "coda.0"]
    for i in (1, 2, 3):
        assert looped.blocks[i].weights is looped.core[0]
        assert f"blocks.{i}.attn.hook_pattern" in looped.hook_dict
        assert f"blocks.{i}.hook_resid_post" in cache
    assert "blocks.5.hook_resid_pre" not in looped.hook_dict
    # The three runs of the core see different inputs.
    assert _max_diff(cache["blocks.1.hook_resid_pre"], cache["blocks.2.hook_resid_pre"]) > 1e-3


def test_dict_layout_equals_string_layout(checkpoint):
    _, folder = checkpoint("llama")
    a = HookedLoopedTransformer.from_pretrained(folder, layout={"prelude": [0], "core": [1, 2]}, n_steps=2)
    b = HookedLoopedTransformer.from_pretrained(folder, layout=(1, 2, 0), n_steps=2)
    assert (a.cfg.n_prelude_layers, a.cfg.n_core_layers, a.cfg.n_coda_layers) == (1, 2, 0)
    tokens = _tokens()
    torch.testing.assert_close(a(tokens), b(tokens), rtol=0, atol=0)


def test_injection_add_uses_prelude_output(checkpoint):
    _, folder = checkpoint("llama")
    model = HookedLoopedTransformer.from_pretrained(folder, layout="1,2,0", injection="add", n_steps=2)
    tokens = _tokens()
    _, cache = model.run_with_cache(tokens)
    prelude_out = cache["blocks.0.hook_resid_post"]
    torch.testing.assert_close(cache["loops.0.hook_injected"], 2 * prelude_out)
    torch.testing.assert_close(cache["loops.1.hook_injected"], cache["loops.0.hook_state_out"] + prelude_out)


# ---------------------------------------------------------------------------------------- (d)
def test_good_layouts():
    assert parse_layout(None, 3) == (0, 3, 0)
    assert parse_layout(" 1, 1 ,1", 3) == parse_layout([1, 1, 1], 3) == (1, 1, 1)
    assert parse_layout({"prelude": range(1), "core": [1, 2]}, 3) == (1, 2, 0)
    assert parse_layout({"core": [0, 1], "coda": [2]}, 3) == (0, 2, 1)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("2,2", "expected 3 layer counts"),
        ("1,1,2", "covers 4 layers but the checkpoint has 3"),
        ("1,0,2", "at least one layer"),
        ("-1,3,1", "must be >= 0"),
        ("a,b,c", "comma-separated layer counts"),
        (3, "layout must be"),
        ({"prelude": [0], "core": [2], "coda": [1]}, "out of order"),
        ({"core": [0, 2], "coda": [1]}, "not a contiguous"),
        ({"core": [0, 1, 2, 3]}, r"must lie in \[0, 3\)"),
        ({"core": [0, 1]}, r"layers \[2\] are in no stage"),
        ({"prelude": [0, 1], "core": [1, 2]}, r"layers \[1\] are in more than one stage"),
        ({"prelude": [0]}, "at least one layer"),
        ({"loop": [0, 1, 2]}, "unknown keys"),
        ({"core": "012"}, "must be a list of layer indices"),
        ({"prelude": [0], "core": None, "coda": [1, 2]}, "must be a list of layer indices"),
    ],
)
def test_bad_layouts_raise_clear_errors(layout, message):
    with pytest.raises(InputError, match=message):
        parse_layout(layout, 3)


def test_bad_options_surface_through_from_pretrained(checkpoint):
    _, folder = checkpoint("llama")
    with pytest.raises(ValueError, match="covers 4 layers"):
        HookedLoopedTransformer.from_pretrained(folder, layout="1,2,1")
    with pytest.raises(ValueError, match="no adapter weights"):
        HookedLoopedTransformer.from_pretrained(folder, injection="linear")
    with pytest.raises(ValueError, match="unknown option"):
        HookedLoopedTransformer.from_pretrained(folder, layuot="1,1,1")


LLAMA_JSON = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3,
              "intermediate_size": 96, "vocab_size": VOCAB}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
         "rope_parameters=.*rope_type 'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling=.*rope_type 'dynamic'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu'"),
        ({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 8,
          "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_unsupported_checkpoint_features_are_refused(changes, message):
    from tl_loop.errors import CheckpointError
    from tl_loop.loading.families.feedforward import to_config

    with pytest.raises(CheckpointError, match=message):
        to_config({**LLAMA_JSON, **changes}, set())


def test_old_style_rope_fields_are_read():
    from tl_loop.loading.families.feedforward import to_config

    old = {**LLAMA_JSON, "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    cfg = to_config(old, set())
    assert cfg.rotary_base == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert to_config(dict(LLAMA_JSON), set()).rope_scaling is None


# ---------------------------------------------------------------------------------------- (e)
@pytest.mark.parametrize("names_filter", [None, attribution_names_filter])
def test_gpt2_exact_attribution_with_position_embedding(checkpoint, names_filter):
    _, folder = checkpoint("gpt2")
    model = HookedLoopedTransformer.from_pretrained(folder, layout="1,1,1", n_steps=3, injection="add")
    tokens = _tokens()
    _, cache = model.run_with_cache(tokens, names_filter=names_filter)
    assert "hook_pos_embed" in cache
    torch.testing.assert_close(cache["hook_pos_embed"], model.W_pos[: tokens.shape[1]].expand(2, -1, -1))
    rows, labels = cache.decompose_resid(return_labels=True)
    assert labels[:3] == ["embed", "pos_embed", "0_attn_out"]
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    err = _max_diff(rows.sum(0), final)
    print(f"gpt2 looped: max |sum(decompose_resid) - resid_post| = {err:.3g}")
    assert err < 1e-4 * final.abs().max().item()
    # The position embedding enters through the prelude output twice (state and injection).
    mid = cache.decompose_resid(layer=2, return_labels=True)
    assert mid[1][1] == "pos_embed"
    torch.testing.assert_close(mid[0].sum(0), cache["blocks.2.hook_resid_pre"], rtol=1e-4, atol=1e-4)
    no_embeds = cache.decompose_resid(incl_embeds=False, return_labels=True)[1]
    assert "embed" not in no_embeds and "pos_embed" not in no_embeds
    heads = cache.stack_head_results(incl_remainder=True)
    torch.testing.assert_close(heads.sum(0), final, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_tied_bias"])
def test_save_pretrained_round_trip_through_transformers(checkpoint, tmp_path, name):
    hf, folder = checkpoint(name)
    model = HookedLoopedTransformer.from_pretrained(folder, layout="1,1,1")
    model.save_pretrained(tmp_path)
    assert "tl_loop" in json.loads((tmp_path / "config.json").read_text())  # the layout is recorded
    cls = type(hf)
    again = cls.from_pretrained(tmp_path).eval()
    tokens = _tokens()
    with torch.no_grad():
        assert _max_diff(again(tokens).logits, hf(tokens).logits) == 0.0
    reloaded = HookedLoopedTransformer.from_pretrained(tmp_path)
    assert reloaded.cfg.n_prelude_layers == 1 and reloaded.cfg.n_coda_layers == 1


def test_save_pretrained_keeps_the_loop_settings(checkpoint, tmp_path):
    _, folder = checkpoint("qwen2")
    model = HookedLoopedTransformer.from_pretrained(folder, layout="1,1,1", n_steps=4, injection="add",
                                                    state_init="zeros")
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())["tl_loop"]
    assert meta == {"layout": [1, 1, 1], "n_steps": 4, "injection": "add", "state_init": "zeros"}
    reloaded = HookedLoopedTransformer.from_pretrained(tmp_path)
    tokens = _tokens()
    torch.testing.assert_close(reloaded(tokens), model(tokens), rtol=0, atol=0)
    assert reloaded.cfg.n_steps == 4 and reloaded.cfg.injection == "add"
    # Explicit options still win over the recorded ones.
    assert HookedLoopedTransformer.from_pretrained(tmp_path, n_steps=1, layout="0,3,0").cfg.n_layers == 3


def test_export_refuses_models_of_unknown_origin(tmp_path):
    from tl_loop import LoopedConfig

    model = HookedLoopedTransformer(LoopedConfig(d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=11,
                                                 family="feedforward"), seed=0)
    with pytest.raises(ValueError, match="original format is unknown"):
        model.save_pretrained(tmp_path)


def test_standard_positions_in_a_random_model():
    from tl_loop import LoopedConfig

    base = dict(d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=11, n_ctx=8)
    cfg = LoopedConfig(**base, positional_embedding_type="standard", n_steps=2)
    model = HookedLoopedTransformer(cfg, seed=0)
    assert model.state_dict()["pos_embed.W_pos"].shape == (8, 16)
    assert model.W_pos.abs().sum() > 0  # initialised
    tokens = torch.full((1, 6), 5)
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache["hook_pos_embed"][0], model.W_pos[:6])
    assert _max_diff(logits[0, 0], logits[0, 5]) > 1e-4  # positions tell repeated tokens apart
    with torch.no_grad():
        model.pos_embed.W_pos.zero_()
    logits = model(tokens)
    torch.testing.assert_close(logits[0, 0], logits[0, 5])  # without them they cannot
    rotary = HookedLoopedTransformer(LoopedConfig(**base), seed=0)
    assert rotary.pos_embed is None and "hook_pos_embed" not in rotary.hook_dict
    with pytest.raises(AttributeError, match="W_pos"):
        _ = rotary.W_pos
    with pytest.raises(ValueError, match="positional_embedding_type"):
        LoopedConfig(**base, positional_embedding_type="alibi")
