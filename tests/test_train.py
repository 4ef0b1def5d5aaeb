"""The training loop: it learns, it resumes exactly, truncated backprop and step sampling."""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tl_loop import HookedLoopedTransformer
from tl_loop.train import (
    RECIPES,
    TrainConfig,
    answer_logits_train,
    build_model,
    finish,
    get_recipe,
    learning_rate,
    sample_n_steps,
    step_logits_train,
    train,
)

TINY_MODEL = dict(d_model=32, d_head=8, n_heads=4, d_mlp=64, n_prelude_layers=1, n_core_layers=1,
                  n_coda_layers=1, n_steps=3, injection="add", state_init="zeros",
                  norm_between_steps=True, loop_norm_weights="own")


def tiny_config(**overrides) -> TrainConfig:
    values = dict(name="tiny", model=dict(TINY_MODEL), task=dict(n_statements=4), train_hops=(1, 2),
                  iterations=8, batch_size=16, lr=3e-3, warmup=2, max_train_steps=4, threads=1,
                  checkpoint_every=100, eval_every=0, eval_hops=(1, 2), eval_steps=(1, 2, 4), eval_n=16)
    values.update(overrides)
    return TrainConfig(**values)


def held_out_loss(model: HookedLoopedTransformer, cfg: TrainConfig) -> float:
    task = cfg.make_task()
    tokens, answers = task.encode(task.batch(random.Random(123), 128, list(cfg.train_hops), "test"))
    with torch.no_grad():
        return float(F.cross_entropy(model(tokens, n_steps=2)[:, -1], answers))


def test_a_few_iterations_reduce_the_held_out_loss(tmp_path):
    cfg = tiny_config(iterations=40, lr=5e-3)
    before = held_out_loss(build_model(cfg), cfg)  # the same seeded initialisation train() starts from
    result = train(cfg, tmp_path, progress=False)
    after = held_out_loss(result.model, cfg)
    assert before > math.log(20)  # near-uniform over 43 tokens at initialisation
    assert after < math.log(10) + 0.25  # learnt (at least) that the answer is a digit
    assert after < before - 1.2
    with open(tmp_path / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 41))
    assert {int(r["n_steps"]) for r in rows} <= set(range(1, 5)) and len({r["n_steps"] for r in rows}) > 1


@pytest.mark.parametrize("backprop_steps", [None, 2])
def test_resume_gives_the_uninterrupted_result(tmp_path, backprop_steps):
    cfg = tiny_config(backprop_steps=backprop_steps, checkpoint_every=2)
    straight = train(cfg, tmp_path / "straight", progress=False)
    first = train(cfg, tmp_path / "resumed", progress=False, stop_at=5)
    assert first.iteration == 5
    resumed = train(cfg, tmp_path / "resumed", progress=False)
    assert resumed.iteration == cfg.iterations
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    logs = [(tmp_path / d / "train_log.csv").read_text().splitlines() for d in ("straight", "resumed")]
    strip = [[",".join(line.split(",")[:-1]) for line in log] for log in logs]  # drop elapsed_s
    assert strip[0] == strip[1]
    again = train(cfg, tmp_path / "resumed", progress=False)  # nothing left to train
    assert again.iteration == cfg.iterations
    assert again.final_loss == pytest.approx(straight.final_loss, abs=1e-5)  # from the log
    with pytest.raises(ValueError, match=r"other settings \(they differ in lr\).*--no-resume"):
        train(replace(cfg, lr=1e-2), tmp_path / "resumed", progress=False)


def test_truncated_backprop_keeps_the_forward_and_cuts_the_graph():
    cfg = tiny_config()
    model = build_model(cfg)
    task = cfg.make_task()
    tokens, _ = task.encode(task.batch(random.Random(0), 4, [1, 2]))
    full = answer_logits_train(model, tokens, 4, None)
    cut = answer_logits_train(model, tokens, 4, 1)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, model(tokens, n_steps=4)[:, -1])

    weight = next(p for n, p in model.named_parameters() if n.startswith("core.0.") and p.ndim == 2)

    def core_grad(logits: torch.Tensor) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logits.sum().backward()
        return weight.grad.clone()

    # with the graph cut after 3 of 4 steps the recurrent block gets a different (partial) gradient
    assert not torch.allclose(core_grad(answer_logits_train(model, tokens, 4, None)),
                              core_grad(answer_logits_train(model, tokens, 4, 1)))
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())  # the stopping hook was removed


def test_step_sampler_and_schedule():
    cfg = tiny_config(mean_steps=4.0, min_steps=1, max_train_steps=32)
    rng = random.Random(0)
    draws = [sample_n_steps(rng, cfg) for _ in range(4000)]
    assert min(draws) >= 1 and max(draws) <= 32
    assert 4.2 < sum(draws) / len(draws) < 5.8  # Poisson(mean 4) + 1
    assert sample_n_steps(rng, replace(cfg, step_distribution="fixed")) == 32
    assert {sample_n_steps(rng, replace(cfg, step_distribution="uniform", max_train_steps=3))
            for _ in range(200)} == {1, 2, 3}
    cfg = replace(cfg, iterations=100, warmup=10)
    lr = [learning_rate(cfg, i) for i in range(cfg.iterations + 1)]
    assert lr[0] == pytest.approx(cfg.lr / cfg.warmup) and lr[cfg.warmup - 1] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lr[cfg.warmup:], lr[cfg.warmup + 1:]))  # cosine decay
    assert lr[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    with pytest.raises(ValueError):
        tiny_config(min_steps=0)


def test_finish_writes_a_loadable_model_and_report(tmp_path):
    cfg = tiny_config(iterations=4)
    result = train(cfg, tmp_path, progress=False)
    folder = finish(result, cfg)
    for name in ("config.json", "model.safetensors", "char_tokenizer.json", "REPORT.md", "accuracy.csv",
                 "loss_curve.csv", "loss_curve.svg", "recipe.json"):
        assert (folder / name).is_file(), name
    model = HookedLoopedTransformer.from_pretrained(str(folder))
    tokens = model.to_tokens("a=1;b=a;c=2;d=c;b?")
    torch.testing.assert_close(model(tokens), result.model(tokens))
    report = (folder / "REPORT.md").read_text()
    assert "| hops \\ steps | 1 | 2 | 4 |" in report
    assert TrainConfig.from_dict(__import__("json").loads((folder / "recipe.json").read_text())) == cfg


def test_recipes_are_well_formed():
    assert set(RECIPES) == {"varbind-looped", "varbind-baseline"}
    assert get_recipe("looped") == RECIPES["varbind-looped"]
    assert get_recipe("tl-loop/varbind-baseline") == RECIPES["varbind-baseline"]
    looped, base = (get_recipe(n).make_model_config() for n in ("looped", "baseline"))
    assert looped.d_model == base.d_model and looped.injection != "none" and looped.n_prelude_layers >= 1
    assert base.n_steps == 1 and base.effective_depth(1) == looped.effective_depth(6)
    recipes = [get_recipe(n) for n in ("looped", "baseline")]
    assert recipes[0].task == recipes[1].task and recipes[0].train_hops == recipes[1].train_hops  # same data
    with pytest.raises(KeyError):
        get_recipe("nope")


def test_a_checkpoint_from_before_a_new_config_field_resumes(tmp_path):
    """A field added to TrainConfig later (here ``recalls``) takes its default on resume."""
    cfg = tiny_config(checkpoint_every=2)
    train(cfg, tmp_path, progress=False, stop_at=4)
    state_file = tmp_path / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["recalls"]
    state_file.write_text(json.dumps(state))
    assert train(cfg, tmp_path, progress=False).iteration == cfg.iterations


def test_step_supervision_reads_out_every_step_like_step_logits(tmp_path):
    """The per-step training logits are ``model.step_logits`` (with gradients), and the targets
    follow one link per step."""
    cfg = tiny_config(task=dict(n_statements=4, encoding="statements"), step_supervision=True,
                      step_distribution="fixed", queries=2)
    model = build_model(cfg)
    task = cfg.make_task()
    problems = task.batch(random.Random(0), 8, [1, 2], "train")
    batch = task.encode_training(problems, random.Random(0), 2, [1, 2], n_steps=4)
    logits = step_logits_train(model, batch.tokens, 4, batch.positions)
    assert logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(logits, model.step_logits(batch.tokens, n_steps=4)[:, :, batch.positions])
    for p, targets in zip(problems, batch.step_answers[:, 0].tolist()):
        links = p.links()
        assert task.tokenizer.decode(targets) == "".join(links[min(r, len(links)) - 1] for r in range(1, 5))
    result = train(cfg, tmp_path, progress=False)
    assert math.isfinite(result.final_loss)
    with pytest.raises(ValueError, match="step_supervision"):
        tiny_config(step_supervision=True, backprop_steps=2)


def test_target_loss_stops_early_and_a_resumed_run_stays_stopped(tmp_path):
    # every loss is below 10, so the mean of the first 3 iterations reaches the target
    cfg = tiny_config(iterations=20, target_loss=10.0, target_window=3)
    result = train(cfg, tmp_path, progress=False)
    assert (result.iteration, result.reached_target) == (3, True)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 3
    again = train(cfg, tmp_path, progress=False)  # resuming reads the window back from the log
    assert (again.iteration, again.reached_target) == (3, True)
    with open(tmp_path / "train_log.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3]
    assert math.isclose(again.final_loss, result.final_loss, rel_tol=1e-4)
    # an unreachable target runs every iteration
    full = train(replace(cfg, iterations=5, target_loss=1e-9), tmp_path / "full", progress=False)
    assert (full.iteration, full.reached_target) == (5, False)
    with pytest.raises(ValueError, match="target_loss"):
        tiny_config(target_loss=0.0)
    with pytest.raises(ValueError, match="log_every"):
        tiny_config(target_loss=0.1, log_every=2)
