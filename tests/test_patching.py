"""``tl_loop.patching``: patching and ablating a layer of the cycle at every step, a range of
steps, or the recurrent state between steps.

Hook names in these tests are spelled out from the layout (``n_prelude + step * layers_per_step
+ j``) rather than taken from ``model.schedule``, so they check the library's index arithmetic.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from conftest import make_model
from transformer_lens import patching as tl_patching

import tl_loop.patching as lp
from tl_loop.errors import InputError

A, B = 3, 5


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, A] - logits[:, -1, B]).mean()


def token_pair(n_pos: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 61, (2, n_pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 0] = (clean[:, 0] + 17) % 61
    return clean, corrupted


def effective(model, step: int, j: int) -> int:
    cfg = model.cfg
    return cfg.n_prelude_layers + step * cfg.layers_per_step + j


def setup(variant: str, n_pos: int = 4, **overrides):
    model = make_model(variant, **overrides)
    clean, corrupted = token_pair(n_pos)
    clean_logits, clean_cache = model.run_with_cache(clean)
    corr_logits, corr_cache = model.run_with_cache(corrupted)
    return model, clean, corrupted, clean_logits, clean_cache, corr_logits, corr_cache


def assert_close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.abs().max().item(), 1.0))


def differs(a, b) -> bool:
    return (a - b).abs().max().item() > 1e-3 * max(b.abs().max().item(), 1.0)


# ------------------------------------------------------------------ names
def test_cycle_and_state_hook_names(variant):
    model = make_model(variant)
    n, lps = model.cfg.n_steps, model.cfg.layers_per_step
    for j in range(lps):
        assert lp.cycle_hook_names(model, "resid_pre", j) == [
            f"blocks.{effective(model, r, j)}.hook_resid_pre" for r in range(n)
        ]
    last = lps - 1
    assert lp.cycle_hook_names(model, "z", last, steps=-1) == [f"blocks.{effective(model, n - 1, last)}.attn.hook_z"]
    assert lp.cycle_hook_names(model, "attn.hook_pattern", 0, steps=range(1, n)) == [
        f"blocks.{effective(model, r, 0)}.attn.hook_pattern" for r in range(1, n)
    ]
    if model.cfg.pre_norm:
        assert lp.cycle_hook_names(model, "ln1.hook_scale", 0, steps=slice(None, None, 2)) == [
            f"blocks.{effective(model, r, 0)}.ln1.hook_scale" for r in range(0, n, 2)
        ]
    assert lp.state_hook_names(model, "state_out") == [f"loops.{r}.hook_state_out" for r in range(n)]
    assert lp.state_hook_names(model, "hook_state_in", steps=[1, 0]) == ["loops.1.hook_state_in", "loops.0.hook_state_in"]
    for name in lp.cycle_hook_names(model, "mlp_out", 0) + lp.state_hook_names(model):
        assert name in model.hook_dict


# ------------------------------------------------------------------ exact restorations
def test_patching_the_last_state_restores_the_clean_run(variant):
    # Everything after the loop reads only the state leaving the last step.
    model, _, corrupted, clean_logits, clean_cache, corr_logits, _ = setup(variant)
    assert differs(corr_logits, clean_logits)
    patched = model.run_with_hooks(corrupted, fwd_hooks=lp.patch_state_hooks(model, clean_cache, steps=-1, where="state_out"))
    assert_close(patched, clean_logits)
    # The same state is the output of the last layer of the cycle at the last step.
    last = model.cfg.layers_per_step - 1
    hooks = lp.patch_cycle_hooks(model, clean_cache, "resid_post", layer_in_cycle=last, steps=-1)
    assert_close(model.run_with_hooks(corrupted, fwd_hooks=hooks), clean_logits)
    # ... but the state leaving any earlier step is not enough where the prelude output is
    # re-injected every step (it still carries the corrupted token).
    if model.cfg.n_steps > 1 and (model.cfg.injection != "none" or model.cfg.inner_cycles):
        early = lp.patch_state_hooks(model, clean_cache, steps=range(model.cfg.n_steps - 1), where="state_out")
        assert differs(model.run_with_hooks(corrupted, fwd_hooks=early), clean_logits)


@pytest.mark.parametrize("variant", ["plain", "ouro_like"])
def test_the_state_is_the_whole_input_when_nothing_is_injected(variant):
    # No prelude, no injection: the state entering any step carries all the loop knows, so
    # restoring it at one step (every position) restores the clean run, for every step.
    model, _, corrupted, clean_logits, clean_cache, _, _ = setup(variant)
    for r in range(model.cfg.n_steps):
        patched = model.run_with_hooks(corrupted, fwd_hooks=lp.patch_state_hooks(model, clean_cache, steps=r))
        assert_close(patched, clean_logits)
    clean_metric = logit_diff(clean_logits)
    per_step = lp.get_act_patch_state(model, corrupted, clean_cache, logit_diff, index_axis_names=("step",))
    assert per_step.shape == (model.cfg.n_steps,)
    assert_close(per_step, clean_metric.expand(model.cfg.n_steps))


@pytest.mark.parametrize("variant", ["prelude_coda_add", "huginn_like"])
def test_injected_input_keeps_the_corruption_until_the_last_step(variant):
    # With injection, the state alone is not the whole story: restoring the state entering every
    # step still leaves the corrupted prelude output re-injected, while restoring the state
    # *after* injection at the last step restores the clean run.
    model, _, corrupted, clean_logits, clean_cache, _, _ = setup(variant)
    state_everywhere = lp.patch_state_hooks(model, clean_cache, steps=None, where="state_in")
    assert len(state_everywhere) == model.cfg.n_steps
    assert differs(model.run_with_hooks(corrupted, fwd_hooks=state_everywhere), clean_logits)
    injected_last = lp.patch_state_hooks(model, clean_cache, steps=-1, where="injected")
    assert_close(model.run_with_hooks(corrupted, fwd_hooks=injected_last), clean_logits)


def test_patching_with_the_runs_own_activations_is_the_identity(variant):
    model, _, corrupted, _, _, corr_logits, corr_cache = setup(variant)
    hooks = []
    for j in range(model.cfg.layers_per_step):
        hooks += lp.patch_cycle_hooks(model, corr_cache, "resid_pre", j)
        hooks += lp.patch_cycle_hooks(model, corr_cache, "z", j, pos=[0, 2], head=1)
        hooks += lp.patch_cycle_hooks(model, corr_cache, "pattern", j, steps=0, pos=1)
    hooks += lp.patch_state_hooks(model, corr_cache, where="state_in") + lp.patch_state_hooks(model, corr_cache, where="state_out")
    assert_close(model.run_with_hooks(corrupted, fwd_hooks=hooks), corr_logits, tol=1e-5)


# ------------------------------------------------------------------ what exactly gets patched
@pytest.mark.parametrize("variant", ["prelude_coda_add", "ouro_like", "hrm_like"])
def test_a_cycle_patch_hits_every_chosen_step_and_nothing_else(variant):
    model, _, corrupted, _, clean_cache, _, corr_cache = setup(variant)
    n, j = model.cfg.n_steps, 1
    ids = [effective(model, r, j) for r in range(n)]

    def patched_cache(hooks):
        with model.hooks(fwd_hooks=hooks):
            return model.run_with_cache(corrupted)[1]

    # All steps: the block's output is the clean one at every step (it reads only its input).
    cache = patched_cache(lp.patch_cycle_hooks(model, clean_cache, "resid_pre", j))
    for i in ids:
        assert_close(cache[f"blocks.{i}.hook_resid_post"], clean_cache[f"blocks.{i}.hook_resid_post"])
    # One step: earlier steps keep the corrupted values, the chosen step becomes clean.
    cache = patched_cache(lp.patch_cycle_hooks(model, clean_cache, "resid_pre", j, steps=1))
    assert differs(cache[f"blocks.{ids[0]}.hook_resid_post"], clean_cache[f"blocks.{ids[0]}.hook_resid_post"])
    assert_close(cache[f"blocks.{ids[0]}.hook_resid_post"], corr_cache[f"blocks.{ids[0]}.hook_resid_post"], tol=1e-5)
    assert_close(cache[f"blocks.{ids[1]}.hook_resid_post"], clean_cache[f"blocks.{ids[1]}.hook_resid_post"])
    # A position and a head: only that slice of the first patched activation changes.
    cache = patched_cache(lp.patch_cycle_hooks(model, clean_cache, "z", j, pos=2, head=3))
    z, z_clean, z_corr = (c[f"blocks.{ids[0]}.attn.hook_z"] for c in (cache, clean_cache, corr_cache))
    assert_close(z[:, 2, 3], z_clean[:, 2, 3])
    keep = torch.ones(z.shape[1:3], dtype=torch.bool)
    keep[2, 3] = False
    assert_close(z[:, keep], z_corr[:, keep], tol=1e-5)
    assert differs(z_clean[:, 2, 3], z_corr[:, 2, 3])
    # Patterns are [batch, head, dest_pos, src_pos]: pos selects the destination.
    cache = patched_cache(lp.patch_cycle_hooks(model, clean_cache, "pattern", j, steps=0, pos=3, head=0))
    pat, pat_clean, pat_corr = (c[f"blocks.{ids[0]}.attn.hook_pattern"] for c in (cache, clean_cache, corr_cache))
    assert_close(pat[:, 0, 3], pat_clean[:, 0, 3])
    assert_close(pat[:, 1:], pat_corr[:, 1:], tol=1e-5)
    assert_close(pat[:, 0, :3], pat_corr[:, 0, :3], tol=1e-5)


def test_position_patches_are_causal():
    model, _, corrupted, _, clean_cache, corr_logits, _ = setup("prelude_coda_add")
    patched = model.run_with_hooks(corrupted, fwd_hooks=lp.patch_cycle_hooks(model, clean_cache, "resid_pre", 0, pos=2))
    torch.testing.assert_close(patched[:, :2], corr_logits[:, :2], rtol=1e-5, atol=1e-5)
    assert differs(patched[:, 2:], corr_logits[:, 2:])


# ------------------------------------------------------------------ ablation
@pytest.mark.parametrize("variant", ["plain", "huginn_like", "hrm_like"])
def test_ablation(variant):
    model, clean, corrupted, _, _, corr_logits, _ = setup(variant)
    j = 0
    ids = [effective(model, r, j) for r in range(model.cfg.n_steps)]

    zero = lp.ablate_cycle_hooks(model, "attn_out", j, mode="zero")
    with model.hooks(fwd_hooks=zero):
        logits, cache = model.run_with_cache(corrupted)
    assert differs(logits, corr_logits)
    assert all(cache[f"blocks.{i}.hook_attn_out"].abs().max() == 0 for i in ids)

    head = lp.ablate_cycle_hooks(model, "z", j, steps=[0, -1], head=2)
    with model.hooks(fwd_hooks=head):
        logits, cache = model.run_with_cache(corrupted)
    assert differs(logits, corr_logits)
    for i in (ids[0], ids[-1]):
        assert cache[f"blocks.{i}.attn.hook_z"][:, :, 2].abs().max() == 0
        assert cache[f"blocks.{i}.attn.hook_z"][:, :, [0, 1, 3]].abs().min() > 0

    # Mean ablation over a reference batch replaces every example by the reference mean.
    reference = torch.cat([clean, corrupted])
    _, mean_cache = model.run_with_cache(reference)
    mean = lp.ablate_cycle_hooks(model, "mlp_out", j, mode="mean", mean_cache=mean_cache)
    with model.hooks(fwd_hooks=mean):
        logits, cache = model.run_with_cache(corrupted)
    assert differs(logits, corr_logits)
    i0 = ids[0]
    want = mean_cache[f"blocks.{i0}.hook_mlp_out"].mean(0, keepdim=True).expand_as(cache[f"blocks.{i0}.hook_mlp_out"])
    assert_close(cache[f"blocks.{i0}.hook_mlp_out"], want)
    # Without a mean_cache, the run's own batch mean: a batch of one is left unchanged.
    one = corrupted[:1]
    own = lp.ablate_cycle_hooks(model, "resid_pre", j, mode="mean")
    assert_close(model.run_with_hooks(one, fwd_hooks=own), model(one), tol=1e-5)

    # The recurrent state: zero the state entering the last step (at one position).
    state = lp.ablate_state_hooks(model, steps=-1, pos=1)
    with model.hooks(fwd_hooks=state):
        logits, cache = model.run_with_cache(corrupted)
    last = f"loops.{model.cfg.n_steps - 1}.hook_state_in"
    assert cache[last][:, 1].abs().max() == 0 and cache[last][:, 0].abs().min() > 0
    torch.testing.assert_close(logits[:, :1], corr_logits[:, :1], rtol=1e-5, atol=1e-5)
    assert differs(logits[:, 1:], corr_logits[:, 1:])


# ------------------------------------------------------------------ sweeps
@pytest.mark.parametrize("variant", ["prelude_coda_add", "huginn_like", "hrm_like"])
def test_get_act_patch_cycle_equals_the_hand_written_multi_hook_patch(variant):
    model, _, corrupted, _, clean_cache, _, _ = setup(variant, n_pos=3, n_steps=2)
    n_pos, lps, n_steps = 3, model.cfg.layers_per_step, model.cfg.n_steps
    result = lp.get_act_patch_cycle(model, corrupted, clean_cache, logit_diff)
    assert result.shape == (lps, n_pos)

    def restore(p):
        def hook(act, hook):
            act = act.clone()
            act[:, p] = clean_cache[hook.name][:, p]
            return act

        return hook

    hand = torch.zeros(lps, n_pos)
    for j in range(lps):
        for p in range(n_pos):
            hooks = [(f"blocks.{effective(model, r, j)}.hook_resid_pre", restore(p)) for r in range(n_steps)]
            hand[j, p] = logit_diff(model.run_with_hooks(corrupted, fwd_hooks=hooks))
    assert_close(result, hand)
    assert differs(hand, logit_diff(model(corrupted)).expand_as(hand))

    # Heads of z, all positions at once: [layer_in_cycle, head].
    by_head = lp.get_act_patch_cycle(model, corrupted, clean_cache, logit_diff, "z", index_axis_names=("layer_in_cycle", "head"))
    assert by_head.shape == (lps, model.cfg.n_heads)

    def restore_head(h):
        def hook(act, hook):
            act = act.clone()
            act[:, :, h] = clean_cache[hook.name][:, :, h]
            return act

        return hook

    for h in range(model.cfg.n_heads):
        hooks = [(f"blocks.{effective(model, r, 1)}.attn.hook_z", restore_head(h)) for r in range(n_steps)]
        assert_close(by_head[1, h], logit_diff(model.run_with_hooks(corrupted, fwd_hooks=hooks)))

    # Leaving out layer_in_cycle patches every layer of the cycle at every step in one run.
    whole = lp.get_act_patch_cycle(model, corrupted, clean_cache, logit_diff, index_axis_names=("pos",))
    assert whole.shape == (n_pos,)
    hooks = [(f"blocks.{effective(model, r, j)}.hook_resid_pre", restore(0)) for r in range(n_steps) for j in range(lps)]
    assert_close(whole[0], logit_diff(model.run_with_hooks(corrupted, fwd_hooks=hooks)))


def test_cycle_index_df_with_generic_activation_patch_and_single_step_sweeps():
    model, _, corrupted, _, clean_cache, _, _ = setup("prelude_coda_add", n_pos=3, n_steps=2)
    n_pos, lps, n_steps = 3, model.cfg.layers_per_step, model.cfg.n_steps
    full = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit_diff)  # [n_layers, pos]
    for j in range(lps):
        df = lp.cycle_index_df(model, j, n_pos=n_pos)
        assert list(df.columns) == ["layer", "pos"] and len(df) == n_steps * n_pos
        assert df["layer"].tolist() == [effective(model, r, j) for r in range(n_steps) for _ in range(n_pos)]
        flat = tl_patching.generic_activation_patch(
            model, corrupted, clean_cache, logit_diff, tl_patching.layer_pos_patch_setter, "resid_pre", index_df=df
        )
        per_step = flat.reshape(n_steps, n_pos)
        want = torch.stack([full[effective(model, r, j)] for r in range(n_steps)])
        assert_close(per_step, want, tol=1e-5)
    # One step at a time, get_act_patch_cycle is TransformerLens's sweep, reordered.
    for r in range(n_steps):
        one_step = lp.get_act_patch_cycle(model, corrupted, clean_cache, logit_diff, steps=r)
        assert_close(one_step, full[effective(model, r, 0) : effective(model, r, 0) + lps], tol=1e-5)
    # Heads: a [layer, pos, head] index_df for TransformerLens's head-vector setter.
    df = lp.cycle_index_df(model, 1, steps=[1], n_pos=n_pos, n_heads=model.cfg.n_heads)
    assert list(df.columns) == ["layer", "pos", "head"] and len(df) == n_pos * model.cfg.n_heads
    flat = tl_patching.generic_activation_patch(
        model, corrupted, clean_cache, logit_diff, tl_patching.layer_pos_head_vector_patch_setter, "z", index_df=df
    )
    by_pos = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, logit_diff)
    assert_close(flat.reshape(n_pos, -1), by_pos[effective(model, 1, 1)], tol=1e-5)


@pytest.mark.parametrize(("variant", "where"), [("plain", "state_in"), ("ouro_like", "state_in"), ("prelude_coda_add", "injected")])
def test_get_act_patch_state_equals_resid_pre_of_the_first_layer_of_each_step(variant, where):
    # Where the state (or the state after injection) is exactly the input of the first layer
    # of the step, patching it equals TransformerLens's resid_pre patch of that layer.
    model, _, corrupted, _, clean_cache, _, _ = setup(variant, n_pos=3, n_steps=2)
    result = lp.get_act_patch_state(model, corrupted, clean_cache, logit_diff, where=where)
    assert result.shape == (2, 3)
    full = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit_diff)
    assert_close(result, torch.stack([full[effective(model, r, 0)] for r in range(2)]), tol=1e-5)
    assert lp.get_act_patch_state(model, corrupted, clean_cache, logit_diff, where=where, index_axis_names=("pos", "step")).shape == (3, 2)


def test_sweeps_and_hooks_at_another_depth():
    model, clean, corrupted, _, _, _, _ = setup("plain", n_pos=3)
    assert model.cfg.n_steps == 3
    logits5, cache5 = model.run_with_cache(clean, n_steps=5)
    hooks = lp.patch_state_hooks(model, cache5, steps=4, where="state_out", n_steps=5)
    assert [n for n, _ in hooks] == ["loops.4.hook_state_out"]
    assert_close(model.run_with_hooks(corrupted, fwd_hooks=hooks, n_steps=5), logits5)
    result = lp.get_act_patch_state(model, corrupted, cache5, logit_diff, index_axis_names=("step",), n_steps=5)
    assert_close(result, logit_diff(logits5).expand(5))
    # The cache's bound model carries its depth: no n_steps needed.
    assert lp.get_act_patch_cycle(cache5.model, corrupted, cache5, logit_diff).shape == (2, 3)
    assert model.cfg.n_steps == 3


# ------------------------------------------------------------------ errors
def test_clear_errors():
    model, clean, corrupted, _, clean_cache, _, _ = setup("prelude_coda_add", n_pos=3)
    n = model.cfg.n_steps
    with pytest.raises(InputError, match=rf"step {n} out of range.*n_steps={n}"):
        lp.patch_cycle_hooks(model, clean_cache, "resid_pre", 0, steps=n)
    with pytest.raises(InputError, match="step -4 out of range"):
        lp.cycle_hook_names(model, "resid_pre", 0, steps=[0, -4])
    with pytest.raises(InputError, match="listed twice"):
        lp.cycle_hook_names(model, "resid_pre", 0, steps=[1, -2])
    with pytest.raises(InputError, match="layer_in_cycle 2 out of range.*2 layers"):
        lp.cycle_hook_names(model, "resid_pre", 2)
    with pytest.raises(InputError, match="unknown activation 'resid_pree'.*did you mean"):
        lp.cycle_hook_names(model, "resid_pree", 0)
    with pytest.raises(InputError, match="unknown activation 'attn.hook_nothing'"):
        lp.get_act_patch_cycle(model, corrupted, clean_cache, logit_diff, "attn.hook_nothing")
    with pytest.raises(InputError, match="head= given but .*hook_resid_pre has no head axis"):
        lp.patch_cycle_hooks(model, clean_cache, "resid_pre", 0, head=1)
    with pytest.raises(InputError, match="not a valid head index"):
        lp.patch_cycle_hooks(model, clean_cache, "z", 0, head=4)
    with pytest.raises(InputError, match="mode must be 'zero' or 'mean'"):
        lp.ablate_cycle_hooks(model, "resid_pre", 0, mode="resample")
    with pytest.raises(InputError, match="index_axis_names"):
        lp.get_act_patch_cycle(model, corrupted, clean_cache, logit_diff, index_axis_names=("layer", "pos"))
    with pytest.raises(InputError, match="n_pos must be a positive int"):
        lp.cycle_index_df(model, 0)

    # A cache recorded at another depth: the error names both.
    _, cache5 = model.run_with_cache(clean, n_steps=5)
    with pytest.raises(InputError, match=r"clean_cache was recorded at n_steps=5 but the model runs n_steps=3"):
        lp.patch_cycle_hooks(model, cache5, "resid_pre", 0)
    with pytest.raises(InputError, match=r"n_steps=5.*n_steps=3"):
        lp.get_act_patch_state(model, corrupted, cache5, logit_diff)
    with pytest.raises(InputError, match=r"clean_cache was recorded at n_steps=5 but the model runs n_steps=3"):
        lp.patch_state_hooks(model, cache5, steps=4)  # a step only the cache's depth has
    with pytest.raises(InputError, match=r"mean_cache was recorded at n_steps=5"):
        lp.ablate_cycle_hooks(model, "resid_pre", 0, mode="mean", mean_cache=cache5)

    # Missing activations, wrong prompt lengths, bad positions: caught with the hook's name.
    _, partial = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
    with pytest.raises(InputError, match="clean_cache has no activation 'loops.0.hook_state_in'"):
        lp.patch_state_hooks(model, partial, steps=0)
    short = lp.patch_cycle_hooks(model, clean_cache, "resid_pre", 0)
    with pytest.raises(InputError, match=r"replacement for blocks\.\d+\.hook_resid_pre has shape"):
        model.run_with_hooks(corrupted[:, :2], fwd_hooks=short)
    with pytest.raises(InputError, match="pos=7 does not index"):
        model.run_with_hooks(corrupted, fwd_hooks=lp.patch_cycle_hooks(model, clean_cache, "resid_pre", 0, pos=7))

    # Layout-specific: no injection hook where nothing is injected; no loop at n_steps=0.
    plain = make_model("plain")
    with pytest.raises(InputError, match="injects nothing"):
        lp.state_hook_names(plain, "injected")
    with pytest.raises(InputError, match="0 steps"):
        lp.cycle_hook_names(plain, "resid_pre", 0, n_steps=0)
    assert isinstance(InputError("x"), ValueError)


def test_docstring_examples_run():
    result = doctest.testmod(lp, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
