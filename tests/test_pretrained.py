"""The models shipped inside the package (issue 4): they load offline, answer held-out problems,
the looped one improves with inference steps (one hop per step) and converges, and their reports
match the weights."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
import torch

import tl_loop
from tl_loop import HookedLoopedTransformer
from tl_loop.analysis import step_distances
from tl_loop.pretrained import PRETRAINED_DIR, available, task_for
from tl_loop.tasks.report import accuracy_table

LOOPED, BASELINE = "tl-loop/varbind-looped", "tl-loop/varbind-baseline"


@pytest.fixture(scope="module")
def looped() -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained(LOOPED)


@pytest.fixture(scope="module")
def baseline() -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained(BASELINE)


def test_shipped_models_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a shipped model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert set(available()) == {LOOPED, BASELINE}
    for name in available():
        model = HookedLoopedTransformer.from_pretrained(name)
        assert model.cfg.family == "tl_loop"
        assert model.tokenizer is not None
        task = task_for(model)
        assert model.cfg.d_vocab == task.tokenizer.vocab_size
        for file in ("config.json", "model.safetensors", "recipe.json", "REPORT.md", "accuracy.csv", "loss_curve.svg"):
            assert (PRETRAINED_DIR / name.split("/")[1] / file).is_file(), (name, file)


def test_layouts_are_the_documented_ones(looped, baseline):
    c = looped.cfg
    assert (c.n_prelude_layers, c.n_core_layers, c.n_coda_layers) == (1, 1, 1)
    assert c.injection == "add"
    b = baseline.cfg
    assert b.n_steps == 1 and b.injection == "none"
    assert b.d_model == c.d_model  # same width
    assert b.effective_depth(1) == c.effective_depth(6)  # comparable depth
    assert task_for(looped) == task_for(baseline)  # same task


def _predict(model: HookedLoopedTransformer, prompts: list[str], n_steps: int | None = None) -> list[str]:
    tokens = model.to_tokens(prompts)
    logits = model(tokens, n_steps=n_steps)[:, -1]
    return [model.tokenizer.decode([i]) for i in logits.argmax(-1).tolist()]


def test_a_few_held_out_predictions(looped):
    task = task_for(looped)
    problems = [p for h in (1, 2, 3) for p in task.dataset(h, 8, split="test", seed=7)]
    assert all(task.split_of(p) == "test" for p in problems)
    predictions = _predict(looped, [p.prompt for p in problems])  # through the tokenizer, 8 steps
    correct = sum(pred == p.answer for pred, p in zip(predictions, problems))
    assert correct >= 0.85 * len(problems), list(zip([p.prompt for p in problems], predictions))


def test_looped_accuracy_rises_with_inference_steps(looped):
    """One hop per step: a k-hop problem is answered after k steps and not before."""
    task = task_for(looped)
    table = accuracy_table(looped, task, hops=(2, 3, 4), steps=(1, 2, 3, 4), n=64, seed=3)
    for h in (2, 3, 4):
        assert table[h][h - 1] <= 0.1, table  # one step short: the chain is not finished
        assert table[h][h] >= 0.8, table


def test_successive_step_distance_of_the_last_layer_of_the_cycle_shrinks(looped):
    task = task_for(looped)
    tokens, _ = task.encode(task.dataset(4, 32, split="test", seed=11))
    n_steps = 32
    _, cache = looped.run_with_cache(tokens, n_steps=n_steps, names_filter=lambda n: n.endswith("hook_resid_post"))
    dist = step_distances(cache)[:, -1]  # the last layer of the cycle, [step - 1]
    assert dist.shape == (n_steps - 1,)
    early, late = dist[1:4].mean(), dist[-8:].mean()
    assert late < 0.5 * early, dist
    assert torch.all(dist[2:] <= dist[1:-1] * 1.05), dist  # shrinking from step to step
    assert torch.all(torch.isfinite(dist))


def test_report_matches_the_weights(looped):
    """One cell of the shipped accuracy table, recomputed from the shipped weights."""
    folder = PRETRAINED_DIR / "varbind-looped"
    with open(folder / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if int(r["hops"]) == 2 and int(r["n_steps"]) == 8)
    recipe = json.loads((folder / "recipe.json").read_text())
    table = accuracy_table(looped, task_for(looped), hops=(2,), steps=(8,), n=recipe["eval_n"], seed=0)
    assert abs(table[2][8] - float(row["accuracy"])) <= 5e-5  # the csv keeps 4 decimals


def test_package_with_weights_stays_under_20_mb():
    root = Path(tl_loop.__file__).resolve().parent
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 20 * 2**20, f"package is {size / 2**20:.1f} MiB"
