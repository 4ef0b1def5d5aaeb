"""Unit tests of HookedLoopedTransformer on tiny random models of every layout variant."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from conftest import make_cfg, make_model
from transformer_lens import ActivationCache

from tl_loop import HookedLoopedTransformer, InputError, LoopedActivationCache, Schedule
from tl_loop._tl_compat import MODEL_PROTOCOL


def fire_counts(model, tokens, **kwargs) -> Counter:
    counts: Counter = Counter()

    def count(x, hook):
        counts[hook.name] += 1

    model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, count)], **kwargs)
    return counts


def test_every_hook_fires_exactly_once(variant, tokens):
    model = make_model(variant)
    counts = fire_counts(model, tokens)
    assert set(counts) == set(model.hook_dict), set(model.hook_dict) ^ set(counts)
    assert set(counts.values()) == {1}


def test_hook_names_follow_the_schedule(variant):
    model = make_model(variant)
    cfg = model.cfg
    names = set(model.hook_dict)
    assert len(model.blocks) == cfg.n_layers == len(model.schedule)
    assert cfg.n_layers == cfg.n_prelude_layers + cfg.n_steps * cfg.layers_per_step + cfg.n_coda_layers
    for i in range(cfg.n_layers):
        for suffix in ("hook_resid_pre", "attn.hook_pattern", "attn.hook_z", "hook_attn_out",
                       "hook_resid_mid", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"):
            assert f"blocks.{i}.{suffix}" in names
    for r in range(cfg.n_steps):
        assert f"loops.{r}.hook_state_in" in names and f"loops.{r}.hook_state_out" in names
        assert (f"loops.{r}.hook_injected" in names) == (cfg.injection != "none" or cfg.inner_cycles > 0)
        assert (f"loops.{r}.hook_exit_gate" in names) == cfg.exit_gate
        assert (f"loops.{r}.ln_state.hook_scale" in names) == (cfg.norm_between_steps and r < cfg.n_steps - 1)
    assert "hook_embed" in names and "ln_final.hook_scale" in names and "ln_final.hook_normalized" in names
    assert ("ln_loop_out.hook_normalized" in names) == cfg.norm_after_loop


def test_weights_stored_once_and_shared_across_steps(variant):
    model = make_model(variant)
    n_params = sum(p.numel() for p in model.parameters())
    keys = list(model.state_dict())
    assert not any(k.startswith(("blocks.", "loops.", "ln_final.")) for k in keys)
    core_blocks = [model.blocks[i] for i in model.schedule.stage_indices("core")]
    assert all(b.weights is model.core[b_i % model.cfg.n_core_layers]
               for b_i, b in enumerate(core_blocks))
    model.set_n_steps(7)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert list(model.state_dict()) == keys


def test_shapes(tokens):
    model = make_model("ouro_like")  # GQA: 4 query heads, 2 kv heads
    cfg = model.cfg
    _, cache = model.run_with_cache(tokens)
    b, p = tokens.shape
    assert cache["blocks.0.hook_resid_pre"].shape == (b, p, cfg.d_model)
    assert cache["blocks.0.attn.hook_q"].shape == (b, p, cfg.n_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_k"].shape == (b, p, cfg.n_key_value_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_pattern"].shape == (b, cfg.n_heads, p, p)
    assert cache["blocks.0.mlp.hook_post"].shape == (b, p, cfg.d_mlp)
    assert cache["loops.0.hook_exit_gate"].shape == (b, p, 1)
    assert cache["ln_final.hook_scale"].shape == (b, p, 1)
    assert model.blocks[0].attn.W_Q.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.blocks[0].attn.W_K.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.blocks[0].attn.W_O.shape == (cfg.n_heads, cfg.d_head, cfg.d_model)
    assert model.W_U.shape == (cfg.d_model, cfg.d_vocab)
    pattern = cache["blocks.3.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(b, cfg.n_heads, p))
    assert torch.all(pattern.triu(1) == 0)


def test_set_n_steps_round_trip(variant, tokens):
    model = make_model(variant)
    n0, depth0, hooks0 = model.cfg.n_steps, model.cfg.n_layers, len(model.hook_dict)
    before = model(tokens)
    model.set_n_steps(n0 + 3)
    assert model.cfg.n_layers == depth0 + 3 * model.cfg.layers_per_step
    assert len(model.blocks) == model.cfg.n_layers and len(model.loops) == n0 + 3
    assert len(model.hook_dict) > hooks0
    longer = model(tokens)
    model.set_n_steps(n0)
    assert model.cfg.n_layers == depth0 and len(model.hook_dict) == hooks0
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)
    torch.testing.assert_close(model(tokens, n_steps=n0 + 3), longer, rtol=0, atol=0)
    assert model.cfg.n_steps == n0  # a per-call n_steps does not stick


def test_run_with_cache_at_another_depth_stays_bound(tokens):
    model = make_model("huginn_like")
    _, cache = model.run_with_cache(tokens, n_steps=5)
    assert model.cfg.n_steps == 3
    assert isinstance(cache, LoopedActivationCache) and isinstance(cache, ActivationCache)
    assert cache.model.cfg.n_layers == model.cfg.effective_depth(5)
    assert cache.accumulated_resid().shape[0] == model.cfg.effective_depth(5) + 1
    assert cache.stack_loop("resid_post").shape[:2] == (5, model.cfg.layers_per_step)


def test_hooks_stay_bound_to_their_names_across_depths(tokens):
    model = make_model("plain")
    fired: list[str] = []
    model.add_perma_hook("hook_embed", lambda x, hook: fired.append(hook.name))
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: fired.append(hook.name))]):
        model(tokens, n_steps=5)  # a per-call depth keeps the hooks
        assert fired == ["hook_embed", "blocks.0.hook_resid_pre"]
        model.set_n_steps(1)
        model(tokens)
        assert fired[2:] == ["hook_embed", "blocks.0.hook_resid_pre"]
        model.set_n_steps(3)
    model.add_hook("blocks.5.hook_resid_pre", lambda x, hook: fired.append(hook.name))
    model.set_n_steps(2)  # blocks.5 does not exist at 2 steps: the call raises, naming it
    with pytest.raises(InputError, match=r"blocks\.5\.hook_resid_pre.*do not exist at n_steps=2"):
        model(tokens)
    model.reset_hooks(including_permanent=True)  # removes hooks at every depth
    model(tokens)
    model.set_n_steps(3)
    fired.clear()
    model(tokens)
    assert fired == []


def test_gradients_reach_every_parameter(variant, tokens):
    model = make_model(variant)
    loss = model(tokens, return_type="loss")
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("exit_gate."):  # the gate reads the loop but never feeds the logits
            assert p.grad is None
            continue
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_gradients_match_finite_differences_in_float64(variant):
    """Backpropagation through the unrolled loop is exact: float64 gradients of a few entries of
    every parameter agree with central differences (so training on the library's forward is sound)."""
    model = make_model(variant, d_model=16, d_head=8, n_heads=2, d_mlp=24, rope_in_float32=False).double()
    model.train()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))

    def objective() -> torch.Tensor:
        return model(tokens)[:, -1, :5].sum()

    model.zero_grad()
    objective().backward()
    for name, p in model.named_parameters():
        if p.grad is None:  # the exit gate never feeds the logits
            continue
        for i in range(0, p.numel(), max(1, p.numel() // 3))[:3]:
            with torch.no_grad():
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + 1e-6
                plus = objective().item()
                p.view(-1)[i] = old - 1e-6
                minus = objective().item()
                p.view(-1)[i] = old
            fd = (plus - minus) / 2e-6
            assert abs(p.grad.view(-1)[i].item() - fd) < 1e-6 * max(1.0, abs(fd)), (name, i)


def test_determinism_and_rng_isolation(tokens):
    model = make_model("huginn_like")
    state = torch.get_rng_state()
    a, b = model(tokens), model(tokens)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state), "the random initial state consumed the global RNG"
    c = model(tokens, init_seed=1)
    assert not torch.allclose(a, c)
    assert torch.equal(c, model(tokens, init_seed=1))
    init = torch.randn(*tokens.shape, model.cfg.d_model)
    d = model(tokens, init_state=init)
    assert torch.equal(d, model(tokens, init_state=init))
    _, cache = model.run_with_cache(tokens, init_state=init)
    torch.testing.assert_close(cache["loops.0.hook_state_in"], init)


def test_return_types(tokens):
    model = make_model("prelude_coda_add")
    logits = model(tokens)
    loss = model(tokens, return_type="loss")
    both = model(tokens, return_type="both")
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert model(tokens, return_type=None) is None
    torch.testing.assert_close(both[0], logits)
    torch.testing.assert_close(both[1], loss)
    assert per_token.shape == (tokens.shape[0], tokens.shape[1] - 1)
    torch.testing.assert_close(per_token.mean(), loss)
    logp = logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(-logp.mean(), loss)


def test_fused_attention_matches_materialised_pattern(variant, tokens):
    model = make_model(variant)
    fast = model(tokens)
    slow = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: x)])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_schedule_helpers_invert(variant):
    cfg = make_cfg(variant)
    sched = Schedule.from_config(cfg)
    for layer in sched:
        if layer.in_loop:
            assert sched.index(*sched.locate(layer.index)) == layer.index
            assert layer.index in sched.step_indices(layer.step)
        else:
            with pytest.raises(ValueError, match="not inside the loop"):
                sched.locate(layer.index)
    for j in range(sched.layers_per_step):
        assert [sched.locate(i) for i in sched.loop_indices(j)] == [(r, j) for r in range(cfg.n_steps)]
    with pytest.raises(IndexError):
        sched.index(cfg.n_steps, 0)


def test_stack_activation_layout(tokens):
    model = make_model("hrm_like")
    _, cache = model.run_with_cache(tokens)
    stacked = cache.stack_loop("resid_post")
    sched = model.schedule
    assert stacked.shape == (sched.n_steps, sched.layers_per_step, *tokens.shape, model.cfg.d_model)
    i = sched.index(1, 2)
    torch.testing.assert_close(stacked[1, 2], cache[f"blocks.{i}.hook_resid_post"])


def test_backward_hooks_and_cache(tokens):
    model = make_model("ouro_like")
    loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                       names_filter=lambda n: n.endswith("hook_resid_post"))
    grads = [k for k in cache.keys() if k.endswith("_grad")]
    assert len(grads) == model.cfg.n_layers
    assert not model.list_hooks(), "hooks left attached after run_with_cache"


def test_protocol_and_eval_mode():
    model = make_model("plain")
    if MODEL_PROTOCOL is not None:  # transformer_lens.model_protocol is TransformerLens 4.x only
        assert isinstance(model, MODEL_PROTOCOL)
    assert not model.training and all(not m.training for m in model.modules())
    model.set_n_steps(5)
    assert all(not m.training for m in model.modules())


def test_zero_steps_skips_the_loop(tokens):
    model = make_model("huginn_like")
    out = model(tokens, n_steps=0)
    assert out.shape == (*tokens.shape, model.cfg.d_vocab)
    with model.steps(0):
        assert model.cfg.n_layers == model.cfg.n_prelude_layers + model.cfg.n_coda_layers
        assert not any(n.startswith("loops.") for n in model.hook_dict)


def test_bad_inputs_are_named(tokens):
    model = make_model("plain")
    with pytest.raises(InputError, match="integer ids"):
        model(tokens.float())
    with pytest.raises(InputError, match="must lie in"):
        model(tokens + model.cfg.d_vocab)
    with pytest.raises(InputError, match="exceeds the model's context"):
        model(torch.zeros(1, model.cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(InputError, match="empty token tensor"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="n_steps must be >= 0"):
        model(tokens, n_steps=-1)
    with pytest.raises(InputError, match="force=True"):
        model(tokens, n_steps=10_000)
    with pytest.raises(InputError, match="no tokenizer"):
        model("some text")
    with pytest.raises(InputError, match="init_state has shape"):
        model(tokens, init_state=torch.zeros(1, 2, 3))
    with pytest.raises(InputError, match="did you mean blocks.0.hook_resid_pre"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pr", lambda x, hook: x)])
    assert not model.list_hooks()


def test_filter_matching_nothing_warns(tokens, caplog):
    model = make_model("plain")
    with caplog.at_level(logging.WARNING):
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.99.hook_resid_pre"])
    assert len(cache) == 0
    assert "names hook points this model does not have" in caplog.text


def test_hook_that_raises_leaves_model_clean(tokens):
    model = make_model("plain")

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.hook_resid_mid", boom)])
    assert not model.list_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x)]):
            with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", boom)]):
                model(tokens)
    assert not model.list_hooks()
    torch.testing.assert_close(model(tokens), model(tokens))


def test_patching_a_hook_changes_downstream(tokens):
    model = make_model("prelude_coda_add")
    clean = model(tokens)
    out = model.run_with_hooks(tokens, fwd_hooks=[("loops.1.hook_state_in", lambda x, hook: torch.zeros_like(x))])
    assert not torch.allclose(out, clean)
    same = model.run_with_hooks(tokens, fwd_hooks=[("loops.1.hook_state_in", lambda x, hook: x.clone())])
    torch.testing.assert_close(same, clean, rtol=0, atol=0)


def test_random_model_is_seedable():
    cfg = make_cfg("plain")
    a = HookedLoopedTransformer(cfg, seed=3)
    b = HookedLoopedTransformer(make_cfg("plain"), seed=3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_models_built_from_one_config_do_not_share_it(tokens):
    from conftest import make_cfg

    from tl_loop import HookedLoopedTransformer

    cfg = make_cfg("prelude_coda_add")
    a, b = HookedLoopedTransformer(cfg, seed=0), HookedLoopedTransformer(cfg, seed=0)
    a.set_n_steps(6)
    assert (b.cfg.n_steps, b.cfg.n_layers, len(b.blocks)) == (3, 8, 8)
    assert cfg.n_steps == 3 and cfg.n_layers == 8
    from transformer_lens import patching

    _, cache = b.run_with_cache(tokens)
    out = patching.get_act_patch_resid_pre(b, tokens, cache, lambda logits: logits[0, -1, 0])
    assert out.shape == (8, tokens.shape[1])


def test_a_depth_sweep_keeps_one_view_per_name(tokens):
    """Views are pooled by name, not kept per depth: sweeping 1..40 steps leaves exactly the
    views of the deepest (RSS over 1..96 steps: +28 MB, against +620 MB with per-depth views)."""
    model = make_model("prelude_coda_add")
    for n in range(1, 41):
        model.set_n_steps(n)
    model.set_n_steps(3)
    assert len(model._block_pool) == model.cfg.effective_depth(40)
    assert len(model._loop_pool) == 40
    assert len(model.hook_dict) == len(make_model("prelude_coda_add").hook_dict)
    torch.testing.assert_close(model(tokens), make_model("prelude_coda_add")(tokens))
