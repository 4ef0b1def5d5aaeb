"""Ouro family: parity with the reference fixture (tests/fixtures/ouro_tiny), read-outs, round trips.

The fixture holds tensors recorded from the upstream ``modeling_ouro.py`` (eager attention,
float32) at ``total_ut_steps = 3``. For other step counts the test builds its own reference:
a plain-torch transcription of Ouro's forward (``reference_ouro``), first checked against the
fixture at 3 steps.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model, rel_dev
from safetensors.torch import load_file, save_file

from tl_loop import CheckpointError, HookedLoopedTransformer
from tl_loop.loading import detect_family
from tl_loop.loading.files import read_config

FIXTURE = Path(__file__).parent / "fixtures" / "ouro_tiny"
TOL = 1e-4  # relative to the largest magnitude of the expected tensor
N_STEPS, N_LAYERS = 3, 2


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def hf_weights() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "model.safetensors"))


@pytest.fixture(scope="module")
def model() -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained(str(FIXTURE))


@pytest.fixture
def tokens(expected) -> torch.Tensor:
    return expected["input_ids"]


# ---------------------------------------------------------------- hand-written reference
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, theta: float, factor: float = 1.0) -> torch.Tensor:
    """Rotate-half RoPE on ``[batch, head, pos, d]`` (``factor``: linear scaling)."""
    d, n = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d) / factor
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def reference_ouro(w: dict[str, torch.Tensor], ids: torch.Tensor, n_steps: int, config: dict) -> dict:
    """Ouro's forward (NOTES 2.5) written out from the HF tensors: every intermediate we compare."""
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    d_head = config["hidden_size"] // n_heads
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    factor = (config.get("rope_scaling") or {}).get("factor", 1.0)  # linear scaling only
    head = w["model.embed_tokens.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    b, s = ids.shape
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    h = w["model.embed_tokens.weight"][ids]
    out: dict[str, list[torch.Tensor]] = {"block_out": [], "pattern": [], "step_normed": [], "gate": [], "step_logits": []}
    for _ in range(n_steps):
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            n = _rms(h, w[p + "input_layernorm.weight"], eps)
            q = (n @ w[p + "self_attn.q_proj.weight"].T).view(b, s, n_heads, d_head).transpose(1, 2)
            k = (n @ w[p + "self_attn.k_proj.weight"].T).view(b, s, n_kv, d_head).transpose(1, 2)
            v = (n @ w[p + "self_attn.v_proj.weight"].T).view(b, s, n_kv, d_head).transpose(1, 2)
            q, k = _rope(q, theta, factor), _rope(k, theta, factor)
            k, v = k.repeat_interleave(n_heads // n_kv, 1), v.repeat_interleave(n_heads // n_kv, 1)
            scores = (q @ k.transpose(-1, -2)) * d_head**-0.5
            pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            a = (pattern @ v).transpose(1, 2).reshape(b, s, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = h + _rms(a, w[p + "input_layernorm_2.weight"], eps)
            n2 = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
            m = torch.nn.functional.silu(n2 @ w[p + "mlp.gate_proj.weight"].T) * (n2 @ w[p + "mlp.up_proj.weight"].T)
            h = h + _rms(m @ w[p + "mlp.down_proj.weight"].T, w[p + "post_attention_layernorm_2.weight"], eps)
            out["block_out"].append(h)
            out["pattern"].append(pattern)
        h = _rms(h, w["model.norm.weight"], eps)
        out["step_normed"].append(h)
        out["gate"].append(h @ w["model.early_exit_gate.weight"].T + w["model.early_exit_gate.bias"])
        out["step_logits"].append(h @ head.T)
    return out


def _hand_exit_pdf(gate_logits: list[torch.Tensor]) -> torch.Tensor:
    """p_t = lambda_t * prod_{s<t} (1 - lambda_s); the last step takes the remaining mass."""
    lam = [torch.sigmoid(g) for g in gate_logits]
    pdf, remaining = [], torch.ones_like(lam[0])
    for t in range(len(lam) - 1):
        pdf.append(lam[t] * remaining)
        remaining = remaining * (1 - lam[t])
    return torch.stack(pdf + [remaining])


def _copy_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ouro"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURE / name, folder / name)
    return folder


def _edit(folder: Path, config: dict | None = None, tensors=None) -> None:
    if config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config)
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(str(folder / "model.safetensors"))
        tensors(t)
        save_file(t, str(folder / "model.safetensors"))


# ---------------------------------------------------------------- config
def test_config_mapping(model):
    cfg = model.cfg
    assert detect_family(read_config(FIXTURE), set()).name == "ouro"
    assert cfg.family == "ouro"
    assert (cfg.n_core_layers, cfg.n_steps, cfg.n_layers) == (N_LAYERS, N_STEPS, N_LAYERS * N_STEPS)
    assert (cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (64, 4, 2, 16, 128, 128)
    assert cfg.output_norm and cfg.pre_norm and cfg.norm_between_steps and cfg.exit_gate
    assert cfg.loop_norm_weights == "ln_final" and cfg.n_prelude_layers == cfg.n_coda_layers == 0
    assert cfg.extra["early_exit_threshold"] == 1.0
    assert cfg.rotary_base == 10000.0 and cfg.rope_scaling is None and cfg.eps == 1e-6
    assert not cfg.tie_embeddings and cfg.n_ctx == 64
    assert [layer.label for layer in model.schedule] == json.loads((FIXTURE / "meta.json").read_text())["effective_layers"]


# ---------------------------------------------------------------- parity with the fixture
def test_parity_every_hook(model, expected, tokens):
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    names += [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    names += [f"loops.{r}.ln_state.hook_normalized" for r in range(N_STEPS - 1)] + ["ln_final.hook_normalized"]
    names += [f"loops.{r}.hook_exit_gate" for r in range(N_STEPS)]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    dev = {}
    for i in range(model.cfg.n_layers):
        dev[f"block_out.{i}"] = rel_dev(cache[f"blocks.{i}.hook_resid_post"], expected[f"block_out.{i}"])
        dev[f"pattern.{i}"] = rel_dev(cache[f"blocks.{i}.attn.hook_pattern"], expected[f"pattern.{i}"])
    for r in range(N_STEPS):
        normed = f"loops.{r}.ln_state.hook_normalized" if r < N_STEPS - 1 else "ln_final.hook_normalized"
        dev[f"step_normed.{r}"] = rel_dev(cache[normed], expected[f"step_normed.{r}"])
        dev[f"exit_gate_logit.{r}"] = rel_dev(cache[f"loops.{r}.hook_exit_gate"], expected[f"exit_gate_logit.{r}"])
    dev["logits (with pattern hooks)"] = rel_dev(logits, expected["logits"])
    dev["logits (fused attention)"] = rel_dev(model(tokens), expected["logits"])
    bad = {k: v for k, v in dev.items() if not v <= TOL}
    assert not bad, bad


def test_step_logits_match_exit_at_step(model, expected, tokens):
    step_logits = model.step_logits(tokens)
    assert step_logits.shape == (N_STEPS, *tokens.shape, model.cfg.d_vocab)
    for r in range(N_STEPS):
        assert rel_dev(step_logits[r], expected[f"step_logits.{r}"]) <= TOL
    # the default read-out is the last step
    assert rel_dev(model(tokens), expected[f"step_logits.{N_STEPS - 1}"]) <= TOL


def test_exit_probabilities_follow_ouro_formula(model, expected, tokens):
    probs = model.exit_probabilities(tokens)
    gates = [expected[f"exit_gate_logit.{r}"][..., 0] for r in range(N_STEPS)]
    hand = _hand_exit_pdf(gates)
    assert probs.shape == (N_STEPS, *tokens.shape)
    assert rel_dev(probs, hand) <= TOL
    torch.testing.assert_close(probs.sum(0), torch.ones(tokens.shape), atol=1e-6, rtol=0)
    assert bool((probs > 0).all())


def test_reference_transcription_matches_fixture(hf_weights, expected, tokens):
    """The plain-torch reference used for other step counts reproduces the fixture."""
    config = read_config(FIXTURE)
    ref = reference_ouro(hf_weights, tokens, N_STEPS, config)
    for i in range(N_STEPS * N_LAYERS):
        assert rel_dev(ref["block_out"][i], expected[f"block_out.{i}"]) <= TOL
        assert rel_dev(ref["pattern"][i], expected[f"pattern.{i}"]) <= TOL
    for r in range(N_STEPS):
        assert rel_dev(ref["step_normed"][r], expected[f"step_normed.{r}"]) <= TOL
        assert rel_dev(ref["gate"][r], expected[f"exit_gate_logit.{r}"]) <= TOL
        assert rel_dev(ref["step_logits"][r], expected[f"step_logits.{r}"]) <= TOL


def test_five_steps_match_hand_unrolled_reference(model, hf_weights, expected, tokens):
    n = 5
    ref = reference_ouro(hf_weights, tokens, n, read_config(FIXTURE))
    names = [f"blocks.{i}.hook_resid_post" for i in range(n * N_LAYERS)]
    names += [f"loops.{r}.hook_exit_gate" for r in range(n)] + ["ln_final.hook_normalized"]
    names += [f"loops.{r}.ln_state.hook_normalized" for r in range(n - 1)]
    logits, cache = model.run_with_cache(tokens, n_steps=n, names_filter=names)
    assert model.cfg.n_steps == N_STEPS  # the default is untouched
    for i in range(n * N_LAYERS):
        assert rel_dev(cache[f"blocks.{i}.hook_resid_post"], ref["block_out"][i]) <= TOL
    for r in range(n):
        normed = f"loops.{r}.ln_state.hook_normalized" if r < n - 1 else "ln_final.hook_normalized"
        assert rel_dev(cache[normed], ref["step_normed"][r]) <= TOL
        assert rel_dev(cache[f"loops.{r}.hook_exit_gate"], ref["gate"][r]) <= TOL
    assert rel_dev(logits, ref["step_logits"][-1]) <= TOL
    step_logits = model.step_logits(tokens, n_steps=n)
    for r in range(n):
        assert rel_dev(step_logits[r], ref["step_logits"][r]) <= TOL
    # the first three steps are the fixture's steps; later ones move on
    for i in range(N_STEPS * N_LAYERS):
        assert rel_dev(cache[f"blocks.{i}.hook_resid_post"], expected[f"block_out.{i}"]) <= TOL
    assert rel_dev(logits, expected["logits"]) > 1e-2
    assert rel_dev(model(tokens, n_steps=n), ref["step_logits"][-1]) <= TOL


# ---------------------------------------------------------------- threshold exit
@pytest.mark.parametrize(
    "bias, zero_weight, exit_step",
    [(30.0, False, 0),  # sigmoid rounds to exactly 1.0: every token leaves after step 0
     (9.21, True, 1)],  # lambda = 0.9999 < 1, but p0 + p1 rounds to 1.0 in float32: exit after step 1
)
def test_threshold_exit_rounding_gotcha(tokens, bias, zero_weight, exit_step):
    model = HookedLoopedTransformer.from_pretrained(str(FIXTURE))
    with torch.no_grad():
        model.exit_gate.bias.fill_(bias)
        if zero_weight:
            model.exit_gate.weight.zero_()
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_exit_gate"))
    gates = [cache[f"loops.{r}.hook_exit_gate"][..., 0] for r in range(N_STEPS)]
    cum32 = _hand_exit_pdf(gates).cumsum(0)
    cum64 = _hand_exit_pdf([g.double() for g in gates]).cumsum(0)
    # by hand: in float32 the cumulative probability reaches 1.0 at `exit_step`, in exact
    # arithmetic it does not -- rounding alone makes the tokens exit before the last step
    assert bool((cum32[exit_step] >= 1.0).all()) and bool((cum64[exit_step] < 1.0).all())
    assert exit_step == 0 or not bool((cum32[exit_step - 1] >= 1.0).any())

    logits, steps = model.threshold_exit_logits(tokens)  # threshold from config: 1.0
    assert model.cfg.extra["early_exit_threshold"] == 1.0
    assert steps.shape == tokens.shape and bool((steps == exit_step).all())
    step_logits = model.step_logits(tokens)
    torch.testing.assert_close(logits, step_logits[exit_step], rtol=0, atol=0)
    # the default forward ignores the gate: all steps run, the last one is read out
    default = model(tokens)
    assert rel_dev(default, step_logits[-1]) <= TOL
    assert rel_dev(default, logits) > 1e-2
    # a threshold above 1 is never reached: the last step
    _, steps_never = model.threshold_exit_logits(tokens, threshold=1.5)
    assert bool((steps_never == N_STEPS - 1).all())


def test_threshold_exit_on_fixture_uses_last_step(model, expected, tokens):
    """Without saturated gates, threshold 1.0 reads out the last step, as the reference did."""
    logits, steps = model.threshold_exit_logits(tokens)
    assert bool((steps == N_STEPS - 1).all())
    assert rel_dev(logits, expected["logits"]) <= TOL


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(model, hf_weights, expected, tokens, tmp_path):
    folder = model.save_pretrained(str(tmp_path / "saved"))
    saved = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(hf_weights)
    for name, tensor in hf_weights.items():
        assert torch.equal(saved[name], tensor), name
    original, written = read_config(FIXTURE), read_config(folder)
    for key in ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling",
                "tie_word_embeddings", "total_ut_steps", "early_exit_threshold", "vocab_size",
                "max_position_embeddings", "use_sliding_window", "layer_types"):
        assert written[key] == original[key], key
    reloaded = HookedLoopedTransformer.from_pretrained(str(folder))
    assert reloaded.cfg.extra["early_exit_threshold"] == 1.0
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    torch.testing.assert_close(reloaded(tokens), model(tokens), rtol=0, atol=0)
    assert rel_dev(reloaded(tokens), expected["logits"]) <= TOL


def test_save_writes_current_step_count(tmp_path, tokens):
    model = HookedLoopedTransformer.from_pretrained(str(FIXTURE), n_steps=5)
    assert model.cfg.n_steps == 5 and model.cfg.n_layers == 10
    folder = model.save_pretrained(str(tmp_path / "five"))
    assert read_config(folder)["total_ut_steps"] == 5
    reloaded = HookedLoopedTransformer.from_pretrained(str(folder))
    assert reloaded.cfg.n_steps == 5
    torch.testing.assert_close(reloaded(tokens), model(tokens), rtol=0, atol=0)


def test_save_refuses_other_layouts(tmp_path):
    with pytest.raises(CheckpointError, match="output_norm"):
        make_model("plain").save_pretrained(str(tmp_path / "x"), family="ouro")


def test_tied_embeddings(tmp_path, hf_weights, tokens):
    folder = _copy_checkpoint(tmp_path)
    _edit(folder, config={"tie_word_embeddings": True}, tensors=lambda t: t.pop("lm_head.weight"))
    model = HookedLoopedTransformer.from_pretrained(str(folder))
    assert model.cfg.tie_embeddings and not list(model.unembed.parameters())
    ref = reference_ouro(hf_weights, tokens, N_STEPS, {**read_config(FIXTURE), "tie_word_embeddings": True})
    assert rel_dev(model(tokens), ref["step_logits"][-1]) <= TOL
    resaved = load_file(str(model.save_pretrained(str(tmp_path / "tied_out")) / "model.safetensors"))
    assert "lm_head.weight" not in resaved


# ---------------------------------------------------------------- refusals
def _drop(name):
    return lambda t: t.pop(name)


def _add(name, tensor):
    return lambda t: t.__setitem__(name, tensor)


def _reshape(name, shape):
    return lambda t: t.__setitem__(name, torch.zeros(shape))


@pytest.mark.parametrize(
    "edit_tensors, message",
    [
        (_drop("model.layers.1.input_layernorm_2.weight"), r"missing tensors: \['model.layers.1.input_layernorm_2.weight'\]"),
        (_drop("lm_head.weight"), r"missing tensors: \['lm_head.weight'\]"),
        (_drop("model.early_exit_gate.bias"), r"missing tensors: \['model.early_exit_gate.bias'\]"),
        (_add("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)), r"unexpected tensors: \['model.layers.0.self_attn.q_proj.bias'\]"),
        (_add("model.extra_head.weight", torch.zeros(3, 64)), "unexpected tensors"),
        (_reshape("model.norm.weight", (63,)), r"model.norm.weight: expected \(64,\), found \(63,\)"),
        (_reshape("model.layers.0.self_attn.k_proj.weight", (64, 64)), r"k_proj.weight: expected \(32, 64\), found \(64, 64\)"),
        (_add("model.layers.2.input_layernorm.weight", torch.ones(64)), r"num_hidden_layers=2.*layers \[0, 1, 2\]"),
    ],
)
def test_checkpoint_errors_for_tensors(tmp_path, edit_tensors, message):
    folder = _copy_checkpoint(tmp_path)
    _edit(folder, tensors=edit_tensors)
    with pytest.raises(CheckpointError, match=message):
        HookedLoopedTransformer.from_pretrained(str(folder))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types.*sliding"),
        ({"layer_types": None, "use_sliding_window": True, "sliding_window": 4}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.*yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "rope_scaling.*lacks"),
        ({"hidden_act": "swish_mystery"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_checkpoint_errors_for_config(tmp_path, config, message):
    folder = _copy_checkpoint(tmp_path)
    _edit(folder, config=config)
    with pytest.raises(CheckpointError, match=message):
        HookedLoopedTransformer.from_pretrained(str(folder))


def test_sliding_window_field_unused_is_accepted(tmp_path, expected, tokens):
    """``sliding_window`` set but switched off (``use_sliding_window: false``) changes nothing."""
    folder = _copy_checkpoint(tmp_path)
    _edit(folder, config={"sliding_window": 4, "layer_types": None})
    model = HookedLoopedTransformer.from_pretrained(str(folder))
    assert rel_dev(model(tokens), expected["logits"]) <= TOL


def test_supported_rope_scaling_is_applied(tmp_path, hf_weights, tokens):
    folder = _copy_checkpoint(tmp_path)
    _edit(folder, config={"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    model = HookedLoopedTransformer.from_pretrained(str(folder))
    assert model.cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    ref = reference_ouro(hf_weights, tokens, N_STEPS, read_config(folder))
    assert rel_dev(model(tokens), ref["step_logits"][-1]) <= TOL
    base = reference_ouro(hf_weights, tokens, N_STEPS, read_config(FIXTURE))
    assert rel_dev(model(tokens), base["step_logits"][-1]) > 1e-3  # the scaling matters
    saved = model.save_pretrained(str(tmp_path / "linear"))
    assert read_config(saved)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_unknown_config_field_is_logged(tmp_path, caplog):
    folder = _copy_checkpoint(tmp_path)
    _edit(folder, config={"brand_new_upstream_knob": 3})
    with caplog.at_level(logging.WARNING, logger="tl_loop"):
        HookedLoopedTransformer.from_pretrained(str(folder))
    assert "brand_new_upstream_knob" in caplog.text


def test_loading_options_are_refused():
    with pytest.raises(CheckpointError, match="no loading options"):
        HookedLoopedTransformer.from_pretrained(str(FIXTURE), layout="whatever")
