"""The random-initialisation design study (tl_loop.studies.random_init): a 2-configuration,
few-step run end to end, the streamed measurements against the cache-based library functions,
and decisions that follow the data (constructed cases where each criterion must flip)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tl_loop import HookedLoopedTransformer
from tl_loop.studies import random_init as R

DOCS = Path(__file__).resolve().parents[1] / "docs"
TINY = {"d_model": 16, "n_heads": 2, "d_mlp": 32, "d_vocab": 32, "batch": 1, "seq_len": 6}


def tiny_grid(**overrides) -> R.Grid:
    values = {
        "layers": (2,),
        "seeds": (0,),
        "injections": ("add",),
        "norms": ("pre_norm", "huginn"),
        "inits": ("tl_loop",),
        "n_steps": 12,
        "hold": 4,
        **TINY,
    }
    values.update(overrides)
    return R.Grid(**values)


# --------------------------------------------------------------------------- end to end
def test_two_configurations_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    argv = [
        "--out",
        str(out),
        "--layers",
        "2",
        "--seeds",
        "0",
        "--injections",
        "add",
        "--norms",
        "pre_norm",
        "huginn",
        "--inits",
        "tl_loop",
        "--steps",
        "12",
        "--hold",
        "4",
        "--d-model",
        "16",
        "--seq-len",
        "6",
        "--quiet",
    ]
    assert R.main(argv) == 0
    printed = capsys.readouterr().out
    for key in ("1", "2", "3", "4", "5"):
        assert f"claim {key} [tl_loop, state]" in printed and f"claim {key} [tl_loop, direction]" in printed

    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 2 and {r["norm"] for r in runs} == {"pre_norm", "huginn"}
    for column in (
        "tail_relative",
        "tail_direction",
        "norm_ratio",
        "decay_exponent",
        "share_fixed_point",
        "degeneracy_relative",
        "converged_state",
        "converged_direction",
        "degenerate_state",
    ):
        assert column in runs[0]
    for r in runs:
        shares = sum(float(r[f"share_{c}"]) for c in R.LIMITING_CLASSES)
        assert math.isclose(shares, 1.0, abs_tol=1e-6)
        # the decision columns are the criteria applied to the numbers in the same row
        assert (r["converged_state"] == "True") == (float(r["tail_relative"]) <= R.Criteria().tol)
    with (out / "layers.csv").open() as f:
        layers = list(csv.DictReader(f))
    assert len(layers) == 2 * 2 and {r["layer"] for r in layers} == {"0", "1"}

    claims = json.loads((out / "claims.json").read_text())
    assert len(claims) == len(R.CLAIMS) * len(R.NOTIONS)
    by_key = {(c["claim"], c["notion"]): c for c in claims}
    # only injected pre-norm / Huginn runs: claims 1 and 2 are decided, 3-5 have no runs to decide them
    for notion in R.NOTIONS:
        assert by_key[("1", notion)]["holds"] in (True, False)
        assert by_key[("2", notion)]["holds"] in (True, False)
        for key in ("3", "4", "5"):
            assert (
                by_key[(key, notion)]["holds"] is None and by_key[(key, notion)]["verdict"] == "not evaluated"
            )

    # the claims decided from the CSV equal those decided from the run in memory
    reread = R.evaluate_claims(R.read_runs(out / "runs.csv"))
    assert [(v.claim, v.notion, v.holds) for v in reread] == [
        (c["claim"], c["notion"], c["holds"]) for c in claims
    ]

    summary = (out / "summary.md").read_text()
    assert "## Claims" in summary and "| tl_loop | pre_norm | add | 2 |" in summary
    study = json.loads((out / "study.json").read_text())
    assert study["runs"] == 2 and study["grid"]["n_steps"] == 12

    page = (out / "figures.html").read_text()
    assert page.count("<script") >= 5 and "plotly" in page.lower()
    assert (out / "figures.html").stat().st_size < 5_000_000


def test_streamed_measurement_matches_the_cache():
    grid = tiny_grid(layers=(3,))
    model = HookedLoopedTransformer(grid.config(3, "huginn", "add", n_steps=10), seed=1)
    tokens = grid.tokens()
    streamed = R.measure_run(model, tokens, n_steps=10)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, n_steps=10)
    reference = R.RunMeasurement.from_states(cache.stack_loop("resid_post"))
    for name in ("relative", "direction", "norm", "final"):
        torch.testing.assert_close(getattr(streamed, name), getattr(reference, name), rtol=1e-5, atol=1e-6)
    assert torch.equal(streamed.limiting.codes, reference.limiting.codes)
    # the decay exponent divides two small distances: looser there
    assert streamed.summary(4, 1e-3) == pytest.approx(reference.summary(4, 1e-3), rel=1e-3, abs=1e-6)


def test_initialisations():
    grid = tiny_grid(layers=(3,), d_model=64, n_heads=4, d_mlp=256)
    model = HookedLoopedTransformer(grid.config(3, "pre_norm", "linear"), seed=0)
    R.init_parameters(model, "tl_loop", seed=0)
    depth = 1 + 3  # prelude + block, the model is built at one step
    assert model.core[0].attn.w_o.std().item() == pytest.approx(0.02 / math.sqrt(2 * depth), rel=0.1)
    assert model.core[0].attn.w_qkv.std().item() == pytest.approx(0.02, rel=0.1)
    R.init_parameters(model, "fan_in", seed=0)
    assert model.core[0].mlp.w_out.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.1)
    assert model.adapter.weight.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.1)
    assert model.embed.W_E.std().item() == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ValueError):
        R.init_parameters(model, "xavier", seed=0)


# --------------------------------------------------------------------------- decisions follow the data
def _states(kind: str, steps: int = 64, layers: int = 2, d: int = 8) -> torch.Tensor:
    """``[step, layer, batch=1, pos=3, d]`` trajectories with a known limit."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(layers, 1, 3, d, generator=gen)
    push = torch.randn(layers, 1, 3, d, generator=gen)
    r = torch.arange(steps, dtype=torch.float32).view(steps, 1, 1, 1, 1)
    if kind == "contracting":  # x_r = x* + 0.5^r v: a fixed point, distinct per layer
        return base + 0.5**r * push
    if kind == "growing":  # x_r = (r + 1) u + w: the direction settles, the state does not
        return (r + 1) * base[:1] + push
    if kind == "drifting":  # rotates by a constant angle in a plane every step
        angle = 0.02 * r
        e1, e2 = torch.zeros(d), torch.zeros(d)
        e1[0], e2[1] = 1.0, 1.0
        return torch.cos(angle) * e1 + torch.sin(angle) * e2 + 0 * base
    raise ValueError(kind)


def _decide(kind: str, criteria: R.Criteria | None = None) -> dict[str, bool]:
    criteria = criteria or R.Criteria()
    m = R.RunMeasurement.from_states(_states(kind))
    return R.classify(m.summary(hold=8, tol=criteria.tol), criteria)


def test_run_decisions_follow_the_trajectory():
    contracting = _decide("contracting")
    assert contracting["converged_state"] and contracting["converged_direction"]
    assert not contracting["degenerate_state"]  # every layer has its own point

    growing = _decide("growing")  # relative steps ~ 1/r ~ 1.6e-2, direction steps ~ 1/r^2
    assert not growing["converged_state"] and growing["converged_direction"] and growing["degenerate_state"]
    loose = _decide("growing", R.Criteria(tol=0.05))  # ...unless the tolerance is loose enough
    assert loose["converged_state"]

    drifting = _decide("drifting")  # 0.02 per step, forever
    assert not drifting["converged_state"] and not drifting["converged_direction"]
    m = R.RunMeasurement.from_states(_states("drifting"))
    assert m.limiting.fractions()["slider"] == 1.0
    assert (
        abs(m.decay_exponent()) < 0.05
        and R.RunMeasurement.from_states(_states("growing")).decay_exponent() > 0.8
    )


def _row(
    norm: str,
    injection: str,
    converged: bool,
    *,
    init: str = "tl_loop",
    layers: int = 4,
    seed: int = 0,
    degenerate: bool = False,
    tail: float | None = None,
) -> dict:
    tail = (1e-6 if converged else 1e-1) if tail is None else tail
    return {
        "init": init,
        "norm": norm,
        "injection": injection,
        "layers": layers,
        "seed": seed,
        "n_steps": 64,
        "tail_relative": tail,
        "tail_direction": tail,
        "norm_ratio": 1.0,
        "decay_exponent": 5.0,
        "share_fixed_point": 1.0 if converged else 0.0,
        "share_orbit": 0.0,
        "share_slider": 0.0,
        "share_unknown": 0.0 if converged else 1.0,
        "degeneracy_relative": 1e-3 if degenerate else 1.0,
        "degeneracy_direction": 1e-3 if degenerate else 1.0,
    }


def _paper_world() -> list[dict]:
    """Runs in which every claim of the paper holds."""
    rows = []
    for seed in range(3):
        for inj in ("add", "linear"):
            rows += [
                _row("pre_norm", inj, True, seed=seed),
                _row("huginn", inj, True, seed=seed),
                _row("ouro", inj, False, seed=seed),
            ]
        rows += [
            _row("pre_norm", "none", True, seed=seed, degenerate=True),
            _row("huginn", "none", False, seed=seed),
            _row("ouro", "none", False, seed=seed),
        ]
    return rows


def _verdicts(rows, criteria: R.Criteria | None = None, notion: str = "state") -> dict[str, bool | None]:
    return {v.claim: v.holds for v in R.evaluate_claims(rows, criteria or R.Criteria()) if v.notion == notion}


def test_claims_follow_the_data():
    world = _paper_world()
    for notion in R.NOTIONS:
        assert _verdicts(world, notion=notion) == {k: True for k in "12345"}

    def changed(pred, **new):
        return [{**r, **new} if pred(r) else r for r in world]

    # Ouro-style with injection converges -> claim 3 fails, nothing else moves
    v = _verdicts(
        changed(
            lambda r: r["norm"] == "ouro" and r["injection"] != "none",
            tail_relative=1e-6,
            tail_direction=1e-6,
            share_fixed_point=1.0,
        )
    )
    assert v == {"1": True, "2": True, "3": False, "4": True, "5": True}
    # pre-norm fixed points no longer shared by the layers -> only claim 5 fails
    assert (
        _verdicts(
            changed(lambda r: r["norm"] == "pre_norm" and r["injection"] == "none", degeneracy_relative=0.5)
        )["5"]
        is False
    )
    # Huginn-style without injection converges -> claim 4 fails
    assert (
        _verdicts(changed(lambda r: r["norm"] == "huginn" and r["injection"] == "none", tail_relative=1e-6))[
            "4"
        ]
        is False
    )
    # linear injection alone fails for pre-norm -> claim 1 fails (every injection type must agree)
    assert (
        _verdicts(
            changed(lambda r: r["norm"] == "pre_norm" and r["injection"] == "linear", tail_relative=1e-1)
        )["1"]
        is False
    )
    # the direction notion also needs the tokens' limiting behaviour to be "fixed point"
    v = _verdicts(
        changed(lambda r: r["norm"] == "huginn" and r["injection"] != "none", share_fixed_point=0.5),
        notion="direction",
    )
    assert v["2"] is False and _verdicts(world, notion="direction")["2"] is True


def test_trend_notion_accepts_a_shrinking_step_distance():
    # pre-norm without injection still moves by 1e-2 per step at the end, but the step distance
    # shrinks like 1/r and the tokens sit in the fixed-point class
    world = [
        {**r, "tail_relative": 1e-2, "tail_direction": 1e-2, "decay_exponent": 1.0}
        if r["norm"] == "pre_norm" and r["injection"] == "none"
        else r
        for r in _paper_world()
    ]
    assert _verdicts(world, notion="state")["4"] is False and _verdicts(world, notion="trend")["4"] is True
    assert _verdicts(world, notion="trend")["5"] is True
    assert _verdicts(world, R.Criteria(min_decay=1.5), notion="trend")["4"] is False
    # a steady drift (exponent ~0) is not a trend towards a fixed point
    drift = [
        {**r, "decay_exponent": 0.0} if r["norm"] == "pre_norm" and r["injection"] == "none" else r
        for r in world
    ]
    assert _verdicts(drift, notion="trend")["4"] is False


def test_thresholds_are_parameters():
    world = [r for r in _paper_world() if not (r["norm"] == "pre_norm" and r["injection"] == "add")]
    # two of three pre-norm "add" runs converge: "mostly" at majority 2/3, not at 0.9
    world += [_row("pre_norm", "add", s < 2, seed=s) for s in range(3)]
    assert _verdicts(world)["1"] is True
    assert _verdicts(world, R.Criteria(majority=0.9))["1"] is False
    # the tolerance decides a run that moves by 5e-4 per step
    world = [
        {**r, "tail_relative": 5e-4} if r["norm"] == "huginn" and r["injection"] != "none" else r
        for r in _paper_world()
    ]
    assert _verdicts(world, R.Criteria(tol=1e-3))["2"] is True
    assert _verdicts(world, R.Criteria(tol=1e-4))["2"] is False
    # the degeneracy tolerance decides claim 5
    world = [{**r, "degeneracy_relative": 0.03} if r["injection"] == "none" else r for r in _paper_world()]
    assert _verdicts(world, R.Criteria(degenerate_tol=0.05))["5"] is True
    assert _verdicts(world, R.Criteria(degenerate_tol=0.01))["5"] is False


def test_missing_groups_are_not_evaluated():
    rows = [r for r in _paper_world() if r["injection"] != "none"]
    v = _verdicts(rows)
    assert v["1"] is True and v["4"] is None and v["5"] is None
    with pytest.raises(ValueError):
        R.Grid(norms=("post_norm",))
    with pytest.raises(ValueError):
        R.Criteria(majority=0.4)


# --------------------------------------------------------------------------- the shipped results
def test_shipped_results_match_their_page():
    """docs/design_study.md shows the verdicts and group table that the shipped runs.csv gives
    under the shipped criteria; runs.csv's decision columns are those criteria applied to its numbers."""
    folder = DOCS / "design_study"
    study = json.loads((folder / "study.json").read_text())
    criteria = R.Criteria(**study["criteria"])
    runs = R.read_runs(folder / "runs.csv")
    assert (
        len(runs)
        == study["runs"]
        == R.Grid(**{k: tuple(v) if isinstance(v, list) else v for k, v in study["grid"].items()}).n_runs
    )
    for r in runs:
        for key, value in R.classify(r, criteria).items():
            assert r[key] == value, (key, r)
    page = (DOCS / "design_study.md").read_text()
    assert R.verdict_matrix(R.evaluate_claims(runs, criteria)) in page
    assert R.markdown_table(R.group_rows(runs, criteria), R.GROUP_COLUMNS, R.GROUP_HEADERS) in page
    assert "## Training sweep" in page
