"""Splicing a module at every step: its hook points per site, cached, patchable, across depths."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import make_model
from transformer_lens.hook_points import HookPoint

from tl_loop import InputError


class TinySAE(nn.Module):
    """An SAE with its own hook points, as SAELens writes them."""

    def __init__(self, d: int, n: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W_enc = nn.Parameter(torch.randn(d, n, generator=gen) * 0.3)
        self.W_dec = nn.Parameter(torch.randn(n, d, generator=gen) * 0.3)
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_output = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.hook_sae_acts_post(torch.relu(x @ self.W_enc))
        return self.hook_sae_output(acts @ self.W_dec)


def test_splice_runs_at_every_step_with_hook_points_per_site(tokens):
    model = make_model("prelude_coda_add")
    sae = TinySAE(model.cfg.d_model)
    model.splice("hook_resid_post", sae, layer_in_cycle=1)
    sites = [f"blocks.{i}.hook_resid_post" for i in model.schedule.loop_indices(1)]
    _, cache = model.run_with_cache(tokens)
    for name in sites:  # one activation per step, none overwritten
        assert f"{name}.hook_sae_acts_post" in cache
        torch.testing.assert_close(cache[name], cache[f"{name}.hook_sae_output"])
        block_in = cache[name.replace("hook_resid_post", "hook_resid_mid")] + cache[name.replace("hook_resid_post", "hook_mlp_out")]
        torch.testing.assert_close(cache[f"{name}.hook_sae_acts_post"], torch.relu(block_in @ sae.W_enc))
    acts = [cache[f"{n}.hook_sae_acts_post"] for n in sites]
    assert not torch.equal(acts[0], acts[1])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in make_model("prelude_coda_add").parameters())

    # patching a site's activation changes the output
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[(f"{sites[0]}.hook_sae_acts_post", lambda x, hook: x * 0)])
    assert not torch.allclose(zeroed, model(tokens))

    # depth changes: sites follow, hooks on a site's point stay with its name
    fired: list[str] = []
    model.add_hook(f"{sites[0]}.hook_sae_acts_post", lambda x, hook: fired.append(hook.name))
    _, deep = model.run_with_cache(tokens, n_steps=5)
    assert len([n for n in deep.keys() if n.endswith("hook_sae_acts_post")]) == 5
    assert fired == [f"{sites[0]}.hook_sae_acts_post"]
    model.reset_hooks()

    model.unsplice("hook_resid_post")
    plain = make_model("prelude_coda_add")
    torch.testing.assert_close(model(tokens), plain(tokens))
    assert not any("hook_sae" in n for n in model.hook_dict)


def test_splice_on_a_loop_hook_and_bad_calls(tokens):
    model = make_model("plain")
    model.splice("hook_state_out", TinySAE(model.cfg.d_model))
    _, cache = model.run_with_cache(tokens)
    assert [n for n in cache.keys() if n.endswith("hook_sae_output")] == [
        f"loops.{r}.hook_state_out.hook_sae_output" for r in range(model.cfg.n_steps)
    ]
    with pytest.raises(InputError, match="no hook point"):
        model.splice("hook_resid_postt", TinySAE(model.cfg.d_model))
    with pytest.raises(InputError, match="layer_in_cycle"):
        model.splice("hook_resid_post", TinySAE(model.cfg.d_model), layer_in_cycle=7)
    with pytest.raises(InputError, match="already registers"):
        model.splice("hook_state_out", TinySAE(model.cfg.d_model))
    model.splice("hook_resid_pre", nn.Linear(model.cfg.d_model, 3))
    with pytest.raises(InputError, match="shaped like its input"):
        model(tokens)
