"""The training sweep end to end, at toy size: run, resume, skip finished work, report."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest

from tl_loop.studies import training_sweep as ts

# 2 configurations (no injection / additive injection), a few iterations each
TOY = replace(ts.SMOKE, iterations=4, eval_steps=(1, 2, 4, 12), measure_steps=12, hold=4)


def test_specs_design():
    full = ts.Sweep()
    specs = full.specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert len([s for s in specs if s.seed == 0]) == 3 * 3 * 3 * 2  # the full grid
    seconds = [s for s in specs if s.seed == 1]
    assert len(seconds) == 3 * 3 * 2 and {s.layers for s in seconds} == {1}  # every L = 1 configuration
    assert len(ts.CHARS.specs()) == 60  # the first sweep: the grid and 6 second seeds at L = 2
    learnable = full.train_config(specs[0])
    assert (learnable.step_supervision, learnable.step_distribution, learnable.target_loss) == (True, "fixed", 0.03)
    assert learnable.make_task().encoding == "statements" and ts.CHARS.train_config(specs[0]).make_task().encoding == "chars"
    assert [s.name for s in TOY.specs()] == ["L1-none-pre_norm-s0", "L1-add-pre_norm-s0"]
    cfg = full.train_config(ts.RunSpec(4, "linear", "ouro", True, 0)).make_model_config()
    assert (cfg.n_core_layers, cfg.injection, cfg.output_norm, cfg.norm_between_steps, cfg.resid_norm) == (
        4, "linear", True, True, False)
    assert ts.Sweep.from_dict(json.loads(json.dumps(full.to_dict()))) == full


def test_sweep_end_to_end(tmp_path):
    out, docs = tmp_path / "sweep", tmp_path / "docs"
    spec = TOY.specs()[0]
    # an interrupted run: training stops after 2 of 4 iterations, no metrics yet
    assert ts.run_one(out, TOY, spec, stop_at=2) is None
    state = json.loads((out / "runs" / spec.name / "train" / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 2
    assert len(ts.pending(out, TOY)) == 2

    summary = ts.run_sweep(out, TOY, jobs=1, log=None)  # resumes the first run, trains the second
    assert summary["done"] == 2 and not summary["failed"]
    with open(out / "runs" / spec.name / "train" / "train_log.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    assert ts.pending(out, TOY) == []

    again = ts.run_sweep(out, TOY, jobs=2, log=None)  # finished runs are skipped
    assert again["done"] == 0 and again["skipped"] == 2

    with pytest.raises(ValueError, match="other settings"):
        ts.run_sweep(out, replace(TOY, iterations=5), jobs=1, log=None)

    paths = ts.write_report(out, docs, figures_html=True)
    rows = ts.read_runs(paths["runs"])
    assert [r["name"] for r in rows] == [s.name for s in TOY.specs()]
    for r in rows:
        assert 0.0 <= r["acc_s12"] <= 1.0 and r["iterations"] == 4
        assert r["tail_relative"] >= 0 and 0.0 <= r["attn_stable_share"] <= 1.0
        assert isinstance(r["converged_state"], bool)
    with open(paths["accuracy"]) as f:
        acc = list(csv.DictReader(f))
    assert len(acc) == 2 * len(TOY.eval_hops) * len(TOY.eval_steps)
    text = paths["summary"].read_text()
    assert "## Part 1's claims" in text and "L1-add-pre_norm-s0" in text
    html = paths["figures"].read_text()
    assert html.count("Plotly.newPlot") >= 4 and "<script" in html


def test_cli_list(tmp_path, capsys):
    assert ts.main(["list", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["L1-none-pre_norm-s0: pending", "L1-add-pre_norm-s0: pending"]


def test_shipped_table_matches_its_page():
    """docs/design_study.md shows the claims matrix and the groups table that the shipped
    training_runs.csv gives (the report regenerates both from the runs)."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    rows = ts.read_runs(docs / "design_study" / "training_runs.csv")
    assert len(rows) == len(ts.Sweep().specs())
    page = (docs / "design_study.md").read_text()
    assert ts.claims_matrix(ts.claims(rows)) in page
    assert ts._md(ts.group_rows(rows), ts.GROUP_COLUMNS) in page
    assert all(r["acc_s2"] > 0.4 for r in rows)  # every shipped model answers at 2 steps ...
    assert all(r["acc_s1"] <= 0.51 for r in rows)  # ... and only the 1-hop half at 1 step
    first = ts.read_runs(docs / "design_study" / "chars" / "training_runs.csv")
    assert len(first) == len(ts.CHARS.specs())


def test_overrides_and_older_sweep_files(tmp_path):
    sweep = ts._with_overrides(ts.SMOKE, ["iterations=5", 'train_extra=[["warmup", 2]]'])
    assert sweep.iterations == 5 and sweep.train_extra == (("warmup", 2),)
    assert sweep.train_config(sweep.specs()[0]).warmup == 2
    with pytest.raises(ValueError, match="no field"):
        replace(ts.SMOKE, train_extra=(("nonsense", 1),)).train_config(ts.SMOKE.specs()[0])
    # a sweep.json written before a field existed is read with that field's default
    out = tmp_path / "old"
    out.mkdir()
    data = ts.SMOKE.to_dict()
    del data["train_extra"]
    (out / "sweep.json").write_text(json.dumps(data))
    ts._check_sweep_file(out, ts.SMOKE)  # same settings: accepted
    # fields added with the learnable design are read as the first sweep ran them, not as today's defaults
    first = ts.CHARS.to_dict()
    for key in ts.BEFORE_FIELDS:
        del first[key]
    assert ts.Sweep.from_dict(first) == ts.CHARS
    with pytest.raises(ValueError, match="other settings"):
        ts._check_sweep_file(out, replace(ts.SMOKE, iterations=9))
