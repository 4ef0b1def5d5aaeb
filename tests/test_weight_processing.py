"""Stacked TransformerLens weight views and weight processing (tl_loop.weight_processing).

Every processing op either leaves the model's predictions unchanged at every depth (float64,
relative 1e-5) or raises UnsupportedError and changes nothing. Which layouts are supported is
written out per layout below, so a test cannot pass by refusing everywhere.
"""

from __future__ import annotations

import einops
import pytest
import torch
from transformer_lens import FactoredMatrix

from tl_loop import HookedLoopedTransformer, LoopedConfig
from tl_loop.errors import UnsupportedError
from tl_loop.weight_processing import WeightProcessingMixin

OPS = ("fold_ln", "center_writing", "center_unembed", "fold_value_biases", "process")
ALL = frozenset(OPS)
TOKENS = torch.tensor([[1, 5, 7, 3, 9, 2, 11], [4, 4, 8, 0, 13, 21, 6]])
STEPS = (0, 1, 3, 5)

BASE = dict(
    d_model=32, d_head=8, n_heads=4, d_mlp=48, d_vocab=50, n_ctx=16, n_prelude_layers=1, n_core_layers=2,
    n_coda_layers=1, n_steps=3, injection="add", norm_type="LN", gated_mlp=False, act_fn="gelu",
    v_bias=True, o_bias=True, mlp_bias=True, dtype=torch.float64,
)
RMS = dict(norm_type="RMS", gated_mlp=True, act_fn="silu", mlp_bias=False)

#: name -> (config overrides, the ops expected to be supported).
LAYOUTS: dict[str, tuple[dict, frozenset]] = {
    "ln_add": ({}, ALL),
    "ln_none_no_coda": (dict(injection="none", n_coda_layers=0), ALL),
    "ln_zeros_init_no_prelude": (dict(n_prelude_layers=0, state_init="zeros"), ALL),
    "ln_random_init": (dict(state_init="random", state_init_scale=4.0), ALL),
    "ln_linear": (dict(injection="linear", adapter_bias=True), ALL - {"center_writing", "process"}),
    "ln_tied": (dict(tie_embeddings=True), ALL),
    "ln_gqa_split_learned_pos": (
        dict(n_key_value_heads=2, qkv_layout="split", positional_embedding_type="standard", qk_bias=True,
             unembed_bias=True, use_attn_result=True), ALL),
    "ln_no_biases": (dict(v_bias=False, o_bias=False, mlp_bias=False), ALL),
    "ln_gated": (dict(gated_mlp=True, mlp_bias=False), ALL - {"fold_ln", "process"}),
    "ln_output_norm": (dict(output_norm=True), ALL - {"center_writing", "process"}),
    "ln_sandwich": (dict(resid_norm=True), ALL - {"center_writing", "process"}),
    "ln_post_norm": (dict(pre_norm=False, resid_norm=True), ALL - {"center_writing", "process"}),
    "ln_loop_norm_own": (dict(norm_between_steps=True, loop_norm_weights="own"), ALL - {"center_writing", "process"}),
    "ln_loop_norm_shared": (
        dict(norm_between_steps=True, loop_norm_weights="ln_final"), ALL - {"fold_ln", "center_writing", "process"}),
    "ln_after_loop_own": (dict(norm_after_loop=True, loop_norm_weights="own"), ALL - {"center_writing", "process"}),
    "ln_after_loop_shared": (
        dict(norm_after_loop=True, loop_norm_weights="ln_final"), ALL - {"fold_ln", "center_writing", "process"}),
    "ln_loop_norms_free": (dict(norm_between_steps=True, norm_after_loop=True, loop_norm_weights="none"), ALL),
    "ln_parameter_free": (dict(norm_weights=False, resid_norm=True, output_norm=True, tie_embeddings=True), ALL),
    "ln_exit_gate": (
        dict(exit_gate=True, n_coda_layers=0, norm_between_steps=True, loop_norm_weights="none"),
        ALL - {"fold_ln", "process"}),
    "ln_exit_gate_raw_state": (
        dict(exit_gate=True, norm_after_loop=True, loop_norm_weights="none"), ALL - {"center_writing", "process"}),
    "ln_gate_weighted": (dict(attn_output_gate=True, v_bias=False), ALL - {"fold_ln", "process"}),
    "ln_hrm_free": (
        dict(n_inner_layers=1, inner_cycles=2, n_prelude_layers=0, inner_state_init="learned", norm_weights=False,
             norm_between_steps=True, inner_norm=True, attn_output_gate=True, v_bias=False), ALL),
    "rms_add": (RMS, ALL - {"center_writing"}),
    "rms_tied_gqa_no_coda": (dict(RMS, tie_embeddings=True, n_key_value_heads=1, n_coda_layers=0), ALL - {"center_writing"}),
    "rms_gate_weighted": (dict(RMS, attn_output_gate=True), ALL - {"center_writing", "fold_value_biases", "process"}),
    "rms_ouro_like": (
        dict(RMS, n_prelude_layers=0, n_coda_layers=0, injection="none", output_norm=True, norm_between_steps=True,
             loop_norm_weights="ln_final", exit_gate=True, n_key_value_heads=2),
        ALL - {"fold_ln", "center_writing", "process"}),
    "rms_huginn_like": (
        dict(RMS, injection="linear", state_init="random", resid_norm=True, norm_after_loop=True,
             loop_norm_weights="ln_final", qk_bias=True, tie_embeddings=True, embed_scale=5.0,
             rotary_layout="interleaved"),
        ALL - {"fold_ln", "center_writing", "process"}),
    "rms_olmo_like": (
        dict(RMS, pre_norm=False, output_norm=True, qk_norm=True, n_key_value_heads=2, injection="linear",
             state_init="random"),
        ALL - {"center_writing"}),
    "rms_hrm_like": (
        dict(RMS, n_inner_layers=1, inner_cycles=2, n_prelude_layers=0, inner_state_init="learned",
             norm_weights=False, norm_between_steps=True, inner_norm=True, attn_output_gate=True, embed_scale=3.0),
        ALL - {"center_writing", "fold_value_biases", "process"}),
}


def build(layout: str, seed: int = 0) -> HookedLoopedTransformer:
    """A float64 model with non-trivial norm weights, norm biases and biases."""
    overrides = LAYOUTS[layout][0]
    model = HookedLoopedTransformer(LoopedConfig(**{**BASE, **overrides}), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1 or p.shape[0] == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.mul_(5.0)
    return model


@torch.no_grad()
def outputs(model: HookedLoopedTransformer) -> dict[int, torch.Tensor]:
    return {n: model(TOKENS, n_steps=n) for n in STEPS}


def apply(model: HookedLoopedTransformer, op: str) -> None:
    {
        "fold_ln": model.fold_layer_norm,
        "center_writing": model.center_writing_weights,
        "center_unembed": model.center_unembed,
        "fold_value_biases": model.fold_value_biases,
        "process": model.process_weights,
    }[op]()


def assert_same_predictions(before: dict, after: dict, up_to_shift: bool) -> None:
    for n in before:
        a, b = after[n], before[n]
        if up_to_shift:  # center_unembed moves every logit at a position by the same amount
            a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"n_steps={n}: {m}")


def snapshot(model: HookedLoopedTransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_layout_table_is_not_trivial():
    for op in OPS:
        supported = [name for name, (_, ops) in LAYOUTS.items() if op in ops]
        assert len(supported) >= 8, op
        if op != "center_unembed":
            assert len(supported) < len(LAYOUTS), f"{op} is expected to be refused somewhere"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_processing_is_exact_or_refused(layout, op):
    model = build(layout)
    before = outputs(model)
    supported = op in LAYOUTS[layout][1]
    if not supported:
        state, cfg = snapshot(model), model.cfg.to_dict()
        with pytest.raises(UnsupportedError, match="unsupported for this layout"):
            apply(model, op)
        after = snapshot(model)  # refused: nothing changed
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
        assert model.cfg.to_dict() == cfg
        return
    apply(model, op)
    assert_same_predictions(before, outputs(model), up_to_shift=op in ("center_unembed", "process"))
    check_effect(model, op)


def check_effect(model: HookedLoopedTransformer, op: str) -> None:
    """What the op promises beyond unchanged predictions (so a no-op cannot pass)."""
    cfg = model.cfg
    zero = dict(atol=1e-12, rtol=0)
    if op in ("fold_ln", "process"):
        assert model.final_norm is None and model.ln_final.w is None
        for i, block in enumerate(model.blocks):
            for slot in ("ln1", "ln2"):
                if slot in block._modules:
                    assert block._modules[slot].w is None, (i, slot)  # the views follow
        assert cfg.normalization_type == cfg.norm_type + "Pre"
        if cfg.norm_type == "LN":  # readers of LNPre output are centred over d_model
            if cfg.pre_norm:
                torch.testing.assert_close(model.W_Q.mean(-2), torch.zeros_like(model.W_Q.mean(-2)), **zero)
            torch.testing.assert_close(model.W_U.mean(0), torch.zeros_like(model.W_U.mean(0)), **zero)
    if op == "center_writing" or (op == "process" and cfg.norm_type == "LN"):
        for w in (model.W_E, model.W_O, model.W_out, model.b_out, model.b_O):
            torch.testing.assert_close(w.mean(-1), torch.zeros_like(w.mean(-1)), **zero)
    if op in ("center_unembed", "process"):
        torch.testing.assert_close(model.W_U.mean(-1), torch.zeros_like(model.W_U.mean(-1)), **zero)
    if op in ("fold_value_biases", "process"):
        assert torch.count_nonzero(model.b_V) == 0
        if cfg.v_bias:
            assert cfg.o_bias and torch.count_nonzero(model.b_O) > 0


# ---------------------------------------------------------------- stacked weights
@pytest.mark.parametrize("layout", ["ln_gqa_split_learned_pos", "rms_tied_gqa_no_coda", "rms_hrm_like", "ln_add"])
def test_stacked_weights_are_the_views(layout):
    model = build(layout)
    cfg = model.cfg
    L, H, D, d, M = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    shapes = dict(W_Q=(L, H, D, d), W_K=(L, H, D, d), W_V=(L, H, D, d), W_O=(L, H, d, D), b_Q=(L, H, d),
                  b_K=(L, H, d), b_V=(L, H, d), b_O=(L, D), W_in=(L, D, M), W_out=(L, M, D), b_in=(L, M),
                  b_out=(L, D))
    for name, shape in shapes.items():
        stacked = getattr(model, name)
        assert stacked.shape == shape, name
        part = "attn" if name[-1] in "QKVO" else "mlp"
        for i, block in enumerate(model.blocks):
            assert torch.equal(stacked[i], getattr(getattr(block, part), name)), (name, i)
    if cfg.gated_mlp:
        assert model.W_gate.shape == (L, D, M)
        assert all(torch.equal(model.W_gate[i], b.mlp.W_gate) for i, b in enumerate(model.blocks))
    else:
        assert model.W_gate is None
    # each row is its physical block's weights: equal wherever the schedule runs the same block
    for layer in model.schedule:
        first = next(x.index for x in model.schedule if x.physical == layer.physical)
        assert torch.equal(model.W_Q[layer.index], model.W_Q[first])
    assert model.all_head_labels[:2] == ["L0H0", "L0H1"] and len(model.all_head_labels()) == L * H


def test_gqa_key_value_heads_are_repeated_as_transformer_lens():
    model = build("ln_gqa_split_learned_pos")
    cfg = model.cfg
    groups = cfg.n_heads // cfg.n_key_value_heads
    for i, layer in enumerate(model.schedule):
        attn = getattr(model, layer.stage)[layer.layer_in_stack].attn
        raw_k = einops.rearrange(attn.w_k, "(h e) m -> h m e", e=cfg.d_head)  # [kv_head, d_model, d_head]
        for h in range(cfg.n_heads):
            assert torch.equal(model.W_K[i, h], raw_k[h // groups])
            assert torch.equal(model.b_V[i, h], attn.b_v.view(-1, cfg.d_head)[h // groups])


def test_stacks_follow_the_depth():
    model = build("ln_add")
    model.set_n_steps(5)
    assert model.W_Q.shape[0] == model.cfg.n_layers == 1 + 5 * 2 + 1
    model = HookedLoopedTransformer(LoopedConfig(**{**BASE, "n_prelude_layers": 0, "n_coda_layers": 0, "n_steps": 0}))
    assert model.W_Q.shape == (0, 4, 32, 8) and model.OV.shape == (0, 4, 32, 32)


def test_qk_and_ov_circuits_are_the_products_and_what_the_model_runs():
    model = build("ln_gqa_split_learned_pos")
    model.cfg.use_attn_result = False
    assert isinstance(model.QK, FactoredMatrix) and isinstance(model.OV, FactoredMatrix)
    assert model.QK.shape == model.OV.shape == (model.cfg.n_layers, 4, 32, 32)
    torch.testing.assert_close(model.QK.AB, model.W_Q @ model.W_K.transpose(-1, -2))
    torch.testing.assert_close(model.OV.AB, model.W_V @ model.W_O)
    # learned positions: the attention score is the bilinear form of the ln1 output (+ biases)
    _, cache = model.run_with_cache(TOKENS)
    scale = model.cfg.d_head**-0.5
    for i in (0, 2, 7):
        x = cache[f"blocks.{i}.ln1.hook_normalized"]  # [batch, pos, d_model]
        q = torch.einsum("bpm,hmd->bphd", x, model.W_Q[i]) + model.b_Q[i]
        k = torch.einsum("bpm,hmd->bphd", x, model.W_K[i]) + model.b_K[i]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        bilinear = torch.einsum("bqm,hmn,bkn->bhqk", x, model.QK.AB[i], x) * scale
        mask = torch.ones(TOKENS.shape[1], TOKENS.shape[1], dtype=torch.bool).tril()
        got = cache[f"blocks.{i}.attn.hook_attn_scores"]
        torch.testing.assert_close(got[..., mask], scores[..., mask])
        # without the query / key biases the scores are exactly x QK x^T
        b_q, b_k = model.b_Q[i], model.b_K[i]
        extra = (torch.einsum("bqhd,hd->bhq", q - b_q, b_k)[..., None] + torch.einsum("hd,bkhd->bhk", b_q, k)[:, :, None])
        torch.testing.assert_close((scores - extra * scale)[..., mask], bilinear[..., mask])
        # OV: the attention output is pattern-weighted x OV (+ b_V W_O + b_O)
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        ov_out = torch.einsum("bhqk,bkm,hmn->bqn", pattern, x, model.OV.AB[i])
        bias = torch.einsum("hd,hdm->m", model.b_V[i], model.W_O[i]) + model.b_O[i]
        torch.testing.assert_close(cache[f"blocks.{i}.hook_attn_out"], ov_out + bias)


def test_circuits_refuse_non_bilinear_attention():
    qk_norm = build("rms_olmo_like")
    with pytest.raises(UnsupportedError, match="qk_norm"):
        qk_norm.QK
    assert qk_norm.OV.shape[0] == qk_norm.cfg.n_layers  # values are not normed
    gated = build("rms_hrm_like")
    with pytest.raises(UnsupportedError, match="attn_output_gate"):
        gated.OV
    assert gated.QK.shape[0] == gated.cfg.n_layers


# ---------------------------------------------------------------- processing details
@pytest.mark.parametrize("layout", ["ln_add", "ln_tied", "rms_add", "ln_gqa_split_learned_pos"])
def test_processing_twice_changes_nothing_more(layout):
    model = build(layout)
    model.process_weights()
    state = snapshot(model)
    model.process_weights()
    after = snapshot(model)
    assert after.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(after[k], state[k], atol=1e-12, rtol=0)


def test_tied_embeddings_are_untied_and_W_E_is_kept_by_the_fold():
    model = build("ln_tied")
    W_E = model.W_E.clone()
    model.fold_layer_norm()
    assert not model.cfg.tie_embeddings and "unembed.weight" in model.state_dict()
    assert torch.equal(model.W_E, W_E) and not torch.allclose(model.W_U, W_E.T)


def test_created_biases_are_trainable_parameters_and_flags_follow():
    model = build("ln_no_biases")
    model.process_weights()
    names = dict(model.named_parameters())
    assert {"core.0.attn.b_q", "core.0.attn.b_k", "core.0.attn.b_v", "core.0.attn.b_o", "core.0.mlp.b_in",
            "core.0.mlp.b_out", "unembed.b_U"} <= names.keys()
    assert all(p.requires_grad for p in names.values())
    cfg = model.cfg
    assert cfg.qk_bias and cfg.v_bias and cfg.o_bias and cfg.mlp_bias and cfg.unembed_bias
    assert cfg.normalization_type == "LNPre" and not cfg.norm_weights
    assert not any(k.endswith((".ln1.w", ".ln2.w")) or k.startswith("final_norm") for k in model.state_dict())
    rebuilt = HookedLoopedTransformer(LoopedConfig.from_dict(cfg.to_dict()), init_weights=False)
    rebuilt.load_state_dict(model.state_dict())  # the config describes the processed model
    torch.testing.assert_close(rebuilt(TOKENS), model(TOKENS))


def test_weighted_norms_that_cannot_fold_keep_their_weights():
    model = build("ln_loop_norm_own")
    model.set_n_steps(4)
    model.fold_layer_norm()
    assert model.loop_norm is not None and model.cfg.norm_weights  # the loop norm keeps its weights
    assert model.loops[0].ln_state.w is model.loop_norm.w
    assert model.cfg.normalization_type == "LNPre"


def test_centred_writing_weights_give_a_mean_zero_stream():
    model = build("ln_loop_norms_free")
    model.process_weights()
    _, cache = model.run_with_cache(TOKENS)
    names = [n for n in cache if n.endswith(("hook_resid_post", "hook_resid_mid", "hook_state_out", "hook_injected"))]
    assert len(names) > 10
    for n in names:
        torch.testing.assert_close(cache[n].mean(-1), torch.zeros_like(cache[n].mean(-1)), atol=1e-10, rtol=0)


def test_readouts_and_other_depths_use_the_processed_weights():
    model = build("ln_add")
    steps_before = model.step_logits(TOKENS)
    model.set_n_steps(6)
    model.set_n_steps(3)  # pooled views of a deeper depth exist
    model.fold_layer_norm()
    torch.testing.assert_close(model.step_logits(TOKENS), steps_before)
    model.set_n_steps(6)
    assert all(block.ln1.w is None for block in model.blocks)


def test_hooks_on_norms_still_fire_after_folding():
    model = build("ln_add")
    model.fold_layer_norm()
    _, cache = model.run_with_cache(TOKENS, names_filter="blocks.3.ln1.hook_normalized")
    x = cache["blocks.3.ln1.hook_normalized"]
    torch.testing.assert_close(x.mean(-1), torch.zeros_like(x.mean(-1)), atol=1e-10, rtol=0)  # LNPre output
    torch.testing.assert_close(x.pow(2).mean(-1), torch.ones_like(x[..., 0]), atol=1e-4, rtol=0)


def test_fold_layer_norm_options():
    model = build("rms_add")
    with pytest.raises(UnsupportedError, match="RMSNorm outputs are not mean-zero"):
        model.fold_layer_norm(center_weights=True)
    before = outputs(model)
    model.fold_layer_norm(fold_biases=False, center_weights=False)  # TransformerLens's RMSNorm call
    assert_same_predictions(before, outputs(model), up_to_shift=False)
    model = build("ln_add")
    with pytest.raises(UnsupportedError, match="fold_biases=False"):
        model.fold_layer_norm(fold_biases=False)
    before = outputs(model)
    model.fold_layer_norm(center_weights=False)
    assert_same_predictions(before, outputs(model), up_to_shift=False)
    assert model.W_Q.mean(-2).abs().max() > 1e-3  # not centred when asked not to
    with pytest.raises(UnsupportedError, match="refactor_factored_attn_matrices"):
        model.process_weights(refactor_factored_attn_matrices=True)


def test_process_weights_lists_every_reason_and_skips_centring_for_rms():
    model = build("rms_huginn_like")
    with pytest.raises(UnsupportedError) as err:
        model.process_weights()
    message = str(err.value)
    assert "fold_ln: the loop norm" in message and "loop_norm_weights='ln_final'" in message
    assert "center_writing_weights" not in message  # RMSNorm: skipped, as TransformerLens
    model = build("ln_linear")
    with pytest.raises(UnsupportedError, match="center_writing_weights: injection='linear'"):
        model.process_weights()
    before = outputs(model)
    model.process_weights(center_writing_weights=False)
    assert_same_predictions(before, outputs(model), up_to_shift=True)


@pytest.mark.parametrize(
    "layout, op, refusal",
    [
        ("ln_loop_norm_shared", "fold_ln", "_fold_ln_refusals"),
        ("ln_after_loop_shared", "fold_ln", "_fold_ln_refusals"),
        ("ln_exit_gate", "fold_ln", "_fold_ln_refusals"),
        ("rms_add", "center_writing", "_center_writing_refusals"),
        ("ln_post_norm", "center_writing", "_center_writing_refusals"),
        ("ln_linear", "center_writing", "_center_writing_refusals"),
        ("ln_exit_gate_raw_state", "center_writing", "_center_writing_refusals"),
        ("rms_gate_weighted", "fold_value_biases", "_fold_value_biases_refusals"),
    ],
)
def test_refused_ops_would_really_change_the_model(layout, op, refusal, monkeypatch):
    """Forcing a refused op through gives a different model: the refusal is not overcautious."""
    model = build(layout)

    def observed() -> list[torch.Tensor]:  # logits, and the exit gates where there are
        out = []
        for n in (1, 3):
            logits, cache = model.run_with_cache(TOKENS, n_steps=n, names_filter=lambda name: "exit_gate" in name)
            out += [logits, *cache.values()]
        return out

    before = observed()
    monkeypatch.setattr(WeightProcessingMixin, refusal, lambda self, *a: [])
    apply(model, op)
    with torch.no_grad():
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(observed(), before))
    assert worst > 1e-3
