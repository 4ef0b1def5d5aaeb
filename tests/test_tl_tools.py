"""TransformerLens's own tools on looped models: patching sweeps, logit lens, attribution.

The sweeps of ``transformer_lens.patching`` are compared with the same patches written by hand
(hook names spelled out from the layout, run with ``run_with_hooks``). The attribution checks
are completeness identities: the rows of ``decompose_resid`` / ``stack_head_results`` must add
up to the residual stream they decompose, and their logit attributions to the logit difference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, make_model
from transformer_lens import patching

#: Layouts the costlier sweeps (per head, every block activation) run on: prelude/coda + additive injection; Huginn's
#: adapter, random initial state and sandwich norms; Ouro's output norms, norm between steps
#: and GQA; HRM's inner cycles.
SWEEP_VARIANTS = ["prelude_coda_add", "huginn_like", "ouro_like", "hrm_like"]

#: Extra layouts for the read-out checks: the norm after the loop is the last thing before
#: ln_final (no coda), so the last block's hook_resid_post is *not* what ln_final reads.
EXTRA_LAYOUTS = {
    "plain+norm_after_loop": ("plain", {"norm_after_loop": True}),
    "huginn_like-no_coda": ("huginn_like", {"n_coda_layers": 0}),
}
READOUT_CASES = {**{v: (v, {}) for v in VARIANTS}, **EXTRA_LAYOUTS}

A, B = 3, 5  # the two tokens of the logit-difference metric


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, A] - logits[:, -1, B]).mean()


def token_pair(n_pos: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 61, (2, n_pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 0] = (clean[:, 0] + 17) % 61  # corrupt the first token: every later position sees it
    return clean, corrupted


def hand_patched_metrics(model, corrupted, clean_cache, cells, metric) -> torch.Tensor:
    """The metric for each cell, patched by hand in one batched ``run_with_hooks``.

    ``cells[k]`` is a list of ``(hook_name, setter)``; ``setter(activation, clean)`` edits the
    ``[B, ...]`` activation of the corrupted prompts in place. Cell ``k`` runs on batch rows
    ``k*B .. (k+1)*B`` of one forward pass, so every cell is an independent patched run.
    """
    n_batch, k_cells = corrupted.shape[0], len(cells)
    by_name: dict[str, list] = {}
    for k, cell in enumerate(cells):
        for name, setter in cell:
            by_name.setdefault(name, []).append((k, setter))

    def make_hook(entries):
        def hook(activation, hook):
            activation = activation.clone()
            clean = clean_cache[hook.name]
            for k, setter in entries:
                setter(activation[k * n_batch : (k + 1) * n_batch], clean)
            return activation

        return hook

    kwargs = {}
    if model.cfg.state_init == "random":  # the batched run must start from the same random state
        _, corr_cache = model.run_with_cache(corrupted, names_filter="loops.0.hook_state_in")
        kwargs["init_state"] = corr_cache["loops.0.hook_state_in"].repeat(k_cells, 1, 1)
    logits = model.run_with_hooks(
        corrupted.repeat(k_cells, 1), fwd_hooks=[(n, make_hook(e)) for n, e in by_name.items()], **kwargs
    )
    return torch.stack([metric(logits[k * n_batch : (k + 1) * n_batch]) for k in range(k_cells)])


def at_pos(p):
    def setter(act, clean):
        act[:, p] = clean[:, p]

    return setter


def at_head(h):
    def setter(act, clean):
        act[:, :, h] = clean[:, :, h]

    return setter


def assert_matches(tl_result, hand, baseline):
    scale = max(hand.abs().max().item(), 1.0)
    torch.testing.assert_close(tl_result, hand, rtol=1e-4, atol=1e-4 * scale)
    # The sweep must actually move the metric somewhere, or the comparison proves nothing.
    assert (hand - baseline).abs().max() > 1e-3 * scale


def sweep_setup(variant):
    model = make_model(variant, n_steps=2)
    clean, corrupted = token_pair(3)
    _, clean_cache = model.run_with_cache(clean)
    baseline = logit_diff(model(corrupted))
    return model, clean, corrupted, clean_cache, baseline


# ------------------------------------------------------------------ transformer_lens.patching
def test_get_act_patch_resid_pre_over_effective_depth(variant):
    model, clean, corrupted, clean_cache, baseline = sweep_setup(variant)
    n_layers, n_pos = model.cfg.n_layers, corrupted.shape[1]
    assert n_layers == model.cfg.n_prelude_layers + 2 * model.cfg.layers_per_step + model.cfg.n_coda_layers
    result = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit_diff)
    assert result.shape == (n_layers, n_pos)
    cells = [[(f"blocks.{layer}.hook_resid_pre", at_pos(p))] for layer in range(n_layers) for p in range(n_pos)]
    hand = hand_patched_metrics(model, corrupted, clean_cache, cells, logit_diff).reshape(n_layers, n_pos)
    assert_matches(result, hand, baseline)
    # Position 0 holds the corruption. Where layer 0 reads the whole input (a prelude, or a loop
    # with nothing injected), restoring it there restores the clean run.
    cfg = model.cfg
    if cfg.n_prelude_layers or (cfg.injection == "none" and not cfg.inner_cycles):
        torch.testing.assert_close(result[0, 0], logit_diff(model(clean)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", SWEEP_VARIANTS)
def test_get_act_patch_attn_head_out_all_pos_over_effective_depth(variant):
    model, _, corrupted, clean_cache, baseline = sweep_setup(variant)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    result = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, logit_diff)
    assert result.shape == (n_layers, n_heads)
    cells = [[(f"blocks.{layer}.attn.hook_z", at_head(h))] for layer in range(n_layers) for h in range(n_heads)]
    hand = hand_patched_metrics(model, corrupted, clean_cache, cells, logit_diff).reshape(n_layers, n_heads)
    assert_matches(result, hand, baseline)


@pytest.mark.parametrize("variant", ["huginn_like", "ouro_like", "layernorm_plain_mlp"])
def test_get_act_patch_block_every_over_effective_depth(variant):
    model, _, corrupted, clean_cache, baseline = sweep_setup(variant)
    n_layers, n_pos = model.cfg.n_layers, corrupted.shape[1]
    result = patching.get_act_patch_block_every(model, corrupted, clean_cache, logit_diff)
    assert result.shape == (3, n_layers, n_pos)
    cells = [
        [(f"blocks.{layer}.hook_{act}", at_pos(p))]
        for act in ("resid_pre", "attn_out", "mlp_out")
        for layer in range(n_layers)
        for p in range(n_pos)
    ]
    hand = hand_patched_metrics(model, corrupted, clean_cache, cells, logit_diff).reshape(3, n_layers, n_pos)
    assert_matches(result, hand, baseline)


# ------------------------------------------------------------------ logit lens
def readout_model(case: str):
    variant, overrides = READOUT_CASES[case]
    return make_model(variant, **overrides)


@pytest.fixture(params=list(READOUT_CASES))
def readout_case(request) -> str:
    return request.param


def test_logit_lens_has_one_entry_per_effective_layer(readout_case, tokens):
    model = readout_model(readout_case)
    logits, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    lens, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert lens.shape == (n + 1, *tokens.shape, model.cfg.d_model)
    assert labels == [f"{i}_pre" for i in range(n)] + ["final_post"]
    torch.testing.assert_close(model.unembed_residual(lens[-1]), logits, rtol=1e-5, atol=1e-4)

    lens_mid, labels_mid = cache.accumulated_resid(apply_ln=True, incl_mid=True, return_labels=True)
    assert lens_mid.shape[0] == 2 * n + 1
    assert labels_mid[:4] == ["0_pre", "0_mid", "1_pre", "1_mid"] and labels_mid[-1] == "final_post"
    torch.testing.assert_close(model.unembed_residual(lens_mid[-1]), logits, rtol=1e-5, atol=1e-4)

    raw = cache.accumulated_resid(incl_mid=True)
    for i in range(n):
        torch.testing.assert_close(raw[2 * i], cache[f"blocks.{i}.hook_resid_pre"], rtol=0, atol=0)
        torch.testing.assert_close(raw[2 * i + 1], cache[f"blocks.{i}.hook_resid_mid"], rtol=0, atol=0)
    # The final entry is the stream ln_final reads (also where a norm follows the last block).
    torch.testing.assert_close(model.ln_final(raw[-1]), cache["ln_final.hook_normalized"], rtol=1e-5, atol=1e-5)
    # TransformerLens's one-call logit lens (last position by default) agrees.
    readout = cache.logit_lens(return_type="logits")
    assert readout.labels == labels
    torch.testing.assert_close(readout.values[-1], logits[:, -1], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ attribution
def logit_diff_constant(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What no residual component explains: the unembedding bias and, for LayerNorm with a bias,
    ln_final's bias read through W_U (TransformerLens folds it into b_U with fold_ln)."""
    const = model.b_U[a] - model.b_U[b]
    if model.final_norm is not None and model.final_norm.b is not None:
        const = const + (model.W_U.T[a] - model.W_U.T[b]) @ model.final_norm.b
    return const


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_attributions_sum_to_the_logit_difference(readout_case):
    model = readout_model(readout_case)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 61, (2, 5), generator=gen)
    a = torch.randint(0, 61, (2, 5), generator=gen)  # a (correct, incorrect) token pair per
    b = (a + 1 + torch.randint(0, 59, (2, 5), generator=gen)) % 61  # example and position
    logits, cache = model.run_with_cache(tokens)
    target = logits.gather(-1, a[..., None])[..., 0] - logits.gather(-1, b[..., None])[..., 0]
    const = logit_diff_constant(model, a, b)

    stack, labels = cache.decompose_resid(return_labels=True)
    attrs = cache.logit_attrs(stack, tokens=a, incorrect_tokens=b)
    assert attrs.shape == (len(labels), 2, 5)
    assert relative_error(attrs.sum(0) + const, target) < 1e-4

    heads, head_labels = cache.stack_head_results(incl_remainder=True, return_labels=True)
    assert head_labels[: model.cfg.n_heads] == [f"L0H{h}" for h in range(model.cfg.n_heads)]
    assert len(head_labels) == model.cfg.n_layers * model.cfg.n_heads + 1 and head_labels[-1] == "remainder"
    attrs = cache.logit_attrs(heads, tokens=a, incorrect_tokens=b)
    assert relative_error(attrs.sum(0) + const, target) < 1e-4

    # Last position only (pos_slice), one target pair per example.
    stack = cache.decompose_resid(pos_slice=-1)
    attrs = cache.logit_attrs(stack, tokens=a[:, -1], incorrect_tokens=b[:, -1], pos_slice=-1)
    assert attrs.shape == (len(labels), 2)
    assert relative_error(attrs.sum(0) + const[:, -1], target[:, -1]) < 1e-4


def test_decomposition_at_every_layer_sums_to_the_stream(readout_case, tokens):
    model = readout_model(readout_case)
    _, cache = model.run_with_cache(tokens)

    def close(stack, want):
        assert ((stack.sum(0) - want).norm() / want.norm()).item() < 1e-4

    for layer in range(model.cfg.n_layers):
        close(cache.decompose_resid(layer=layer), cache[f"blocks.{layer}.hook_resid_pre"])
        close(cache.decompose_resid(layer=layer, mlp_input=True), cache[f"blocks.{layer}.hook_resid_mid"])
        close(cache.stack_head_results(layer=layer, incl_remainder=True), cache[f"blocks.{layer}.hook_resid_pre"])
    close(cache.decompose_resid(), cache.accumulated_resid()[-1])


@pytest.mark.parametrize("variant", ["plain", "prelude_coda_add"])
def test_decomposition_rows_are_the_components_where_the_stream_is_a_plain_sum(variant, tokens):
    # No norm on the stream and no adapter: every row is a cached component times the number of
    # times it enters the stream. prelude_coda_add starts the state from the prelude output and
    # adds that output again at every step, so prelude components (and the embedding) count
    # n_steps + 1 times by the time the coda reads the state.
    model = make_model(variant)
    _, cache = model.run_with_cache(tokens)
    layer = model.cfg.n_layers - 1
    stack, labels = cache.decompose_resid(layer=layer, return_labels=True)
    assert labels == ["embed"] + [f"{i}_{kind}_out" for i in range(layer) for kind in ("attn", "mlp")]
    rows = dict(zip(labels, stack))
    repeated = model.cfg.n_steps + 1 if model.cfg.injection == "add" else 1

    def copies(i):
        return repeated if model.schedule[i].stage == "prelude" else 1

    torch.testing.assert_close(rows["embed"], repeated * cache["hook_embed"])
    for i in range(layer):
        torch.testing.assert_close(rows[f"{i}_attn_out"], copies(i) * cache[f"blocks.{i}.hook_attn_out"])
        torch.testing.assert_close(rows[f"{i}_mlp_out"], copies(i) * cache[f"blocks.{i}.hook_mlp_out"])
    heads = cache.stack_head_results(layer=layer)
    per_layer = heads.reshape(layer, model.cfg.n_heads, *heads.shape[1:]).sum(1)
    for i in range(layer):
        torch.testing.assert_close(per_layer[i], copies(i) * cache[f"blocks.{i}.hook_attn_out"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ caches bound to their depth
def test_run_with_cache_n_steps_binds_the_cache_to_that_depth():
    model = make_model("plain", n_core_layers=1, n_steps=2)
    clean, corrupted = token_pair(2)
    logits5, cache5 = model.run_with_cache(clean, n_steps=5)
    assert model.cfg.n_steps == 2 and model.cfg.n_layers == 2  # the default came back
    model.set_n_steps(3)  # ... and moves on; the cache must not follow
    assert cache5.model.cfg.n_layers == 5 and cache5.model.n_steps == 5
    torch.testing.assert_close(logits5, model(clean, n_steps=5))

    lens = cache5.accumulated_resid(apply_ln=True)
    assert lens.shape[0] == 6
    torch.testing.assert_close(model.unembed_residual(lens[-1]), logits5, rtol=1e-5, atol=1e-4)
    assert relative_error(cache5.decompose_resid().sum(0), cache5.accumulated_resid()[-1]) < 1e-4
    assert cache5.stack_head_results().shape[0] == 5 * model.cfg.n_heads
    assert cache5.stack_loop("resid_post").shape == (5, 1, *clean.shape, model.cfg.d_model)

    # TransformerLens's sweep through the cache's bound model runs at the cache's depth.
    result = patching.get_act_patch_resid_pre(cache5.model, corrupted, cache5, logit_diff)
    assert result.shape == (5, 2)
    assert model.cfg.n_steps == 3
    cells = [[(f"blocks.{layer}.hook_resid_pre", at_pos(p))] for layer in range(5) for p in range(2)]
    with model.steps(5):
        hand = hand_patched_metrics(model, corrupted, cache5, cells, logit_diff).reshape(5, 2)
    assert_matches(result, hand, logit_diff(model(corrupted, n_steps=5)))


@pytest.mark.parametrize(
    "overrides", [{}, {"norm_after_loop": True}, {"state_init": "zeros"}], ids=["prelude_state", "norm_after_loop", "zero_state"]
)
def test_attribution_when_the_loop_runs_zero_steps(overrides, tokens):
    # At n_steps=0 the coda reads the initial state (after the norm that follows the loop).
    model = make_model("prelude_coda_add", **overrides)
    logits, cache = model.run_with_cache(tokens, n_steps=0)
    n = cache.model.cfg.n_layers
    assert n == 2
    for layer in range(n):
        want = cache[f"blocks.{layer}.hook_resid_pre"]
        got = cache.decompose_resid(layer=layer).sum(0)
        assert (got - want).norm() <= 1e-5 * max(want.norm().item(), 1.0)
    final = cache.accumulated_resid()[-1]
    assert (cache.decompose_resid().sum(0) - final).norm() <= 1e-5 * max(final.norm().item(), 1.0)
    torch.testing.assert_close(model.unembed_residual(cache.accumulated_resid(apply_ln=True)[-1]), logits)


def test_zero_steps_with_an_unrecorded_random_state_is_refused(tokens):
    from tl_loop.errors import UnsupportedError

    model = make_model("huginn_like")
    _, cache = model.run_with_cache(tokens, n_steps=0)
    cache.decompose_resid(layer=0, mlp_input=True)  # inside the prelude: fine
    with pytest.raises(UnsupportedError, match="n_steps=0"):
        cache.decompose_resid()
    # No coda and no norm after the loop: ln_final reads the unrecorded random state itself.
    _, cache = make_model("olmo_retro_like", n_coda_layers=0).run_with_cache(tokens, n_steps=0)
    with pytest.raises(UnsupportedError, match="n_steps=0"):
        cache.accumulated_resid()


# ------------------------------------------------------------------ full decompositions
def stream_into(cache, layer: int, mlp_input: bool) -> torch.Tensor:
    if layer == cache.model.cfg.n_layers:
        return cache.accumulated_resid()[-1]
    return cache[f"blocks.{layer}.hook_resid_mid" if mlp_input else f"blocks.{layer}.hook_resid_pre"]


@pytest.mark.parametrize("expand_neurons", [True, False], ids=["neurons", "mlp_layers"])
def test_full_resid_decomposition_sums_to_the_stream_in_every_layout(readout_case, tokens, expand_neurons):
    # Every injection (none / add / linear) x norm placement (pre, output, resid, between and
    # after steps) x inner cycles: no remainder row, so the rows must add up by themselves.
    model = readout_model(readout_case)
    _, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    for layer in sorted({1, n // 2, n - 1, n}):
        for mlp_input in (False, True) if layer < n else (False,):
            rows, labels = cache.get_full_resid_decomposition(
                layer, mlp_input=mlp_input, expand_neurons=expand_neurons, return_labels=True
            )
            want = stream_into(cache, layer, mlp_input)
            assert rows.shape[0] == len(labels) and labels[-1] == "bias"
            assert relative_error(rows.sum(0), want) < 1e-5, (layer, mlp_input)
    # TransformerLens's row order: heads, then neurons (or MLP layers), then embeddings, then bias.
    kinds = ["head" if "H" in l else "mlp" if ("N" in l or l.endswith("_mlp_out")) else l for l in labels]
    first = {k: kinds.index(k) for k in dict.fromkeys(kinds)}
    assert list(first) == sorted(first, key=first.get) and kinds[0] == "head"
    assert kinds.index("embed") > max(k for k, kind in enumerate(kinds) if kind in ("head", "mlp"))


def test_neuron_results_carry_each_mlp_write_through_what_follows(readout_case, tokens):
    # Neurons of layer i plus the biases make up that MLP's row of the exact layer decomposition:
    # swapping the MLP rows for the neuron rows (biases in the bias row) keeps the total.
    model = readout_model(readout_case)
    _, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    neurons, labels = cache.stack_neuron_results(n, return_labels=True)
    d_mlp = model.cfg.d_mlp
    assert labels[:d_mlp] == [f"L0N{k}" for k in range(d_mlp)] and len(labels) == n * d_mlp
    with_neurons, neuron_labels = cache.get_full_resid_decomposition(n, expand_neurons=True, return_labels=True)
    torch.testing.assert_close(with_neurons[neuron_labels.index("L0N0") : neuron_labels.index("L0N0") + len(labels)], neurons)
    # With a remainder the stack sums to the stream; a neuron slice keeps only those neurons.
    stack = cache.stack_neuron_results(n, incl_remainder=True)
    assert relative_error(stack.sum(0), stream_into(cache, n, False)) < 1e-5
    two, two_labels = cache.stack_neuron_results(n, neuron_slice=[0, 3], return_labels=True)
    assert two_labels[:2] == ["L0N0", "L0N3"] and len(two_labels) == 2 * n
    torch.testing.assert_close(two[1], neurons[3])


@pytest.mark.parametrize("variant", ["plain"])
def test_full_decomposition_equals_transformer_lens_where_the_stream_is_a_plain_sum(variant, tokens):
    from transformer_lens import ActivationCache

    model = make_model(variant, o_bias=True, mlp_bias=True, gated_mlp=False, act_fn="gelu")
    _, cache = model.run_with_cache(tokens)
    for layer, mlp_input in [(model.cfg.n_layers, False), (2, True)]:
        ours, labels = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, return_labels=True)
        theirs, tl_labels = ActivationCache.get_full_resid_decomposition(cache, layer, mlp_input=mlp_input, return_labels=True)
        assert labels == tl_labels
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        ours_n = cache.stack_neuron_results(layer, mlp_input=mlp_input)
        theirs_n = ActivationCache.stack_neuron_results(cache, layer, mlp_input=mlp_input)
        torch.testing.assert_close(ours_n, theirs_n, rtol=1e-5, atol=1e-5)
