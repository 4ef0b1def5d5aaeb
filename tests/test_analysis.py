"""Tests of tl_loop.analysis on constructed inputs with known answers, on models with known
dynamics (exact contractions, 2-cycles, cycles of distinct fixed points), streamed against
cached, and on a feedforward TransformerBridge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from analysis_helpers import linear_loop_model, tiny_gpt2_bridge
from conftest import VARIANTS, make_model

from tl_loop import analysis as A

TOKENS = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])


# ---------------------------------------------------------------- distances and convergence
def test_identical_states_have_zero_distance_in_every_metric():
    x = torch.randn(1, 3, 2, 4, 8).expand(5, 3, 2, 4, 8)
    for metric in ("l2", "relative"):
        assert torch.all(A.step_distances(x, metric) == 0)
        assert torch.all(A.distance_to_final(x, metric, per_token=True) == 0)
    assert A.step_distances(x, "cosine").max() < 1e-6  # 1 - cos: float rounding only
    assert A.distance_to_final(x, "cosine", per_token=True).max() < 1e-6


def test_distances_on_geometric_states():
    # x_r = 0.5**r * v: relative step distance ||x_r - x_{r-1}|| / ||x_{r-1}|| = 0.5 at every step,
    # l2 distance 0.5**r * ||v||, and the cosine distance 0 (same direction throughout).
    v = torch.randn(2, 3, 6)
    x = (0.5 ** torch.arange(6.0)).view(6, 1, 1, 1, 1) * v[None, None]  # [step, layer=1, b, p, d]
    torch.testing.assert_close(A.step_distances(x, "relative"), torch.full((5, 1), 0.5))
    expected_l2 = (0.5 ** torch.arange(1, 6.0))[:, None, None, None] * v.norm(dim=-1)  # [5, b, p]
    torch.testing.assert_close(A.step_distances(x, "l2", per_token=True)[:, 0], expected_l2[:, 0])
    assert A.step_distances(x, "cosine").abs().max() < 1e-6
    to_final = A.distance_to_final(x, "relative")
    torch.testing.assert_close(to_final[:, 0], 0.5 ** torch.arange(6.0) / 0.5**5 - 1)
    ref = torch.stack([v])  # reference [layer_in_cycle=1, b, p, d] = x_0
    torch.testing.assert_close(
        A.distance_to_reference(x, ref, "relative")[:, 0], 1 - 0.5 ** torch.arange(6.0)
    )


def test_convergence_step_is_the_first_step_after_which_changes_stay_small():
    d = torch.tensor([[0.5, 0.01], [0.01, 0.02], [0.3, 0.01], [0.02, 0.5], [0.01, 0.6]])
    assert A.convergence_step(d, tol=0.05).tolist() == [3, -1]
    assert A.convergence_step(torch.full((4,), 1e-4), tol=1e-3).item() == 0


def test_exact_contraction_converges_at_the_predicted_step():
    # One core layer computing x -> a (x + e): the state contracts to x* = a e / (1 - a) with
    # x_r - x* = -a^(r+1) x*, so the step change is a^(r+1) (1 - a) ||x*|| and the relative
    # distance to the fixed point is exactly a^(r+1).
    a, n_steps, tol = 0.5, 14, 1e-3
    model = linear_loop_model([(a, None)], n_steps=n_steps, injection="add", state_init="zeros")
    _, cache = model.run_with_cache(TOKENS)
    x_star = a * cache["hook_embed"] / (1 - a)  # [b, p, d]
    norm_star = x_star.norm(dim=-1)

    d = A.step_distances(cache, "l2", per_token=True)[:, 0]  # [step - 1, b, p]
    expected = torch.stack([a ** (k + 1) * (1 - a) * norm_star for k in range(n_steps - 1)])
    torch.testing.assert_close(d, expected, rtol=1e-4, atol=1e-6)  # float32 rounding of ||x|| ~ 3 states

    predicted = torch.tensor(
        [
            [next(k for k in range(n_steps - 1) if a ** (k + 1) * (1 - a) * float(n) <= tol) for n in row]
            for row in norm_star
        ]
    )
    steps = A.convergence_steps(cache, tol=tol, metric="l2", per_token=True)[0]
    assert torch.equal(steps, predicted)
    assert A.convergence_steps(cache, tol=1e-9, metric="l2").tolist() == [-1]  # not within the run

    dist = A.distance_to_fixed_point(model, TOKENS, n_steps=10, ref_steps=24)  # x_24 = x* up to 0.5**25
    torch.testing.assert_close(
        dist[:, 0], torch.tensor([a ** (r + 1) for r in range(10)]), rtol=1e-4, atol=1e-6
    )
    assert A.cycle_structure(cache, tol=1e-2) == "single_point"
    states = model.run_with_cache(TOKENS, n_steps=24)[1].stack_loop("resid_post")[:, -1]
    assert torch.all(A.detect_period(states, tol=1e-3) == 1)
    lb = A.limiting_behaviour(model, TOKENS, n_steps=24)
    assert lb.fractions()["fixed_point"] == 1.0


def test_block_alternating_between_two_states_is_a_2_cycle():
    # x -> -x: the state alternates e, -e, e, ... The whole sequence flips sign, so q k^T and the
    # attention patterns are identical at every step.
    model = linear_loop_model([(-1.0, None)], n_steps=12)
    _, cache = model.run_with_cache(TOKENS)
    states = cache.stack_loop("resid_post")
    assert torch.all(A.detect_period(states[:, -1], tol=1e-4) == 2)
    torch.testing.assert_close(A.step_distances(cache, "relative"), torch.full((11, 1), 2.0))
    assert A.convergence_steps(cache, tol=1e-3).tolist() == [-1]
    assert A.cycle_structure(cache) == "not_converged"
    lb = A.classify_limiting_behaviour(A.cosine_to_final(states[:, -1]))
    assert lb.fractions()["orbit"] == 1.0
    stats = A.attention_stabilisation(cache)
    assert stats.distance.abs().max() < 1e-5
    assert torch.all(stats.stable_step(1e-4) == 0)


def test_cycle_of_distinct_fixed_points_and_the_degenerate_case():
    # Layer 0: x -> x + c, layer 1: x -> x / 2. Fixed points x*_0 = 2c, x*_1 = c: a 2-point cycle.
    c = torch.linspace(-1.0, 1.0, 8)
    cyc = linear_loop_model([(1.0, c), (0.5, None)], n_steps=30, state_init="zeros")
    fixed = A.approximate_fixed_points(cyc, TOKENS, ref_steps=30)  # [2, b, p, d], exact up to 0.5**30
    torch.testing.assert_close(fixed[0], (2 * c).expand_as(fixed[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fixed[1], c.expand_as(fixed[1]), rtol=1e-5, atol=1e-6)
    check = A.degenerate_fixed_point(fixed)
    assert not check.degenerate
    assert check.pairwise[0, 1].item() == pytest.approx(1 / 1.5, rel=1e-4)  # ||2c - c|| / mean(2|c|, |c|)
    _, cache = cyc.run_with_cache(TOKENS)
    assert A.cycle_structure(cache) == "cycle"
    between = A.cycle_distances(cache, "relative").between_layers[-1]  # |2c - c|/|c|, |c - 2c|/|2c|
    torch.testing.assert_close(between, torch.tensor([1.0, 0.5]), rtol=1e-4, atol=1e-6)

    # Layer 0 the identity, layer 1: x -> x/2 + v/2: both layers sit at v, the cycle is degenerate.
    v = torch.linspace(0.5, 2.0, 8)
    deg = linear_loop_model([(1.0, None), (0.5, 0.5 * v)], n_steps=30)
    fixed = A.approximate_fixed_points(deg, TOKENS, ref_steps=30)
    torch.testing.assert_close(fixed, v.expand_as(fixed), rtol=1e-5, atol=1e-6)
    assert A.degenerate_fixed_point(fixed).degenerate
    assert A.cycle_structure(deg.run_with_cache(TOKENS)[1]) == "single_point"


def test_detect_period_on_constructed_sequences():
    a, b, c = torch.randn(3, 2, 16)
    assert torch.equal(A.detect_period(torch.stack([a, b, c] * 8), tol=1e-5), torch.full((2,), 3))
    # a transient, then a 2-cycle: only the tail counts
    seq = torch.cat([torch.randn(10, 2, 16), torch.stack([a, b] * 10)])
    assert torch.equal(A.detect_period(seq, tol=1e-5), torch.full((2,), 2))
    assert torch.equal(A.detect_period(torch.randn(24, 2, 16), tol=1e-5), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- trajectory projection
def test_pca_recovers_a_planar_trajectory():
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 2, generator=gen))  # orthonormal plane in R^16
    t = torch.linspace(0, 6, 30)
    plane = torch.stack([3 * torch.cos(t), torch.sin(t)], -1)  # [30, 2]
    states = (plane @ basis.T + 5.0).view(15, 2, 16)  # [step, layer_in_cycle, d]
    p = A.pca_trajectory(states, n_components=2)
    assert p.explained_variance_ratio.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert p.explained_variance_ratio[0] > p.explained_variance_ratio[1]
    torch.testing.assert_close(p.coords @ p.components + p.mean, states, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p.components @ p.components.T, torch.eye(2), atol=1e-5, rtol=1e-5)
    # a 2-cycle is two points in PCA space, visited alternately
    a, b = torch.randn(2, 16, generator=gen)
    two = A.pca_trajectory(torch.stack([a, b] * 5)[:, None], n_components=2).coords[:, 0]
    torch.testing.assert_close(two[0::2], two[0].expand(5, 2))
    torch.testing.assert_close(two[1::2], two[1].expand(5, 2))
    assert (two[0] - two[1]).norm() == pytest.approx((a - b).norm().item(), rel=1e-4)


# ---------------------------------------------------------------- attention and the paper's measures
def test_colsum_concentration_definition():
    T = 5
    assert A.colsum_concentration(torch.full((T, T), 1 / T)).abs().item() < 1e-6
    sink = torch.zeros(T, T)
    sink[:, 0] = 1.0
    assert A.colsum_concentration(sink).item() == pytest.approx(1.0)
    pattern = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # column shares 0.75, 0.25
    expected = 1 + (0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert A.colsum_concentration(pattern).item() == pytest.approx(expected, rel=1e-6)
    batch = torch.stack([torch.full((T, T), 1 / T), sink])  # leading axes are kept
    torch.testing.assert_close(A.colsum_concentration(batch), torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)


def test_sink_score_and_rate():
    T = 6
    sink = torch.zeros(T, T)
    sink[:, 0] = 1.0
    assert A.sink_score(sink).item() == 1.0
    assert A.sink_score(torch.eye(T)).item() == pytest.approx(1 / T)
    causal_uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    assert A.sink_score(causal_uniform).item() == pytest.approx(sum(1 / (i + 1) for i in range(T)) / T)
    scores = torch.tensor([0.9, 0.1, 0.31, 0.3])
    assert A.sink_rate(scores).item() == 0.5  # threshold 0.3, strict
    assert A.sink_rate(scores, threshold=0.05).item() == 1.0


def test_mixing_score_is_maximal_for_uniform_patterns():
    T = 6
    uniform = torch.full((T, T), 1 / T)
    assert A.mixing_score(uniform).item() == pytest.approx(math.log(T))
    random = torch.softmax(torch.randn(50, T, T), -1)
    assert torch.all(A.mixing_score(random) < math.log(T))
    assert A.mixing_score(torch.eye(T)).item() == 0.0
    causal_uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    assert A.mixing_score(causal_uniform).item() == pytest.approx(sum(math.log(i + 1) for i in range(T)) / T)
    causal_random = torch.softmax(
        torch.randn(50, T, T).masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), -1e9), -1
    )
    assert torch.all(A.mixing_score(causal_random) < A.mixing_score(causal_uniform))


def test_matrix_entropy_definition():
    assert A.matrix_entropy(torch.eye(4) * 3.0).item() == pytest.approx(1.0, abs=1e-5)  # orthogonal tokens
    assert A.matrix_entropy(
        torch.randn(1, 8).expand(5, 8) * torch.arange(1.0, 6.0)[:, None]
    ).item() == pytest.approx(0.0, abs=1e-5)
    e0, e1 = torch.eye(8)[:2]
    two_groups = torch.stack([e0, e0, e1, e1])  # eigenvalues of K / tr K: 1/2, 1/2 -> log 2 / log 4
    assert A.matrix_entropy(two_groups).item() == pytest.approx(0.5, abs=1e-5)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(
        A.matrix_entropy(x), A.matrix_entropy(x * torch.rand(3, 7, 1) * 10), rtol=1e-4, atol=1e-5
    )
    assert torch.all((A.matrix_entropy(x) > 0) & (A.matrix_entropy(x) <= 1))


def test_frobenius_distances_between_steps():
    a = torch.softmax(torch.randn(4, 4), -1)
    b = torch.softmax(torch.randn(4, 4), -1)
    d = A.attention_frobenius_distances(torch.stack([a, a, b]))
    assert d[0, 1].item() == 0.0 and torch.all(d.diagonal() == 0)
    torch.testing.assert_close(d, d.T)
    assert d[0, 2].item() == pytest.approx((a - b).norm().item(), rel=1e-6)


def test_pattern_distances_and_head_statistics():
    rows_a, rows_b = torch.eye(3), torch.eye(3).roll(1, -1)  # disjoint support in every row
    assert A.pattern_distance(rows_a, rows_a, "js").item() == 0.0
    assert A.pattern_distance(rows_a, rows_b, "js").item() == pytest.approx(1.0)
    assert A.pattern_distance(rows_a, rows_b, "l1").item() == pytest.approx(2.0)
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])
    m = torch.tensor([0.75, 0.25])
    js = (
        0.5
        * (F.kl_div(m.log(), p[0], reduction="sum") + F.kl_div(m.log(), q[0], reduction="sum"))
        / math.log(2)
    )
    assert A.pattern_distance(p, q, "js").item() == pytest.approx(js.item(), rel=1e-5)
    prev = torch.zeros(4, 4)
    prev[0, 0] = 1.0
    prev[1:, :3] = torch.eye(3)
    assert A.previous_token_mass(prev).item() == 1.0


def test_attention_stabilisation_detects_the_step_each_head_settles():
    gen = torch.Generator().manual_seed(1)
    S, L, B, H, T = 8, 2, 2, 3, 5
    patterns = torch.softmax(torch.randn(S, L, B, H, T, T, generator=gen), -1)
    settle = torch.tensor([[0, 3, 6], [2, 7, 5]])  # the head's pattern is fixed from this step on
    for j in range(L):
        for h in range(H):
            patterns[settle[j, h] :, j, :, h] = patterns[settle[j, h], j, :, h]
    stats = A.attention_stabilisation(patterns)
    # L1H1 still changes between the last two steps (6 -> 7): not stabilised within the run
    assert torch.equal(stats.stable_step(tol=1e-6), torch.tensor([[0, 3, 6], [2, -1, 5]]))
    assert stats.distance.shape == (S - 1, L, H) and stats.entropy.shape == (S, L, H)
    torch.testing.assert_close(stats.sink, patterns[..., 0].mean(-1).mean(2))
    torch.testing.assert_close(stats.colsum, A.colsum_concentration(patterns).mean(2))
    sink_heads = torch.zeros(S, L, B, H, T, T)
    sink_heads[..., 0] = 1.0
    sink_heads[:, :, :, 0] = torch.eye(T)  # head 0 attends to itself: sink score 1/T < 0.3
    torch.testing.assert_close(A.attention_stabilisation(sink_heads).sink_rate(0.3), torch.full((S,), 2 / 3))


# ---------------------------------------------------------------- limiting behaviour
def _rotation_states(n_steps: int, angle: float) -> torch.Tensor:
    t = angle * torch.arange(n_steps, dtype=torch.float32)
    return torch.stack([torch.cos(t), torch.sin(t), torch.zeros_like(t)], -1)  # [step, 3]


def test_limiting_behaviour_classes_from_constructed_states():
    S = 64
    gen = torch.Generator().manual_seed(0)
    v, a, b, c = torch.randn(4, 3, generator=gen)
    contraction = v + (0.7 ** torch.arange(S, dtype=torch.float32))[:, None] * a  # -> fixed point v
    two_cycle = torch.stack([a, b] * (S // 2))
    three_cycle = torch.stack([a, b, c] * (S // 3 + 1))[:S]
    slider = _rotation_states(S, 0.02)  # keeps turning slowly: cos to final rises monotonically
    noise = torch.randn(S, 3, generator=gen)
    states = torch.stack([contraction, two_cycle, three_cycle, slider, noise], 1)  # [S, token, 3]
    lb = A.classify_limiting_behaviour(A.cosine_to_final(states))
    assert lb.labels() == ["fixed_point", "orbit", "orbit", "slider", "unknown"]
    assert lb.fractions() == {"fixed_point": 0.2, "orbit": 0.4, "slider": 0.2, "unknown": 0.2}


def test_limiting_behaviour_parameters():
    cos = torch.full((40,), 0.93)
    cos[-1] = 1.0
    assert A.classify_limiting_behaviour(cos).labels() == "unknown"  # 0.93 < 1 - 0.05: not fixed
    assert A.classify_limiting_behaviour(cos, tau=0.1).labels() == "fixed_point"
    mostly = torch.ones(40)
    mostly[-20 : -20 + 3] = 0.5  # 3 of 20 tail steps far from the final state
    assert A.classify_limiting_behaviour(mostly, rho=0.9).labels() != "fixed_point"
    assert A.classify_limiting_behaviour(mostly, rho=0.8).labels() == "fixed_point"
    with pytest.raises(ValueError):
        A.classify_limiting_behaviour(torch.ones(3))


# ---------------------------------------------------------------- streaming == cache
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streaming_matches_the_cache(variant):
    model = make_model(variant)
    n_steps = 4
    _, cache = model.run_with_cache(TOKENS, n_steps=n_steps)
    ref = cache.stack_loop("resid_post")[-1] + 0.1
    resid, attn, to_ref, head, layer = A.run_streaming(
        model,
        TOKENS,
        A.ResidualStats(metric="cosine"),
        A.AttentionStats("l1"),
        A.DistanceToReference(ref),
        A.HeadPatterns(layer_in_cycle=0, head=1, batch=1),
        A.LayerStates(-1),
        n_steps=n_steps,
    )
    expected = A.residual_stats(cache, metric="cosine")
    for field in ("step_distance", "norm", "matrix_entropy"):
        torch.testing.assert_close(getattr(resid, field), getattr(expected, field), rtol=1e-5, atol=1e-6)
    expected_attn = A.attention_stabilisation(cache, "l1")
    for field in ("distance", "entropy", "sink", "previous_token", "colsum"):
        torch.testing.assert_close(getattr(attn, field), getattr(expected_attn, field), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(to_ref, A.distance_to_reference(cache, ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head, A.head_patterns_across_steps(cache, 0, 1, batch=1))
    torch.testing.assert_close(layer, cache.stack_loop("resid_post")[:, -1])
    streamed = A.streaming_inference_stages(model, TOKENS, per_token=True, n_steps=n_steps)
    cached = A.inference_stages(cache, per_token=True)
    assert streamed.labels == cached.labels
    for field in A.stages.STAGE_FIELDS:
        torch.testing.assert_close(getattr(streamed, field), getattr(cached, field), rtol=1e-5, atol=1e-5)
    assert len(model.hook_dict) and not any(hp.fwd_hooks for hp in model.hook_dict.values())  # hooks removed


def test_streaming_per_token_distances_and_many_steps():
    model = make_model("plain")
    resid = A.run_streaming(model, TOKENS, A.ResidualStats(per_token=True), n_steps=32)
    assert resid.step_distance.shape == (31, 2, *TOKENS.shape)
    assert model.cfg.n_steps == 3  # the default depth is restored


# ---------------------------------------------------------------- stages of inference
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_stages_end_at_the_model_output(variant):
    model = make_model(variant)
    logits, cache = model.run_with_cache(TOKENS)
    s = A.inference_stages(cache, per_token=True)
    n = model.cfg.n_layers
    assert s.labels == [layer.label for layer in model.schedule] and s.entropy.shape == (n, *TOKENS.shape)
    logp = F.log_softmax(logits.float(), -1)
    torch.testing.assert_close(s.entropy[-1], -(logp.exp() * logp).sum(-1), rtol=1e-4, atol=1e-5)
    assert torch.all(s.rank[-1] == 1) and s.kl_to_final[-1].abs().max() < 1e-4
    torch.testing.assert_close(s.prob[-1], logp.exp().max(-1).values, rtol=1e-4, atol=1e-6)
    assert (
        torch.all(s.rank >= 1)
        and torch.all(s.kl_to_final > -1e-5)
        and torch.all((s.prob >= 0) & (s.prob <= 1))
    )
    first = cache["blocks.0.hook_resid_post"]
    torch.testing.assert_close(
        s.cosine_to_previous[0], F.cosine_similarity(first, cache["blocks.0.hook_resid_pre"], -1)
    )
    torch.testing.assert_close(s.resid_norm[3], cache["blocks.3.hook_resid_post"].norm(dim=-1))
    given = A.inference_stages(cache, final_logits=logits)
    torch.testing.assert_close(given.kl_to_final, A.inference_stages(cache).kl_to_final, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_gpt2_bridge(str(tmp_path_factory.mktemp("tokenizer")))


def test_inference_stages_on_a_feedforward_transformer_bridge(bridge):
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, cache = bridge.run_with_cache(tokens)
    s = A.inference_stages(cache, per_token=True)
    assert s.labels == ["L0", "L1"]
    logp = F.log_softmax(logits.float(), -1)
    torch.testing.assert_close(s.entropy[-1], -(logp.exp() * logp).sum(-1), rtol=1e-4, atol=1e-5)
    assert torch.all(s.rank[-1] == 1)
    # layer 0's logit lens, by hand with the HF modules
    hf = bridge.original_model
    lens0 = hf.lm_head(hf.transformer.ln_f(cache["blocks.0.hook_resid_post"]))
    lp0 = F.log_softmax(lens0.float(), -1)
    torch.testing.assert_close(s.kl_to_final[0], (logp.exp() * (logp - lp0)).sum(-1), rtol=1e-4, atol=1e-5)
    streamed = A.streaming_inference_stages(bridge, tokens, per_token=True)
    for field in A.stages.STAGE_FIELDS:
        torch.testing.assert_close(getattr(streamed, field), getattr(s, field), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        A.run_streaming(bridge, tokens, A.ResidualStats())  # loop reducers need a looped model
