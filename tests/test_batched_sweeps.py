"""Every batched sweep of ``tl_loop.patching`` returns what its twin returns (TransformerLens's
sweep, or tl-loop's one-run-per-cell loop sweep), in every layout variant."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import VARIANTS, make_model
from transformer_lens import patching as tl

import tl_loop.patching as lp
from tl_loop import InputError
from tl_loop._tl_compat import TL_MAJOR, TL_VERSION
from tl_loop.batched import Cell, default_batch_size, run_cells

TOL = dict(rtol=1e-5, atol=1e-5)

#: (TransformerLens sweep, its batched twin), by name.
SWEEPS = {
    name: (getattr(tl, name), getattr(lp, f"{name}_batched"))
    for name in [
        "get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_out", "get_act_patch_mlp_out",
        "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_k_by_pos",
        "get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_by_pos",
        "get_act_patch_attn_head_pattern_dest_src_pos", "get_act_patch_attn_head_out_all_pos",
        "get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_k_all_pos", "get_act_patch_attn_head_v_all_pos",
        "get_act_patch_attn_head_pattern_all_pos", "get_act_patch_block_every",
        "get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_by_pos_every",
    ]
}
#: The costliest references (5 sweeps each) run on three layouts that between them cover
#: injection, inner cycles, state norms, GQA and a random initial state.
EVERY = {"get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_by_pos_every"}
EVERY_VARIANTS = {"huginn_like", "ouro_like"}


@functools.lru_cache(maxsize=None)
def setup(variant: str, n_pos: int = 2, differ_at: int = 0):
    """Model (2 steps, 2 heads: TransformerLens's sweeps run once per cell), corrupted tokens (the
    clean ones with the token at ``differ_at`` changed), clean cache and a metric reading every
    row and position of the batch."""
    gqa = {"n_key_value_heads": 1} if VARIANTS[variant].get("n_key_value_heads") else {}
    model = make_model(variant, n_heads=2, d_head=16, n_steps=2, **gqa)
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, model.cfg.d_vocab, (2, n_pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, differ_at] = (clean[:, differ_at] + 11) % model.cfg.d_vocab
    clean_logits, clean_cache = model.run_with_cache(clean)
    good = clean_logits.argmax(-1)  # [batch, pos]
    bad = (good + 1) % model.cfg.d_vocab

    def per_example(logits):
        assert logits.shape[0] == 2, "the metric must see the corrupted batch's size"
        return (logits.gather(-1, good[..., None]) - logits.gather(-1, bad[..., None])).sum((1, 2))

    def metric(logits):
        return per_example(logits).mean()

    return model, corrupted, clean_cache, metric, per_example


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(SWEEPS))
def test_batched_sweep_equals_its_twin(name, variant):
    if name in EVERY and variant not in EVERY_VARIANTS:
        pytest.skip("the five-sweep references run on two layouts (their parts run on all)")
    reference, batched = SWEEPS[name]
    model, corrupted, clean_cache, metric, _ = setup(variant)
    expected = reference(model, corrupted, clean_cache, metric)
    assert expected.std() > 1e-5, "the sweep must vary over its cells to test anything"
    got = batched(model, corrupted, clean_cache, metric, 5, verbose=False)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, **TOL)


SHARED_PREFIX_VARIANTS = ["huginn_like", "ouro_like", "hrm_like"]


@pytest.mark.parametrize("variant", SHARED_PREFIX_VARIANTS)
@pytest.mark.parametrize("name", [n for n in SWEEPS if n not in EVERY])
def test_shared_prefix_sweeps_equal_their_twins(name, variant):
    """Prompts that agree on their first two tokens: cells there change nothing and are not run,
    cells over all positions run from the first differing token (their hooks still see every
    position), and every value is still TransformerLens's."""
    reference, batched = SWEEPS[name]
    model, corrupted, clean_cache, metric, _ = setup(variant, n_pos=4, differ_at=2)
    expected = reference(model, corrupted, clean_cache, metric)
    got = batched(model, corrupted, clean_cache, metric, 6, verbose=False)
    torch.testing.assert_close(got, expected, **TOL)


def test_unchanged_cells_are_not_run(monkeypatch):
    """How much runs: a resid_pre sweep runs only the cells whose clean activation differs,
    and a head sweep over all positions runs its passes from that token on."""
    import tl_loop.batched as engine

    passes = []
    real = engine._run_pass

    def counting(model, tokens, cells, joins, chunk, *args):
        passes.append((len(chunk), args[-3]))  # cells in the pass, its first position
        return real(model, tokens, cells, joins, chunk, *args)

    monkeypatch.setattr(engine, "_run_pass", counting)
    model, corrupted, _, metric, _ = setup("huginn_like", n_pos=4, differ_at=2)
    clean = corrupted.clone()
    clean[:, 2] = (corrupted[:, 2] - 11) % model.cfg.d_vocab
    # the clean run computed as the patched runs are (same hooked path): equal prefixes, bit for bit
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_z")))
    lp.get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric, 1000, verbose=False)
    # positions 2 and 3 of every layer, but position 3 of layer 0 (the embedding of an equal token)
    assert sum(n for n, _ in passes) == model.cfg.n_layers * 2 - 1
    passes.clear()
    lp.get_act_patch_attn_head_out_all_pos_batched(model, corrupted, clean_cache, metric, 1000, verbose=False)
    assert passes and all(first == 2 for _, first in passes)


def test_hooks_without_a_promised_position_see_every_position():
    """Any hook (not one of TransformerLens's setters) that leaves the first positions alone runs
    from its first change, and still sees, and may read, the whole activation."""
    model, corrupted, clean_cache, metric, _ = setup("ouro_like", n_pos=4, differ_at=2)

    def from_two(fn):
        def hook(x, hook):
            assert x.shape[-2 if "pattern" in hook.name else 1] == 4, "the hook must see every position"
            out = x.clone()
            out[:, 2:] = fn(x)[:, 2:]
            return out
        return hook

    cells = [
        Cell((("blocks.3.hook_resid_pre", from_two(lambda x: x + x[:, :1])),)),  # reads position 0
        Cell((("blocks.2.attn.hook_z", from_two(lambda x: 0 * x)),)),
        Cell((("blocks.1.attn.hook_pattern", lambda x, hook: torch.cat([x[:, :, :3], x[:, :, 3:].flip(-1)], 2)),)),
        Cell((("blocks.1.hook_mlp_out", lambda x, hook: x.clone()),)),  # changes nothing
    ]
    with torch.no_grad():
        values, _ = run_cells(model, corrupted, cells, metric, batch_size=4, verbose=False)
        for cell, value in zip(cells, values):
            torch.testing.assert_close(value, metric(model.run_with_hooks(corrupted, fwd_hooks=list(cell.hooks))), **TOL)


@pytest.mark.parametrize("batch_size", [1, 3, None, 1000])
def test_batch_sizes_agree(batch_size):
    """One run per pass, runs joining a pass at later layers, the default, everything in one pass."""
    model, corrupted, clean_cache, metric, _ = setup("huginn_like")
    expected = tl.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)
    got = lp.get_act_patch_attn_head_out_by_pos_batched(model, corrupted, clean_cache, metric, batch_size,
                                                         verbose=False)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("variant", ["huginn_like", "ouro_like"])
@pytest.mark.parametrize("name", ["get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_dest_src_pos"])
def test_runs_from_their_position_on(name, variant):
    """Five positions: passes that start at a later position (the keys and values before it are
    the corrupted run's, RoPE at the right positions), mixed positions within a pass."""
    reference, batched = SWEEPS[name]
    model, corrupted, clean_cache, metric, _ = setup(variant, n_pos=5)
    expected = reference(model, corrupted, clean_cache, metric)
    for batch_size in (1, 7):
        got = batched(model, corrupted, clean_cache, metric, batch_size, verbose=False)
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loop_sweeps_equal_their_twins(variant):
    """The cycle sweep (a layer patched at every step in one run) and the state sweep."""
    model, corrupted, clean_cache, metric, _ = setup(variant)
    for activation, axes in [("resid_pre", ("layer_in_cycle", "pos")), ("z", ("layer_in_cycle", "head"))]:
        expected = lp.get_act_patch_cycle(model, corrupted, clean_cache, metric, activation, index_axis_names=axes)
        got = lp.get_act_patch_cycle_batched(model, corrupted, clean_cache, metric, activation,
                                             index_axis_names=axes, batch_size=3, verbose=False)
        torch.testing.assert_close(got, expected, **TOL)
    wheres = ["state_in", "state_out"] + (["injected"] if model.cfg.injection != "none" else [])
    for where in wheres:
        expected = lp.get_act_patch_state(model, corrupted, clean_cache, metric, where)
        got = lp.get_act_patch_state_batched(model, corrupted, clean_cache, metric, where, batch_size=3, verbose=False)
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("variant", ["ouro_like", "hrm_like"])
def test_generic_sweep_with_index_df(variant):
    """An index_df over (step, pos, head) of one layer of the cycle; rows in a shuffled order."""
    model, corrupted, clean_cache, metric, _ = setup(variant)
    df = lp.cycle_index_df(model, layer_in_cycle=1, n_pos=2, n_heads=model.cfg.n_heads)
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    args = (model, corrupted, clean_cache, metric, tl.layer_pos_head_vector_patch_setter, "z")
    expected, expected_df = tl.generic_activation_patch(*args, index_df=df, return_index_df=True)
    got, got_df = lp.generic_activation_patch_batched(*args, index_df=df, return_index_df=True, batch_size=7,
                                                      verbose=False)
    assert got.shape == (len(df),) and got_df.equals(expected_df)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.skipif(TL_MAJOR < 4, reason=f"PatchingResult (reduce=, baseline=, metric mappings) is TransformerLens 4.x; installed {TL_VERSION}")
def test_per_example_baseline_and_several_metrics():
    """reduce='none' / 'mean', baseline=True and a mapping of metrics: TransformerLens's PatchingResult."""
    model, corrupted, clean_cache, metric, per_example = setup("olmo_retro_like")
    metrics = {"diff": per_example, "top": lambda logits: logits[:, -1].max(-1).values}
    for kwargs in [dict(reduce="none", baseline=True), dict(reduce="mean")]:
        for fn in ("get_act_patch_attn_out", "get_act_patch_block_every"):
            reference, batched = SWEEPS[fn]
            expected = reference(model, corrupted, clean_cache, metrics, **kwargs)
            got = batched(model, corrupted, clean_cache, metrics, 4, verbose=False, **kwargs)
            assert isinstance(got, tl.PatchingResult)
            assert got.metric_names == expected.metric_names and got.axis_names == expected.axis_names
            assert got.reduced == expected.reduced and got.patch_type_names == expected.patch_type_names
            torch.testing.assert_close(got.values, expected.values, **TOL)
            if expected.baseline is not None:
                torch.testing.assert_close(got.baseline, expected.baseline, **TOL)
    expected = tl.get_act_patch_resid_pre(model, corrupted, clean_cache, per_example, reduce="none", baseline=True)
    got = lp.get_act_patch_resid_pre_batched(model, corrupted, clean_cache, per_example, reduce="none", baseline=True,
                                             verbose=False)
    torch.testing.assert_close(got.effect(), expected.effect(), **TOL)


def test_engine_runs_each_cell_as_run_with_hooks():
    """Cells with hooks at several depths (a block, the loop state, the final norm)."""
    model, corrupted, clean_cache, metric, _ = setup("prelude_coda_add")

    def scale(factor):
        return lambda x, hook: x * factor

    cells = [
        Cell((("loops.1.hook_state_in", scale(0.5)), ("blocks.4.hook_mlp_out", scale(2.0)))),
        Cell((("blocks.0.hook_resid_pre", scale(1.5)),)),
        Cell((("ln_final.hook_normalized", scale(-1.0)),)),
        Cell((("blocks.3.attn.hook_pattern", lambda x, hook: torch.ones_like(x) / x.shape[-1]),)),
    ]
    with torch.no_grad():
        values, logits = run_cells(model, corrupted, cells, metric, batch_size=3, verbose=False)
        torch.testing.assert_close(logits, model(corrupted), **TOL)
        for cell, value in zip(cells, values):
            torch.testing.assert_close(value, metric(model.run_with_hooks(corrupted, fwd_hooks=list(cell.hooks))), **TOL)


def test_default_batch_size_follows_memory():
    model, *_ = setup("plain")
    short = default_batch_size(model, batch=1, n_pos=8, materialised=False)
    assert short == 2048 // 8  # the CPU cap
    assert default_batch_size(model, batch=2, n_pos=512, materialised=True) < short


def test_refusals():
    model, corrupted, clean_cache, metric, per_example = setup("plain")
    sweep = lp.get_act_patch_attn_head_out_by_pos_batched
    with pytest.raises(InputError, match="must return a scalar"):
        sweep(model, corrupted, clean_cache, per_example, verbose=False)
    per_example_refusal = r"must return a \[batch\] tensor" if TL_MAJOR >= 4 else r"need transformer-lens >= 4\.0"
    with pytest.raises(InputError, match=per_example_refusal):
        sweep(model, corrupted, clean_cache, metric, reduce="none", verbose=False)
    with pytest.raises(InputError, match="reduce must be"):
        sweep(model, corrupted, clean_cache, metric, reduce="sum", verbose=False)
    with pytest.raises(InputError, match="same length"):
        sweep(model, corrupted[:, :-1], clean_cache, metric, verbose=False)
    with pytest.raises(InputError, match="batch_size"):
        sweep(model, corrupted, clean_cache, metric, 0, verbose=False)
    with pytest.raises(InputError, match="unknown activation 'attn.hook_zz'"):
        lp.generic_activation_patch_batched(model, corrupted, clean_cache, metric, tl.layer_pos_patch_setter,
                                            "attn.hook_zz", ("layer", "pos"), verbose=False)
    _, partial = model.run_with_cache(corrupted, names_filter=lambda n: n.endswith("resid_post"))
    with pytest.raises(InputError, match="has no activation"):
        sweep(model, corrupted, partial, metric, verbose=False)
    model.add_hook("blocks.0.hook_resid_post", lambda x, hook: None)
    try:
        with pytest.raises(InputError, match="hooks attached"):
            sweep(model, corrupted, clean_cache, metric, verbose=False)
    finally:
        model.reset_hooks()
