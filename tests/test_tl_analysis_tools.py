"""TransformerLens 4.3's ``transformer_lens.tools.analysis`` on looped models.

Each tool runs on a random looped model and on the embedded model, and its result is compared
with the same quantity computed through tl-loop's own hooks, cache and read-outs, so a tool that
misread the unrolled layout (a step for another, a norm skipped) fails here. Tools whose
sum-of-writers assumption a looped layout breaks are refused (``tl_loop.tl_tools``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from tl_loop import HookedLoopedTransformer, UnsupportedError
from tl_loop import tl_tools
from tl_loop._tl_compat import needs_tl4_analysis
from tl_loop.pretrained import task_for
from tl_loop.readout import step_states

_skip = needs_tl4_analysis("logit_lens, interchange and sparse_probing")
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")
if _skip is None:
    from transformer_lens.tools import analysis as TA
    from transformer_lens.tools.analysis import EdgeAttributionConfig, Node

A, B = 3, 5


@pytest.fixture(scope="module")
def embedded() -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained("tl-loop/varbind-looped").eval()


@pytest.fixture(scope="module")
def problems(embedded):
    """Held-out 2-hop prompts, their answers and a distractor (a digit of another chain)."""
    task = task_for(embedded)
    probs = task.dataset(2, 8, split="test", seed=1)
    tokens = embedded.to_tokens([p.prompt for p in probs])
    answers = torch.tensor([embedded.to_single_token(p.answer) for p in probs])
    return tokens, answers


def embedded_pair(problems):
    """A clean prompt and the same prompt with the query variable changed (a corrupted answer)."""
    tokens, answers = problems
    clean = tokens[:1]
    corrupt = tokens[1:2]
    return clean, corrupt, int(answers[0]), int(answers[1])


def models(embedded):
    return {"random huginn_like": make_model("huginn_like").eval(), "random plain": make_model("plain").eval(),
            "embedded": embedded}


# ---------------------------------------------------------------- node attribution patching
def hand_node_scores(model, clean, corrupt, metric) -> dict:
    """(a_clean - a_corrupt) . d metric / d a_corrupt at every node's hook, through run_with_hooks."""
    names = ["hook_embed"] + [f"blocks.{i}.{h}" for i in range(model.cfg.n_layers) for h in ("attn.hook_z", "hook_mlp_out")]
    _, clean_cache = model.run_with_cache(clean, names_filter=names)
    acts = {}

    def keep(x, hook):
        x.retain_grad()
        acts[hook.name] = x
        return x

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupt, fwd_hooks=[(n, keep) for n in names])
        metric(logits).backward()
    scores = {}
    for name, a in acts.items():
        contribution = (clean_cache[name] - a.detach()) * a.grad
        if name.endswith("hook_z"):
            layer = int(name.split(".")[1])
            for p in range(clean.shape[1]):
                for h in range(model.cfg.n_heads):
                    scores[Node("attn_head_out", p, layer, h)] = float(contribution[0, p, h].sum())
        else:
            for p in range(clean.shape[1]):
                node = Node("embed", p) if name == "hook_embed" else Node("mlp_out", p, int(name.split(".")[1]))
                scores[node] = float(contribution[0, p].sum())
    return scores


@pytest.mark.parametrize("which", ["random huginn_like", "embedded"])
def test_node_attribution_is_gradient_times_difference(which, embedded, problems):
    model = models(embedded)[which]
    if which == "embedded":
        clean, corrupt, a, b = embedded_pair(problems)
    else:
        gen = torch.Generator().manual_seed(0)
        clean = torch.randint(0, 61, (1, 6), generator=gen)
        corrupt = clean.clone()
        corrupt[0, 0] = (clean[0, 0] + 17) % 61
        a, b = A, B

    def metric(logits):
        return logits[0, -1, a] - logits[0, -1, b]

    result = tl_tools.attribution_patch(model, clean, corrupt, metric)
    expected = hand_node_scores(model, clean, corrupt, metric)
    assert set(result.node_scores) == set(expected)
    for node, value in expected.items():
        assert result.node_scores[node] == pytest.approx(value, rel=1e-4, abs=1e-5), node
    # Every step's heads are scored, and their labels say which step and layer of the cycle.
    by_step = tl_tools.node_scores_by_step(model, result, "attn_head_out", position=-1)
    sched = model.schedule
    assert by_step.shape == (sched.n_steps, sched.layers_per_step, model.cfg.n_heads)
    last = clean.shape[1] - 1
    for r in range(sched.n_steps):
        for j in range(sched.layers_per_step):
            i = sched.index(r, j)
            assert by_step[r, j, 1] == pytest.approx(expected[Node("attn_head_out", last, i, 1)], rel=1e-4, abs=1e-5)
            assert tl_tools.loop_label(model, Node("attn_head_out", last, i, 1)) == f"core.{r}.{j}.H1 attn_head_out@{last}"


@pytest.mark.parametrize("which", ["random huginn_like", "embedded"])
def test_edge_tools_refuse_layouts_that_are_not_a_sum_of_writers(which, embedded, problems):
    model = models(embedded)[which]
    reason = tl_tools.additive_residual_obstruction(model)
    assert reason is not None and ("injected" in reason and "normalised" in reason)
    tokens = problems[0][:1] if which == "embedded" else torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(UnsupportedError, match="sum of the writers"):
        tl_tools.attribution_patch(model, tokens, tokens, lambda x: x[0, -1, 0], EdgeAttributionConfig("edge"))
    with pytest.raises(UnsupportedError, match="sum of the writers"):
        tl_tools.faithfulness(model, tokens, tokens, lambda x: x[0, -1, 0], [])
    with pytest.raises(UnsupportedError, match="sum of the writers"):
        tl_tools.get_act_patch_direct_path(model, tokens, None, None, lambda x: x, 0, 0)
    assert tl_tools.additive_residual_obstruction(make_model("plain")) is None


def test_edge_attribution_on_a_layout_that_is_a_sum_of_writers():
    """On a plain loop (no norm between steps, no injection) edges are exact: an edge score is the
    writer's clean - corrupt output at the reader's gradient, edges add up to node scores, and
    faithfulness of the empty circuit is the corrupted run (0 recovered)."""
    model = make_model("plain").eval()
    clean = torch.arange(1, 7)[None]
    corrupt = clean.clone()
    corrupt[0, 0] = 40

    def metric(logits):
        return logits[0, -1, A] - logits[0, -1, B]

    edges = tl_tools.attribution_patch(model, clean, corrupt, metric, EdgeAttributionConfig("edge"))
    nodes = tl_tools.attribution_patch(model, clean, corrupt, metric)
    for node, value in nodes.node_scores.items():
        assert edges.node_scores[node] == pytest.approx(value, rel=1e-4, abs=1e-6), node
    # One edge by hand: the MLP of step 0 into the MLP of step 2 (same physical weights), last position.
    sched, p = model.schedule, clean.shape[1] - 1
    i, k = sched.index(0, 1), sched.index(2, 1)
    writer, reader = f"blocks.{i}.hook_mlp_out", f"blocks.{k}.hook_mlp_in"
    model.set_use_hook_mlp_in(True)
    try:
        _, clean_cache = model.run_with_cache(clean, names_filter=writer)
        acts = {}

        def keep(x, hook):  # a copy: the hook point's input also feeds the residual skip
            x = x.clone()
            x.retain_grad()
            acts[hook.name] = x
            return x

        with torch.enable_grad():
            metric(model.run_with_hooks(corrupt, fwd_hooks=[(writer, keep), (reader, keep)])).backward()
    finally:
        model.set_use_hook_mlp_in(False)
    expected = float(((clean_cache[writer] - acts[writer].detach())[0, p] * acts[reader].grad[0, p]).sum())
    assert edges.edge_scores[(Node("mlp_out", p, i), Node("mlp_in", p, k))] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert tl_tools.faithfulness(model, clean, corrupt, metric, []).recovered == pytest.approx(0.0, abs=1e-5)


def test_why_faithfulness_is_refused_on_looped_norms():
    """Unchecked, TransformerLens's faithfulness of the *empty* circuit on a Huginn-like layout is
    not the corrupted run: its sum-of-writers rebuild is not the model."""
    model = make_model("huginn_like").eval()
    clean = torch.arange(1, 7)[None]
    corrupt = clean.clone()
    corrupt[0, 0] = 40
    unchecked = TA.faithfulness(model, clean, corrupt, lambda x: x[0, -1, A] - x[0, -1, B], [])
    assert abs(unchecked.recovered) > 0.1


# ---------------------------------------------------------------- direct logit attribution
@pytest.mark.parametrize("which", ["random huginn_like", "embedded"])
def test_direct_logit_attribution_sums_to_the_logit_difference(which, embedded, problems):
    model = models(embedded)[which]
    if which == "embedded":
        tokens, answers = problems
        tokens, a, b = tokens[:1], int(answers[0]), int(answers[1])
    else:
        tokens, a, b = torch.arange(1, 8)[None], A, B
    logits, cache = model.run_with_cache(tokens)
    diff = logits[0, -1, a] - logits[0, -1, b]
    n = model.cfg.n_layers
    every = {
        "component": [f"{i}_{c}" for i in range(n) for c in ("attn_out", "mlp_out")],
        "head": [f"L{i}H{h}" for i in range(n) for h in range(model.cfg.n_heads)],
    }
    for unit, labels in every.items():  # every step's components, plus embed / init_state / remainder
        dla = TA.direct_logit_attribution(model, tokens, a, b, unit=unit)
        assert set(labels) <= set(dla.labels) and len(dla.labels) <= len(labels) + 2, unit
        torch.testing.assert_close(dla.attribution.sum(0)[0], diff, rtol=1e-4, atol=1e-4)
    # Layer units: the stream entering and halfway through each effective layer, read with the
    # final norm's cached scale (as cache.logit_attrs does); the last one is the whole difference.
    layer = TA.direct_logit_attribution(model, tokens, a, b, unit="layer")
    assert len(layer.labels) == 2 * n + 1
    torch.testing.assert_close(layer.attribution[-1, 0], diff, rtol=1e-4, atol=1e-4)
    assert tl_tools.loop_label(model, layer.labels[2 * model.schedule.index(0, 0)]) == "core.0.0_pre"


# ---------------------------------------------------------------- logit lens
@pytest.mark.parametrize("which", ["huginn_like", "embedded"])
def test_logit_lens_reads_every_step_through_the_looped_norms(which, embedded, problems):
    model = embedded if which == "embedded" else make_model(which).eval()
    tokens = problems[0][:2] if which == "embedded" else torch.arange(1, 8)[None]
    logits, cache = model.run_with_cache(tokens)
    lens = TA.logit_lens(model, tokens, positions=-1, targets=[A, B])
    assert len(lens.labels) == model.cfg.n_layers + 1
    acc = cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    expected = (acc @ model.W_U)[..., [A, B]]
    torch.testing.assert_close(lens.values.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lens.values.reshape(expected.shape)[-1], logits[:, -1, [A, B]], rtol=1e-4, atol=1e-4)


def test_logit_lens_refuses_a_norm_between_the_last_block_and_ln_final():
    """With a norm after the loop and no coda, ln_final does not read the last block's output:
    TransformerLens checks that and refuses (cache.accumulated_resid reads the right stream)."""
    model = make_model("plain", norm_after_loop=True).eval()
    with pytest.raises(ValueError, match="does not reproduce"):
        TA.logit_lens(model, torch.arange(1, 8)[None])


def test_logit_readout_equals_the_per_step_read_out_where_they_coincide():
    """Without a coda or a norm after the loop, leaving the loop after step r is ln_final and the
    unembedding of the step's state: ``logit_readout`` of the states is ``model.step_logits``."""
    model = make_model("plain").eval()
    tokens = torch.arange(1, 8)[None]
    states = step_states(model, tokens)
    readout = TA.logit_readout(model, states)
    torch.testing.assert_close(readout.values, model.step_logits(tokens), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- interchange interventions
def test_full_rank_interchange_is_the_activation_patch_of_that_step(embedded, problems):
    tokens, answers = problems
    base, source = tokens[:4], tokens[4:]
    sched = embedded.schedule
    hook = f"blocks.{sched.index(step=2, layer_in_cycle=0)}.hook_resid_post"
    classes = answers.unique()

    def task_logits(x):
        return embedded(x)[:, -1, classes]

    last = torch.full((4,), tokens.shape[1] - 1)
    src_acts = TA.collect_activations(embedded, hook, source, task_logits, positions=last)
    _, src_cache = embedded.run_with_cache(source, names_filter=hook)
    torch.testing.assert_close(src_acts, src_cache[hook][:, -1])
    full = TA.SubspaceInterchange(torch.eye(embedded.cfg.d_model))
    out = TA.intervened_logits(embedded, hook, full, base, src_acts, task_logits, positions=last)

    def patch(x, hook):
        x = x.clone()
        x[:, -1] = src_cache[hook.name][:, -1]
        return x

    expected = embedded.run_with_hooks(base, fwd_hooks=[(hook, patch)])[:, -1, classes]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_fit_das_on_the_embedded_task(embedded):
    """DAS learns a rank-1 subspace at one step of the loop on the variable-binding task."""
    task = task_for(embedded)
    probs = task.dataset(1, 32, split="train", seed=3)
    tokens = embedded.to_tokens([p.prompt for p in probs])
    answers = torch.tensor([embedded.to_single_token(p.answer) for p in probs])
    classes, targets = answers.unique(return_inverse=True)
    last = torch.full((len(probs),), tokens.shape[1] - 1)
    perm = torch.roll(torch.arange(len(probs)), 1)  # each base takes the next prompt's answer
    hook = f"blocks.{embedded.schedule.index(step=0, layer_in_cycle=0)}.hook_resid_post"
    result = TA.fit_das(
        embedded, hook, tokens, tokens[perm], targets[perm], lambda x: embedded(x)[:, -1, classes],
        rank=1, epochs=3, batch_size=32, seed=0, base_positions=last, source_positions=last,
    )
    assert result.hook_name == hook and result.basis.shape == (embedded.cfg.d_model, 1)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


# ---------------------------------------------------------------- projection kernel, probing, Bridge-only tools
def test_projection_kernel_sees_one_head_at_every_step(embedded):
    """The same physical head runs at every step: its OV subspace overlaps itself fully across
    steps (rank), and the kernel between two different heads is smaller."""
    sched = embedded.schedule
    i, k = sched.index(0, 0), sched.index(5, 0)
    ov = lambda layer, h: TA.orthonormal_subspace((embedded.W_V[layer, h] @ embedded.W_O[layer, h]).detach(), rank=4)
    same = TA.projection_kernel(ov(i, 0), ov(k, 0))
    assert same.score == pytest.approx(4.0, rel=1e-4)
    other = TA.projection_kernel(ov(i, 0), ov(k, 1))
    assert other.score < 3.9


def test_sparse_probe_on_per_step_states(embedded):
    """A k-sparse probe per step on the residual state (``cache.stack_loop``)."""
    task = task_for(embedded)
    probs = task.dataset(1, 48, split="test", seed=5) + task.dataset(1, 48, split="train", seed=5)
    tokens = embedded.to_tokens([p.prompt for p in probs])
    labels = torch.tensor([int(p.answer) % 2 for p in probs])
    _, cache = embedded.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    per_step = cache.stack_loop("resid_post")[:, 0, :, -1]  # [step, batch, d_model]
    sched = embedded.schedule
    for r in (0, sched.n_steps - 1):  # the features of step r are that step's state
        torch.testing.assert_close(per_step[r], cache[f"blocks.{sched.index(r, 0)}.hook_resid_post"][:, -1])
        probe = TA.fit_sparse_probe(per_step[r], labels, k=4, seed=0)
        assert len(probe.selected_features) == 4 and max(probe.selected_features) < embedded.cfg.d_model


@pytest.mark.parametrize("tool", ["jacobian_lens", "head_affinity"])
def test_bridge_only_tools_refuse_with_a_reason(tool, embedded):
    with pytest.raises((TypeError, ValueError), match="TransformerBridge"):
        if tool == "jacobian_lens":
            TA.JacobianLens.fit(embedded, ["a"], corpus="x", show_progress=False)
        else:
            TA.attention_head_subspace_affinity(embedded, source_role="O", target_role="V")
