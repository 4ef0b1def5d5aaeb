"""Figures of tl_loop.plot render to HTML and carry titles, axis labels, legends (or colour-bar
titles for heat-maps) and hover text."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from analysis_helpers import linear_loop_model, tiny_gpt2_bridge
from conftest import make_model

from tl_loop import analysis as A
from tl_loop import plot as P

TOKENS = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])


@pytest.fixture(scope="module")
def run():
    model = make_model("prelude_coda_add")
    _, cache = model.run_with_cache(TOKENS, n_steps=8)
    return model, cache


def written(fig: go.Figure, tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.html"
    fig.write_html(str(path), include_plotlyjs="cdn")
    text = path.read_text()
    assert path.stat().st_size > 1000 and "plotly" in text.lower()
    return text


def check_common(
    fig: go.Figure, *, legend: bool, colorbar: bool = False, x: bool = True, y: bool = True
) -> None:
    assert isinstance(fig, go.Figure) and fig.layout.title.text
    if x:
        assert fig.layout.xaxis.title.text
    if y:
        assert fig.layout.yaxis.title.text
    assert len(fig.data) > 0
    for trace in fig.data:
        assert trace.hovertemplate, f"trace {trace.name!r} has no hover text"
    if legend:
        assert fig.layout.showlegend and fig.layout.legend.title.text
        assert all(t.name for t in fig.data if t.showlegend is not False)
    if colorbar:
        assert all(t.colorbar.title.text for t in fig.data if isinstance(t, go.Heatmap))


def test_convergence_curves(run, tmp_path):
    _, cache = run
    d = A.step_distances(cache)
    fig = P.convergence_curves(d, tol=1e-3)
    check_common(fig, legend=True)
    assert [t.name for t in fig.data] == ["layer 0 of the cycle", "layer 1 of the cycle", "tolerance 0.001"]
    assert list(fig.data[0].x) == list(range(1, 8)) and fig.layout.yaxis.type == "log"
    torch.testing.assert_close(torch.tensor(fig.data[1].y), d[:, 1])
    assert "layer 1 of the cycle" in written(fig, tmp_path, "convergence")
    fp = P.convergence_curves(
        A.distance_to_final(cache),
        title="Distance to the final state",
        y_title="relative distance to the final state",
        step_offset=0,
    )
    assert fp.layout.title.text == "Distance to the final state" and list(fp.data[0].x) == list(range(8))


def test_heatmaps_over_step_and_layer(run, tmp_path):
    _, cache = run
    stats = A.residual_stats(cache)
    fig = P.step_layer_heatmap(stats.norm, "Residual norm per layer of the cycle", "norm")
    check_common(fig, legend=False, colorbar=True)
    torch.testing.assert_close(torch.tensor(fig.data[0].z), stats.norm.T)
    written(fig, tmp_path, "heatmap")
    both = P.residual_stats_figure(stats)
    check_common(both, legend=False, colorbar=True)
    assert [a.text for a in both.layout.annotations] == ["residual norm", "matrix entropy (normalised)"]
    written(both, tmp_path, "resid_stats")


@pytest.mark.parametrize("k", [2, 3])
def test_pca_trajectory(run, tmp_path, k):
    _, cache = run
    proj = A.pca_trajectory(A.token_trajectory(cache, batch=1, pos=-1), n_components=k)
    fig = P.pca_trajectory_figure(proj)
    if k == 2:
        check_common(fig, legend=True)
        assert fig.layout.xaxis.title.text.startswith("PC1 (")
    else:
        check_common(fig, legend=True, x=False, y=False)
        assert isinstance(fig.data[0], go.Scatter3d)
        assert fig.layout.scene.zaxis.title.text.startswith("PC3 (")
    assert [t.name for t in fig.data] == ["path", "layer 0 of the cycle", "layer 1 of the cycle"]
    assert len(fig.data[0].x) == 8 * 2  # every (step, layer) state, in execution order
    written(fig, tmp_path, f"pca{k}")


def test_cycle_distances_figure(tmp_path):
    c = torch.linspace(-1.0, 1.0, 8)
    model = linear_loop_model([(1.0, c), (0.5, None)], n_steps=12, state_init="zeros")
    _, cache = model.run_with_cache(TOKENS)
    fig = P.cycle_distances_figure(A.cycle_distances(cache))
    check_common(fig, legend=True)
    assert len(fig.data) == 4 and fig.data[1].line.dash == "dash"
    written(fig, tmp_path, "cycle")


def test_attention_figures(run, tmp_path):
    _, cache = run
    stats = A.attention_stabilisation(cache)
    fig = P.stabilisation_heatmap(stats)
    check_common(fig, legend=False, colorbar=True)
    assert len(fig.data[0].y) == 2 * 4 and list(fig.data[0].x) == list(range(1, 8))
    written(fig, tmp_path, "stabilisation")
    sink = P.head_heatmap(stats.sink, "Sink score per head", "sink score")
    check_common(sink, legend=False, colorbar=True)
    frob = P.step_pair_heatmap(A.attention_frobenius_distances(A.head_patterns_across_steps(cache, 1, 2)))
    check_common(frob, legend=False, colorbar=True)
    assert len(frob.data[0].z) == 8
    written(frob, tmp_path, "frobenius")
    paper = P.paper_attention_figure(stats)
    check_common(paper, legend=True)
    assert {t.name for t in paper.data} == {
        "layer 0 of the cycle",
        "layer 1 of the cycle",
        "sink rate (all heads)",
    }
    written(paper, tmp_path, "paper")


def test_circuitsvis_views_of_a_head_across_steps(run, tmp_path):
    model, cache = run
    patterns = A.head_patterns_across_steps(cache, layer_in_cycle=0, head=1)
    view = P.attention_views(patterns, [f"tok{t}" for t in TOKENS[0].tolist()], steps=[0, 3, 7])
    html = view.local_src  # the self-contained rendering (no CDN)
    assert "step 3" in html and "tok4" in html and "AttentionHeads" in html
    (tmp_path / "views.html").write_text(html)
    streamed = A.run_streaming(model, TOKENS, A.HeadPatterns(0, 1), n_steps=8)
    assert "step 7" in P.attention_views(streamed).local_src
    with pytest.raises(ValueError):
        P.attention_views(patterns[0])


def test_limiting_behaviour_figure(tmp_path):
    S = 32
    a, b = torch.randn(2, 3)
    states = torch.stack([torch.ones(S, 3), torch.stack([a, b] * (S // 2))], 1)
    fig = P.limiting_behaviour_figure(A.classify_limiting_behaviour(A.cosine_to_final(states)))
    check_common(fig, legend=True)
    assert [t.name for t in fig.data if t.showlegend] == [
        "fixed point (50% of tokens)",
        "orbit (50% of tokens)",
        "1 - tau = 0.95",
    ]
    written(fig, tmp_path, "limiting")


def test_stages_of_looped_and_feedforward_models_on_one_figure(run, tmp_path_factory, tmp_path):
    pytest.importorskip("transformers")
    _, cache = run
    bridge = tiny_gpt2_bridge(str(tmp_path_factory.mktemp("tokenizer")))
    _, ff_cache = bridge.run_with_cache(
        torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    )
    stages = {"looped (8 steps)": A.inference_stages(cache), "GPT-2 (2 layers)": A.inference_stages(ff_cache)}
    fig = P.inference_stages_figure(stages)
    check_common(fig, legend=True)
    assert [t.name for t in fig.data if t.showlegend] == list(stages)
    assert len(fig.data) == 6 * 2
    assert fig.layout.yaxis2.type == "log" and fig.layout.yaxis2.title.text == "rank of final prediction"
    assert all(
        getattr(fig.layout, f"xaxis{'' if i == 1 else i}").title.text == "fraction of effective depth"
        for i in range(1, 7)
    )
    written(fig, tmp_path, "stages")
    by_layer = P.inference_stages_figure(stages["looped (8 steps)"], x="layer")
    assert by_layer.layout.xaxis.title.text == "effective layer" and list(by_layer.data[0].x)[:3] == [0, 1, 2]
