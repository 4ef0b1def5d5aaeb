"""Huginn / raven and retrofitted-recurrence checkpoints: parity with the reference fixtures,
save/load round trips, dtypes and the loader's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model, rel_dev
from safetensors.torch import load_file, save_file

from tl_loop import CheckpointError, HookedLoopedTransformer, InputError
from tl_loop.loading import detect_family
from tl_loop.loading.files import read_config

FIXTURES = Path(__file__).parent / "fixtures"
#: fixture -> (family, block flavour)
CHECKPOINTS = {
    "raven_tiny": ("huginn", "sandwich"),
    "retro_llama_tiny": ("retrofitted", "llama"),
    "retro_olmo_tiny": ("retrofitted", "olmo"),
}
PARITY = 1e-4  # relative to the largest magnitude of the expected tensor (fixtures/README.md)


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    dev = rel_dev(actual, expected)
    assert dev <= PARITY, f"{what}: relative deviation {dev:.3g} > {PARITY}"


def load(name: str, **kwargs) -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained(FIXTURES / name, **kwargs)


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "expected.safetensors"))


def edited_copy(tmp_path: Path, name: str, config=None, tensors=None) -> Path:
    """A copy of fixture ``name`` with ``config(dict)`` / ``tensors(dict)`` applied in place."""
    folder = tmp_path / name
    folder.mkdir()
    cfg = read_config(FIXTURES / name)
    weights = load_file(str(FIXTURES / name / "model.safetensors"))
    if config is not None:
        config(cfg)
    if tensors is not None:
        tensors(weights)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def fixture_name(request) -> str:
    return request.param


# ---------------------------------------------------------------------------------- config
def test_family_is_detected_from_tensors_and_config(fixture_name):
    family, flavour = CHECKPOINTS[fixture_name]
    folder = FIXTURES / fixture_name
    config = read_config(folder)
    names = set(load_file(str(folder / "model.safetensors")))
    assert detect_family(config, names).name == family
    model = load(fixture_name)
    cfg = model.cfg
    assert cfg.family == family and cfg.extra["block_flavour"] == flavour
    assert cfg.n_steps == config["mean_recurrence"]
    assert (cfg.n_prelude_layers, cfg.n_core_layers, cfg.n_coda_layers) == (
        config["n_layers_in_prelude"], config["n_layers_in_recurrent_block"], config["n_layers_in_coda"])
    assert cfg.n_key_value_heads == config["num_key_value_heads"] and cfg.d_head == config["head_dim"]
    assert cfg.eps == config["norm_eps"] and cfg.state_init == "random"
    assert cfg.state_init_std == config["init_values"]["std"]
    assert cfg.embed_scale == cfg.state_init_scale == config["init_values"]["embed_scale"]
    if family == "huginn":
        assert cfg.n_ctx == config["block_size"] and cfg.rotary_base == config["rope_base"]
        assert cfg.norm_after_loop and cfg.resid_norm and cfg.qk_bias and cfg.tie_embeddings
    else:
        assert cfg.n_ctx == config["max_position_embeddings"] and cfg.rotary_base == config["rope_theta"]
        assert cfg.rope_scaling == config["rope_scaling"]
        assert not cfg.norm_after_loop and not cfg.tie_embeddings and cfg.embed_scale == 1.0
        assert cfg.qk_norm == (flavour == "olmo")
    # informational fields are kept aside, never read by the forward
    assert cfg.extra["config_json"]["sampling_scheme"] == config["sampling_scheme"]


# ---------------------------------------------------------------------------------- parity
def test_activations_match_reference(fixture_name):
    model, exp = load(fixture_name), expected(fixture_name)
    logits, cache = model.run_with_cache(exp["input_ids"], init_state=exp["init_state"])
    n_layers, n_steps = model.cfg.n_layers, model.cfg.n_steps
    assert sum(k.startswith("block_out.") for k in exp) == n_layers
    for i in range(n_layers):
        assert_parity(cache[f"blocks.{i}.hook_resid_post"], exp[f"block_out.{i}"], f"block_out.{i}")
    for r in range(n_steps):
        assert_parity(cache[f"loops.{r}.hook_state_in"], exp[f"state_before_injection.{r}"], f"state_in.{r}")
        assert_parity(cache[f"loops.{r}.hook_injected"], exp[f"injected.{r}"], f"injected.{r}")
    if "embeds" in exp:  # Huginn: scaled embeddings and ln_f(state) entering the coda
        assert_parity(cache["hook_embed"], exp["embeds"], "embeds")
        assert_parity(cache["ln_loop_out.hook_normalized"], exp["latent_into_coda"], "latent_into_coda")
    assert_parity(logits, exp["logits"], "logits")


def test_step_logits_match_reference(fixture_name):
    model, exp = load(fixture_name), expected(fixture_name)
    step_logits = model.step_logits(exp["input_ids"], init_state=exp["init_state"])
    assert step_logits.shape[0] == model.cfg.n_steps
    for r in range(model.cfg.n_steps):
        assert_parity(step_logits[r], exp[f"step_logits.{r}"], f"step_logits.{r}")


def test_other_step_counts_match_reference(fixture_name):
    model, exp = load(fixture_name), expected(fixture_name)
    for r in range(model.cfg.n_steps):
        logits = model(exp["input_ids"], n_steps=r + 1, init_state=exp["init_state"])
        assert_parity(logits, exp[f"step_logits.{r}"], f"logits at n_steps={r + 1}")
    assert model.cfg.n_steps == len(model.loops)  # the default depth is untouched


def test_random_state_is_seedable_and_init_state_reproduces_reference(fixture_name):
    model, exp = load(fixture_name), expected(fixture_name)
    ids, cfg = exp["input_ids"], model.cfg
    default = model(ids)
    assert torch.equal(default, model(ids))  # repeatable without a seed (cfg.state_init_seed)
    assert torch.equal(default, model(ids, init_seed=cfg.state_init_seed))
    assert torch.equal(model(ids, init_seed=7), model(ids, init_seed=7))
    assert not torch.allclose(model(ids, init_seed=7), model(ids, init_seed=8))
    # the random state is Huginn's like-init: truncated normal (std, +-3 std) times embed_scale
    state = model.initial_state(torch.zeros(4, 64, cfg.d_model), init_seed=3)
    scale = cfg.state_init_std * cfg.state_init_scale
    assert state.abs().max() <= 3 * scale + 1e-6
    assert abs(state.std().item() / scale - 0.987) < 0.03  # std of a normal truncated at 3 sigma
    # a random state gives other logits; the reference's state reproduces its logits
    assert rel_dev(default, exp["logits"]) > 1e-3
    assert_parity(model(ids, init_state=exp["init_state"]), exp["logits"], "logits")


# ---------------------------------------------------------------------------------- round trips
def _retro_llama_model():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    return make_model("olmo_retro_like", pre_norm=True, output_norm=False, qk_norm=False,
                      rope_scaling=scaling, family="retrofitted")


ROUND_TRIP_MODELS = {
    "huginn": lambda: make_model("huginn_like", embed_scale=8.0, state_init_scale=8.0, family="huginn"),
    "huginn_untied": lambda: make_model("huginn_like", embed_scale=8.0, state_init_scale=8.0,
                                        tie_embeddings=False, family="huginn"),
    "retro_llama": _retro_llama_model,
    "retro_olmo": lambda: make_model("olmo_retro_like", rope_in_float32=True, family="retrofitted"),
}


@pytest.mark.parametrize("layout", list(ROUND_TRIP_MODELS))
def test_random_model_round_trip(layout, tmp_path, tokens):
    model = ROUND_TRIP_MODELS[layout]()
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "huginn_raven"
    loaded = HookedLoopedTransformer.from_pretrained(tmp_path)
    assert loaded.cfg.family == model.cfg.family
    own, back = model.state_dict(), loaded.state_dict()
    assert set(own) == set(back)
    assert all(torch.equal(own[k], back[k]) for k in own)
    assert torch.equal(model(tokens), loaded(tokens))
    assert torch.equal(model(tokens, init_seed=5), loaded(tokens, init_seed=5))


def test_fixture_round_trip_keeps_the_format(fixture_name, tmp_path):
    model = load(fixture_name)
    model.save_pretrained(str(tmp_path))
    original = load_file(str(FIXTURES / fixture_name / "model.safetensors"))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    config, saved_config = read_config(FIXTURES / fixture_name), read_config(tmp_path)
    assert saved_config == config
    exp = expected(fixture_name)
    reloaded = HookedLoopedTransformer.from_pretrained(tmp_path)
    assert_parity(reloaded(exp["input_ids"], init_state=exp["init_state"]), exp["logits"], "logits")


def test_export_refuses_layouts_the_format_cannot_express(tmp_path):
    # huginn_like scales the state by 8 but the embeddings by 5: init_values holds one scale
    with pytest.raises(CheckpointError, match="state_init_scale"):
        make_model("huginn_like", family="huginn").save_pretrained(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="exit_gate"):
        make_model("ouro_like").save_pretrained(str(tmp_path / "b"), family="retrofitted")


# ---------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, "stored"])
def test_bf16_loading_runs(fixture_name, dtype, tmp_path):
    folder = FIXTURES / fixture_name
    if dtype == "stored":  # a bf16 checkpoint; Huginn's freqs_cis buffer stays float32
        folder = edited_copy(tmp_path, fixture_name, tensors=lambda t: t.update(
            {k: v if k == "freqs_cis" else v.bfloat16() for k, v in t.items()}))
    model = HookedLoopedTransformer.from_pretrained(folder, dtype=dtype)
    assert model.cfg.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    exp = expected(fixture_name)
    logits = model(exp["input_ids"], init_state=exp["init_state"].bfloat16())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert rel_dev(logits, exp["logits"]) < 5e-2
    assert torch.isfinite(model(exp["input_ids"])).all()  # the random state in bf16 too


# ---------------------------------------------------------------------------------- errors
def test_missing_tensor_is_named(tmp_path):
    name = "transformer.core_block.1.mlp.fc.weight"
    folder = edited_copy(tmp_path, "raven_tiny", tensors=lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensors: .*{name}"):
        HookedLoopedTransformer.from_pretrained(folder)


def test_unexpected_tensor_is_named(tmp_path):
    name = "transformer.core_block.0.attn.proj.bias"
    folder = edited_copy(tmp_path, "retro_llama_tiny", tensors=lambda t: t.update({name: torch.ones(64)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensors: .*{name}"):
        HookedLoopedTransformer.from_pretrained(folder)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    name = "transformer.prelude.1.mlp.proj.weight"
    folder = edited_copy(tmp_path, "retro_olmo_tiny", tensors=lambda t: t.update({name: torch.zeros(64, 95)}))
    with pytest.raises(CheckpointError, match=rf"{name}: expected \(64, 96\), found \(64, 95\)"):
        HookedLoopedTransformer.from_pretrained(folder)


@pytest.mark.parametrize("name, edit, message", [
    ("retro_llama_tiny", {"n_heads": 8}, r"attn\.Wqkv\.weight: expected \(192, 64\), found \(128, 64\)"),
    ("raven_tiny", {"n_heads": 8, "num_key_value_heads": None, "head_dim": None},
     r"attn\.qk_bias: expected \(2, 1, 8, 8\), found \(2, 1, 4, 16\)"),
    ("raven_tiny", {"n_heads": 8, "num_key_value_heads": 8}, "head_dim"),
    ("raven_tiny", {"intermediate_size": 64}, r"mlp\.fc\.weight: expected \(128, 64\), found \(256, 64\)"),
    ("raven_tiny", {"rope_base": 10000}, "freqs_cis .* differs"),
    ("retro_olmo_tiny", {"n_layers_in_coda": 2}, r"missing tensors: .*transformer\.coda\.1\.attn\.Wqkv"),
])
def test_config_contradicting_weights_is_refused(tmp_path, name, edit, message):
    def apply(config):
        for key, value in edit.items():
            config.pop(key) if value is None else config.__setitem__(key, value)

    with pytest.raises(CheckpointError, match=message):
        HookedLoopedTransformer.from_pretrained(edited_copy(tmp_path, name, config=apply))


@pytest.mark.parametrize("name, field, value", [
    ("raven_tiny", "injection_type", "add"),
    ("raven_tiny", "test_time_noise", 0.1),
    ("raven_tiny", "block_class_name", "TransformerPreNormBlock"),
    ("raven_tiny", "norm_class_name", "LayerNorm"),
    ("raven_tiny", "nonlin_name", "GELU"),
    ("raven_tiny", "state_init", "zero"),
    ("raven_tiny", "num_key_value_heads", 2),
    ("raven_tiny", "tie_word_embeddings", False),
    ("retro_llama_tiny", "qk_bias", True),
    ("retro_llama_tiny", "rope_scaling", {"rope_type": "yarn", "factor": 2.0}),
    ("retro_llama_tiny", "rope_theta", None),
])
def test_unsupported_config_values_are_refused_by_name(tmp_path, name, field, value):
    def apply(config):
        config.pop(field) if value is None else config.__setitem__(field, value)

    with pytest.raises(CheckpointError, match=field):
        HookedLoopedTransformer.from_pretrained(edited_copy(tmp_path, name, config=apply))


def test_duplicate_lm_head_is_checked_against_wte(tmp_path):
    (tmp_path / "same").mkdir(), (tmp_path / "other").mkdir()
    same = edited_copy(tmp_path / "same", "raven_tiny", tensors=lambda t: t.update(
        {"lm_head.weight": t["transformer.wte.weight"].clone()}))
    exp = expected("raven_tiny")
    logits = HookedLoopedTransformer.from_pretrained(same)(exp["input_ids"], init_state=exp["init_state"])
    assert_parity(logits, exp["logits"], "logits with a duplicate lm_head")
    other = edited_copy(tmp_path / "other", "raven_tiny", tensors=lambda t: t.update(
        {"lm_head.weight": t["transformer.wte.weight"] + 1.0}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from transformer.wte.weight"):
        HookedLoopedTransformer.from_pretrained(other)


def test_freqs_cis_buffer_is_optional(tmp_path):
    folder = edited_copy(tmp_path, "raven_tiny", tensors=lambda t: t.pop("freqs_cis"))
    exp = expected("raven_tiny")
    logits = HookedLoopedTransformer.from_pretrained(folder)(exp["input_ids"], init_state=exp["init_state"])
    assert_parity(logits, exp["logits"], "logits without freqs_cis")


def test_family_override(tmp_path):
    assert load("raven_tiny", family="huginn").cfg.family == "huginn"
    assert load("retro_olmo_tiny", family="retrofitted").cfg.extra["block_flavour"] == "olmo"
    with pytest.raises(CheckpointError, match="family='huginn'"):
        load("raven_tiny", family="retrofitted")
    with pytest.raises(CheckpointError, match="family='retrofitted'"):
        load("retro_llama_tiny", family="huginn")
    with pytest.raises(CheckpointError, match=r"unknown family 'raven'.*huginn"):
        load("raven_tiny", family="raven")
    other_type = edited_copy(tmp_path, "raven_tiny", config=lambda c: c.__setitem__("model_type", "llama"))
    with pytest.raises(CheckpointError, match="model_type"):
        HookedLoopedTransformer.from_pretrained(other_type, family="huginn")


def test_unknown_loading_option_is_refused():
    with pytest.raises(InputError, match="no loading options"):
        load("raven_tiny", layout="4-2-4")

