"""SAELens SAEs per step of the loop: spliced at every step, cached per step, trained with
SAELens's own ``SAETrainer`` on states pooled across steps (TransformerLens 3.x environment)."""

from __future__ import annotations

import pytest
import torch

from tl_loop import HookedLoopedTransformer
from tl_loop.pretrained import task_for
from tl_loop.saes import activation_batches, sae_acts_by_step, step_activations

sae_lens = pytest.importorskip(
    "sae_lens", reason="sae-lens is not installed (SAELens 6 requires transformer-lens<4: run in the TL 3.x environment)"
)
from sae_lens import StandardSAE, StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402


@pytest.fixture(scope="module")
def model() -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained("tl-loop/varbind-looped")


@pytest.fixture(scope="module")
def tokens(model):
    task = task_for(model)
    return model.to_tokens([p.prompt for h in (1, 2, 3) for p in task.dataset(h, 16, split="train", seed=0)])


def random_sae(d_in: int, d_sae: int = 96, **kwargs) -> StandardSAE:
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae), **kwargs)
    with torch.no_grad():
        sae.b_enc.add_(0.05 * torch.randn(d_sae))
    return sae


def test_spliced_sae_runs_at_every_step_with_its_activations_cached_per_step(model, tokens):
    sae = random_sae(model.cfg.d_model)
    sched = model.schedule
    model.splice("hook_resid_post", sae, layer_in_cycle=0)
    try:
        _, cache = model.run_with_cache(tokens[:4])
    finally:
        model.unsplice()
    acts = sae_acts_by_step(cache)
    assert acts.shape == (sched.n_steps, 4, tokens.shape[1], sae.cfg.d_sae)
    for r in range(sched.n_steps):
        host = f"blocks.{sched.index(r, 0)}.hook_resid_post"
        x = cache[f"{host}.hook_sae_input"]  # the state arriving at step r (after earlier steps' SAEs)
        torch.testing.assert_close(acts[r], sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[host], sae.decode(acts[r]), rtol=1e-5, atol=1e-5)  # the stream carries the reconstruction
    assert f"blocks.{sched.index(0, 0) - 1}.hook_resid_post.hook_sae_input" not in cache.cache_dict  # prelude untouched


def test_error_term_keeps_the_model_exact(model, tokens):
    """SAELens's ``use_error_term``: the SAE output plus its error is the input, at every step."""
    sae = random_sae(model.cfg.d_model, use_error_term=True)
    expected = model(tokens[:4])
    model.splice("hook_resid_post", sae, layer_in_cycle=0)
    try:
        torch.testing.assert_close(model(tokens[:4]), expected, rtol=1e-4, atol=1e-4)
    finally:
        model.unsplice()


def test_sae_trained_with_saelens_on_states_pooled_across_steps(model, tokens):
    acts = step_activations(model, tokens)  # [step, tokens, d_model]
    assert acts.shape[0] == model.cfg.n_steps
    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=128, l1_coefficient=1.0))
    cfg = SAETrainerConfig(total_training_samples=64 * 150, train_batch_size_samples=64, lr=3e-3, lr_end=3e-3,
                           n_batches_for_norm_estimate=10, dead_feature_window=100, feature_sampling_window=100)

    def mse(s):
        with torch.no_grad():
            x = acts.reshape(-1, acts.shape[-1])
            return float(((s.decode(s.encode(x)) - x) ** 2).mean() / x.var(0).sum())

    before = mse(sae)
    trained = SAETrainer(cfg, sae, activation_batches(acts, 64)).fit()
    after = mse(trained)
    assert after < 0.5 * before, (before, after)
    # The trained SAE splices in like any SAELens SAE, and fires at every step.
    model.splice("hook_resid_post", trained, layer_in_cycle=0)
    try:
        _, cache = model.run_with_cache(tokens[:8])
    finally:
        model.unsplice()
    l0 = (sae_acts_by_step(cache) > 0).float().sum(-1).mean((1, 2))
    assert (l0 > 0).all()
