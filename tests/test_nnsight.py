"""nnsight on a looped model: every step's blocks are their own modules (``blocks.{i}``,
``loops.{r}``), so nnsight addresses a step by name instead of by call count."""

from __future__ import annotations

import pytest
import torch

from tl_loop import HookedLoopedTransformer

nnsight = pytest.importorskip("nnsight", reason="nnsight is not installed (pip install nnsight; .ci/run installs it in the TL 3.x environment)")


@pytest.fixture(scope="module")
def model() -> HookedLoopedTransformer:
    return HookedLoopedTransformer.from_pretrained("tl-loop/varbind-looped")


def test_per_step_reads_equal_the_cache(model):
    tokens = torch.randint(1, 900, (2, 11), generator=torch.Generator().manual_seed(0))
    sched, traced = model.schedule, nnsight.NNsight(model)
    steps = (1, 3, 6)
    a, b, c = (sched.index(r, 0) for r in steps)
    with traced.trace(tokens):  # accessed in execution order, as nnsight requires
        resid_a = traced.blocks[a].hook_resid_post.output.save()
        resid_b = traced.blocks[b].hook_resid_post.output.save()
        resid_c = traced.blocks[c].hook_resid_post.output.save()
        state = traced.loops[6].hook_state_out.output.save()
    resid = [resid_a, resid_b, resid_c]
    _, cache = model.run_with_cache(tokens)
    for r, value in zip(steps, resid):
        torch.testing.assert_close(value, cache[f"blocks.{sched.index(r, 0)}.hook_resid_post"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, cache["loops.6.hook_state_out"], rtol=1e-4, atol=1e-4)


def test_an_intervention_equals_the_same_patch_through_run_with_hooks(model):
    tokens = torch.randint(1, 900, (2, 11), generator=torch.Generator().manual_seed(1))
    i = model.schedule.index(2, 0)
    traced = nnsight.NNsight(model)
    with traced.trace(tokens):
        traced.blocks[i].hook_resid_post.output[:, -1] = 0
        out = traced.output.save()

    def zero(x, hook):
        x = x.clone()
        x[:, -1] = 0
        return x

    expected = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{i}.hook_resid_post", zero)])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, model(tokens), atol=1e-3)  # the patch matters
