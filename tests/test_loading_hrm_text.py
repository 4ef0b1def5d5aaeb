"""HRM-Text family: parity with ``transformers.HrmTextForCausalLM`` (random tiny weights, offline).

The reference's internals are recorded with torch forward hooks: every decoder layer's output and
attention pattern (in execution order), the input and output of every L-stack and H-stack run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import make_model, rel_dev
from safetensors.torch import load_file, save_file

from tl_loop import CheckpointError, HookedLoopedTransformer
from tl_loop.loading.files import read_config

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # relative to the largest magnitude of the reference tensor
VOCAB, PER_STACK = 97, 2


def build_hf(seed: int = 0, **overrides: object) -> transformers.HrmTextForCausalLM:
    """A random tiny HRM-Text with a non-zero ``z_L_init`` (eager attention, eval mode)."""
    kwargs = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": PER_STACK,
              "num_attention_heads": 4, "head_dim": 16, "H_cycles": 2, "L_cycles": 2,
              "max_position_embeddings": 64, "initializer_range": 0.1, "rms_norm_eps": 1e-6,
              "attn_implementation": "eager"}
    kwargs.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.HrmTextForCausalLM(transformers.HrmTextConfig(**kwargs)).eval()
        with torch.no_grad():
            model.model.z_L_init.normal_()
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder


def with_steps(hf_model, h_cycles: int, seed: int = 0):
    """The same weights under another ``H_cycles`` (the weights do not depend on it)."""
    cfg = hf_model.config
    other = build_hf(seed, H_cycles=h_cycles, L_cycles=cfg.L_cycles, tie_word_embeddings=cfg.tie_word_embeddings)
    other.load_state_dict(hf_model.state_dict())
    return other


@torch.no_grad()
def hf_trace(model, tokens: torch.Tensor) -> dict:
    """Logits and internals of one reference forward pass."""
    rec: dict[str, list[torch.Tensor]] = {k: [] for k in ("layer_out", "pattern", "L_in", "L_out", "H_in", "H_out")}
    handles = []
    inner = model.model
    for stack in (inner.H_module, inner.L_module):
        for layer in stack.layers:
            handles.append(layer.register_forward_hook(
                lambda m, args, out: rec["layer_out"].append(out[0] if isinstance(out, tuple) else out)))
            handles.append(layer.self_attn.register_forward_hook(lambda m, args, out: rec["pattern"].append(out[1])))
    for name, stack in (("H", inner.H_module), ("L", inner.L_module)):
        handles.append(stack.register_forward_pre_hook(lambda m, args, key=f"{name}_in": rec[key].append(args[0])))
        handles.append(stack.register_forward_hook(lambda m, args, out, key=f"{name}_out": rec[key].append(out)))
    try:
        rec["logits"] = model(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return rec


def compare_with_trace(ours: HookedLoopedTransformer, ref: dict, tokens: torch.Tensor, n_steps: int) -> dict[str, float]:
    """Max relative deviation per tensor kind between our hooks and the reference trace."""
    cfg = ours.cfg
    L = cfg.inner_cycles
    logits, cache = ours.run_with_cache(
        tokens, n_steps=n_steps,
        names_filter=lambda n: not n.endswith(("hook_q", "hook_k", "hook_v", "hook_scale")))
    n_layers = cfg.effective_depth(n_steps)  # the model is back at its default depth here
    assert len(ref["layer_out"]) == n_layers and f"blocks.{n_layers - 1}.hook_resid_post" in cache
    dev: dict[str, float] = {}

    def note(kind: str, value: float) -> None:
        dev[kind] = max(dev.get(kind, 0.0), value)

    for i in range(n_layers):
        note("layer_out", rel_dev(cache[f"blocks.{i}.hook_resid_post"], ref["layer_out"][i]))
        note("pattern", rel_dev(cache[f"blocks.{i}.attn.hook_pattern"], ref["pattern"][i]))
    for r in range(n_steps):
        for c in range(L):
            note("L_in", rel_dev(cache[f"loops.{r}.inner.{c}.hook_injected"], ref["L_in"][r * L + c]))
            note("L_out", rel_dev(cache[f"loops.{r}.inner.{c}.hook_state_out"], ref["L_out"][r * L + c]))
        note("H_in", rel_dev(cache[f"loops.{r}.hook_injected"], ref["H_in"][r]))
        h_out = f"loops.{r}.hook_state_out" if r < n_steps - 1 else "ln_final.hook_normalized"
        note("H_out", rel_dev(cache[h_out], ref["H_out"][r]))
    note("logits", rel_dev(logits, ref["logits"]))
    note("logits (fused attention)", rel_dev(ours(tokens, n_steps=n_steps), ref["logits"]))
    return dev


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_model():
    return build_hf()


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory) -> Path:
    return save_hf(hf_model, tmp_path_factory.mktemp("hrm"))


@pytest.fixture(scope="module")
def ours(saved) -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained(str(saved))


# ---------------------------------------------------------------- config
def test_config_mapping(ours, saved):
    raw = read_config(saved)
    assert raw["num_hidden_layers"] == PER_STACK * 2 * (2 + 1)  # the inflated cache-slot count
    cfg = ours.cfg
    assert cfg.family == "hrm_text"
    assert (cfg.n_core_layers, cfg.n_inner_layers, cfg.inner_cycles, cfg.n_steps) == (PER_STACK, PER_STACK, 2, 2)
    assert cfg.n_layers == 2 * (2 * PER_STACK + PER_STACK)
    assert cfg.inner_state_init == "learned" and cfg.state_init == "prelude"
    assert not cfg.norm_weights and cfg.norm_between_steps and cfg.inner_norm and cfg.attn_output_gate
    assert cfg.embed_scale == pytest.approx(10.0)  # 1 / initializer_range
    assert cfg.n_key_value_heads == cfg.n_heads == 4 and cfg.d_head == 16
    assert cfg.extra["prefix_lm"] is True
    assert ours.final_norm is None and ours.inner_init is not None


def test_legacy_config_without_layers_per_stack(hf_model, saved, tmp_path, tokens):
    """Older configs carry the real per-stack depth in ``num_hidden_layers``."""
    raw = read_config(saved)
    raw.pop("num_layers_per_stack")
    raw["num_hidden_layers"] = PER_STACK
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    model = HookedLoopedTransformer.from_pretrained(str(tmp_path))
    assert model.cfg.n_core_layers == PER_STACK
    assert rel_dev(model(tokens), hf_trace(hf_model, tokens)["logits"]) <= TOL


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("h_cycles, l_cycles, tie", [(2, 2, False), (2, 2, True), (1, 3, False)])
def test_parity_with_reference(tmp_path, tokens, h_cycles, l_cycles, tie):
    hf = build_hf(seed=h_cycles + 10 * l_cycles + int(tie), H_cycles=h_cycles, L_cycles=l_cycles, tie_word_embeddings=tie)
    folder = save_hf(hf, tmp_path / "ckpt")
    assert ("lm_head.weight" in load_file(str(folder / "model.safetensors"))) == (not tie)
    ours = HookedLoopedTransformer.from_pretrained(str(folder))
    assert (ours.cfg.n_steps, ours.cfg.inner_cycles, ours.cfg.tie_embeddings) == (h_cycles, l_cycles, tie)
    dev = compare_with_trace(ours, hf_trace(hf, tokens), tokens, h_cycles)
    assert set(dev) >= {"layer_out", "pattern", "L_in", "L_out", "H_in", "H_out", "logits"}
    bad = {k: v for k, v in dev.items() if not v <= TOL}
    assert not bad, bad


def test_other_number_of_h_cycles(hf_model, ours, saved, tokens):
    """Our ``n_steps`` plays the reference's ``H_cycles``: parity again at 3 and 1 steps."""
    for h_cycles in (3, 1):
        ref = hf_trace(with_steps(hf_model, h_cycles), tokens)
        dev = compare_with_trace(ours, ref, tokens, h_cycles)
        assert all(v <= TOL for v in dev.values()), (h_cycles, dev)
        assert ours.cfg.n_steps == 2  # per-call steps leave the default alone
        # also as the loaded default
        loaded = HookedLoopedTransformer.from_pretrained(str(saved), n_steps=h_cycles)
        assert rel_dev(loaded(tokens), ref["logits"]) <= TOL
    # more steps change the prediction (the test above is not vacuous)
    assert rel_dev(hf_trace(with_steps(hf_model, 3), tokens)["logits"], hf_trace(hf_model, tokens)["logits"]) > 1e-3


def test_every_stack_run_has_its_own_hooks(ours, tokens):
    cfg, n_steps, L = ours.cfg, 2, 2
    labels = [layer.label for layer in ours.schedule]
    expected_labels = []
    for r in range(n_steps):
        expected_labels += [f"inner.{r}.{c}.{j}" for c in range(L) for j in range(PER_STACK)]
        expected_labels += [f"core.{r}.{j}" for j in range(PER_STACK)]
    assert labels == expected_labels
    names = set(ours.hook_dict)
    for r in range(n_steps):
        for c in range(L):
            assert {f"loops.{r}.inner.{c}.hook_state_in", f"loops.{r}.inner.{c}.hook_injected",
                    f"loops.{r}.inner.{c}.ln_state.hook_normalized", f"loops.{r}.inner.{c}.hook_state_out"} <= names
        assert {f"loops.{r}.hook_state_in", f"loops.{r}.hook_injected", f"loops.{r}.hook_state_out"} <= names
    assert f"loops.{n_steps - 1}.ln_state.hook_normalized" not in names  # ln_final normalises the last step
    assert {f"blocks.{i}.attn.hook_gate" for i in range(cfg.n_layers)} <= names
    # each run records its own activation: the L state differs between cycles, the H state between steps
    _, cache = ours.run_with_cache(tokens)
    outs = [cache[f"loops.{r}.inner.{c}.hook_state_out"] for r in range(n_steps) for c in range(L)]
    outs += [cache[f"loops.{r}.hook_state_out"] for r in range(n_steps)]
    for a in range(len(outs)):
        for b in range(a + 1, len(outs)):
            assert not torch.allclose(outs[a], outs[b], atol=1e-3)
    # the same physical L block runs in both cycles of a step, computing different things
    assert ours.schedule[0].physical == ours.schedule[PER_STACK].physical == "inner.0"


def test_forward_takes_no_token_type_ids(ours, tokens):
    """``prefix_lm`` bidirectional blocks are not supported: only causal use (no token_type_ids)."""
    with pytest.raises(TypeError):
        ours(tokens, token_type_ids=torch.ones_like(tokens))


# ---------------------------------------------------------------- formats and round trips
def test_unfused_module_names_load(hf_model, saved, tmp_path, tokens):
    """A state dict under the module names (``self_attn.q_proj`` ...) loads to the same model."""
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    model = HookedLoopedTransformer.from_pretrained(str(tmp_path))
    assert rel_dev(model(tokens), hf_trace(hf_model, tokens)["logits"]) <= TOL
    # a wrong shape in the unfused layout is reported, not a crash while concatenating
    state["model.L_module.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"k_proj.weight: expected \(64, 64\), found \(64, 32\)"):
        HookedLoopedTransformer.from_pretrained(str(tmp_path))


def test_round_trip(hf_model, ours, saved, tmp_path, tokens):
    folder = ours.save_pretrained(str(tmp_path / "ours"))
    hf_tensors, our_tensors = load_file(str(saved / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert set(our_tensors) == set(hf_tensors)
    for name, tensor in hf_tensors.items():
        assert torch.equal(our_tensors[name], tensor), name
    hf_cfg, our_cfg = read_config(saved), read_config(folder)
    for key in ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_layers_per_stack", "num_attention_heads", "head_dim", "H_cycles", "L_cycles", "L_bp_cycles",
                "embedding_scale", "prefix_lm", "rope_parameters", "tie_word_embeddings", "rms_norm_eps",
                "max_position_embeddings", "attention_bias", "mlp_bias", "hidden_act", "initializer_range"):
        assert our_cfg[key] == hf_cfg[key], key
    # transformers reads what we wrote
    back = transformers.HrmTextForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf_model(tokens).logits, rtol=0, atol=0)
    reloaded = HookedLoopedTransformer.from_pretrained(str(folder))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_round_trip_at_other_steps(hf_model, saved, tmp_path, tokens):
    model = HookedLoopedTransformer.from_pretrained(str(saved), n_steps=3)
    folder = model.save_pretrained(str(tmp_path / "three"))
    written = read_config(folder)
    assert written["H_cycles"] == 3 and written["num_hidden_layers"] == PER_STACK * 3 * 3
    back = transformers.HrmTextForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    assert back.config.H_cycles == 3
    with torch.no_grad():
        ref = back(tokens).logits
    assert rel_dev(model(tokens), ref) <= TOL
    assert rel_dev(ref, hf_trace(with_steps(hf_model, 3), tokens)["logits"]) == 0.0


@pytest.mark.parametrize(
    "variant, overrides, message",
    [("hrm_like", {}, "n_inner_layers: model has 1"),
     ("hrm_like", {"n_inner_layers": 2, "norm_weights": True}, "norm_weights: model has True"),
     ("ouro_like", {}, "no inner")],
)
def test_save_refuses_other_layouts(tmp_path, variant, overrides, message):
    with pytest.raises(CheckpointError, match=message):
        make_model(variant, **overrides).save_pretrained(str(tmp_path / "x"), family="hrm_text")


# ---------------------------------------------------------------- refusals
def _copy(saved: Path, folder: Path, config: dict | None = None, tensors=None) -> Path:
    raw = read_config(saved)
    raw.update(config or {})
    (folder / "config.json").write_text(json.dumps(raw))
    t = load_file(str(saved / "model.safetensors"))
    if tensors is not None:
        tensors(t)
    save_file(t, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "config, message",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"L_cycles": 0}, "L_cycles=0"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters.*yarn"),
        ({"num_layers_per_stack": 3}, r"3 layers per stack.*inflated.*H_module holds layers \[0, 1\]"),
        ({"hidden_act": "mystery"}, "hidden_act"),
    ],
)
def test_refused_configs(saved, tmp_path, config, message):
    with pytest.raises(CheckpointError, match=message):
        HookedLoopedTransformer.from_pretrained(str(_copy(saved, tmp_path, config=config)))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.z_L_init"), r"missing tensors: \['model.z_L_init'\]"),
        (lambda t: t.pop("lm_head.weight"), r"missing tensors: \['lm_head.weight'\]"),
        (lambda t: t.__setitem__("model.L_module.layers.1.attn.gqkv_proj.weight", torch.zeros(192, 64)),
         r"gqkv_proj.weight: expected \(256, 64\), found \(192, 64\)"),
        (lambda t: t.__setitem__("model.H_module.layers.0.attn.q_norm.weight", torch.ones(16)), "unexpected tensors"),
    ],
)
def test_refused_tensors(saved, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        HookedLoopedTransformer.from_pretrained(str(_copy(saved, tmp_path, tensors=edit)))


def test_unknown_config_field_is_logged(saved, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tl_loop"):
        HookedLoopedTransformer.from_pretrained(str(_copy(saved, tmp_path, config={"z_H_init_scale": 2.0})))
    assert "z_H_init_scale" in caplog.text
