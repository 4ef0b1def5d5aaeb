"""The batched resid_pre sweep equals TransformerLens's sweep, and the resumed forward pass it is
built on equals a full pass (values and hooks), in every layout variant."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, make_model
from transformer_lens import patching

from tl_loop import InputError
from tl_loop.program import RunFrame
from tl_loop.patching import get_act_patch_resid_pre_batched

TOL = dict(rtol=1e-5, atol=1e-5)


def prompts(model, batch: int = 2, n_pos: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 11) % model.cfg.d_vocab
    corrupted[:, -2] = (clean[:, -2] + 5) % model.cfg.d_vocab
    return clean, corrupted


def logit_diff(clean_logits: torch.Tensor):
    """Mean over the batch of the clean answer's logit minus another token's: depends on every
    row of the batch, so a batched sweep that mixed up rows would fail."""
    good = clean_logits[:, -1].argmax(-1)
    bad = (good + 1) % clean_logits.shape[-1]
    rows = torch.arange(good.shape[0])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        assert logits.shape[0] == good.shape[0], "the metric must see the corrupted batch's size"
        return (logits[rows, -1, good] - logits[rows, -1, bad]).mean()

    return metric


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_sweep_equals_transformer_lens(variant):
    model = make_model(variant)
    clean, corrupted = prompts(model)
    clean_logits, clean_cache = model.run_with_cache(clean)
    metric = logit_diff(clean_logits)
    expected = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert expected.shape == (model.cfg.n_layers, clean.shape[1])
    assert expected.std() > 1e-3, "the sweep must vary over layers and positions to test anything"
    n_cells = expected.numel()
    # one copy per pass; copies joining the pass at later layers (7 with 5 positions per
    # layer); the default; every cell in one pass
    for batch_size in (1, 7, None, n_cells):
        got = get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric, batch_size=batch_size)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m, b=batch_size: f"batch_size={b}: {m}")


def test_batched_sweep_patches_the_right_cells():
    """Single cells against patched runs done by hand (a hook replacing one position)."""
    model = make_model("prelude_coda_add")
    clean, corrupted = prompts(model, batch=1, n_pos=4)
    clean_logits, clean_cache = model.run_with_cache(clean)
    metric = logit_diff(clean_logits)
    got = get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric, batch_size=3)
    for layer, pos in [(0, 1), (3, 0), (model.cfg.n_layers - 1, 3), (5, 2)]:
        name = f"blocks.{layer}.hook_resid_pre"

        def patch(x, hook, pos=pos, name=name):
            x = x.clone()
            x[:, pos] = clean_cache[name][:, pos]
            return x

        by_hand = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)]))
        torch.testing.assert_close(got[layer, pos], by_hand, **TOL)


def test_clean_batch_of_one_broadcasts():
    model = make_model("hrm_like")
    clean, corrupted = prompts(model, batch=3)
    clean_logits, clean_cache = model.run_with_cache(clean[:1])
    metric = logit_diff(model(clean))
    expected = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    got = get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric, batch_size=4)
    torch.testing.assert_close(got, expected, **TOL)


def test_sweep_at_another_depth():
    model = make_model("huginn_like")
    clean, corrupted = prompts(model, batch=1)
    clean_logits, clean_cache = model.run_with_cache(clean, n_steps=5)
    metric = logit_diff(clean_logits)
    with model.steps(5):
        expected = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert model.cfg.n_steps == 3
    with pytest.raises(InputError, match="recorded at n_steps=5"):
        get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric)
    got = get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric, batch_size=6, n_steps=5)
    assert got.shape == (model.cfg.effective_depth(5), clean.shape[1])
    torch.testing.assert_close(got, expected, **TOL)
    assert model.cfg.n_steps == 3  # the default depth is back


def test_refusals():
    model = make_model("plain")
    clean, corrupted = prompts(model, batch=1)
    clean_logits, clean_cache = model.run_with_cache(clean)
    metric = logit_diff(clean_logits)
    with pytest.raises(InputError, match="scalar"):
        get_act_patch_resid_pre_batched(model, corrupted, clean_cache, lambda logits: logits[:, -1, 0])
    with pytest.raises(InputError, match="batch_size"):
        get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric, batch_size=0)
    with pytest.raises(InputError, match="same length"):
        get_act_patch_resid_pre_batched(model, corrupted[:, :-1], clean_cache, metric)
    with pytest.raises(InputError, match="has no activation"):
        _, partial = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_post"))
        get_act_patch_resid_pre_batched(model, corrupted, partial, metric)
    model.add_hook("blocks.0.hook_resid_post", lambda x, hook: None)
    with pytest.raises(InputError, match="hooks attached"):
        get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric)
    model.reset_hooks()
    model.train()
    with pytest.raises(InputError, match="eval mode"):
        get_act_patch_resid_pre_batched(model, corrupted, clean_cache, metric)


# ---------------------------------------------------------------------------- resumed passes
def record_frames(model, tokens: torch.Tensor) -> tuple[torch.Tensor, list[RunFrame]]:
    frames: list[RunFrame] = []
    stop = model.program.position("final_norm")
    out = model._execute(tokens, on_block=lambda f: frames.append(RunFrame(**vars(f))), stop=stop).x
    return out, frames


def resume(model, tokens, frame):
    """The stream entering ln_final, from ``frame`` on (the program interpreted from its block)."""
    program = model.program
    start = program.block_position(frame.index)
    return model._execute(tokens, frame=RunFrame(**vars(frame)), start=start, stop=program.position("final_norm")).x


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resumed_pass_equals_the_full_pass(variant, tokens):
    """From the frame before any effective layer the pass ends where a full pass ends (bit for
    bit), fires exactly the hooks the full pass fires from that layer's resid_pre on, in the same
    order, and leaves the recorded frame untouched."""
    model = make_model(variant)
    full, frames = record_frames(model, tokens)
    assert [f.index for f in frames] == list(range(model.cfg.n_layers))
    assert torch.equal(full, model(tokens, stop_at_layer=model.cfg.n_layers))

    for layer in range(model.cfg.n_layers):
        before = {k: getattr(frames[layer], k) for k in RunFrame.TENSORS}
        assert torch.equal(resume(model, tokens, frames[layer]), full), f"{variant}: layer {layer}"
        assert all(getattr(frames[layer], k) is v for k, v in before.items())

    fired: list[str] = []
    with model.hooks(fwd_hooks=[(lambda name: True, lambda x, hook: fired.append(hook.name))]):
        # read-only hooks keep the no-hook numbers, so resuming under them is bit for bit
        full_hooked = model(tokens)
        full_order = list(fired)
        for layer in range(model.cfg.n_layers):
            fired.clear()
            f = frames[layer]
            resumed = model(f.x, start_at_layer=layer, state=f.state, prelude_out=f.prelude_out,
                            inner_state=f.inner_state)
            assert torch.equal(resumed, full_hooked), f"{variant}: resuming at layer {layer} under hooks"
            tail = full_order[full_order.index(f"blocks.{layer}.hook_resid_pre") :]
            assert fired == tail, f"{variant}: hooks fired resuming at layer {layer}"


def test_resume_checks_the_layer(tokens):
    model = make_model("plain")
    with pytest.raises(InputError, match="start_at_layer=6 is out of range"):
        model(torch.zeros(2, 7, 32), start_at_layer=model.cfg.n_layers)
    injecting = make_model("prelude_coda_add")  # a later step injects the prelude output: it must be given
    with pytest.raises(InputError, match="inject 1 needs source.*prelude_out="):
        injecting(torch.zeros(2, 7, 32), start_at_layer=2)


def test_frames_carry_the_loop_state():
    """What a frame holds at a loop boundary: the HRM inner state and the injection source."""
    model = make_model("hrm_like")
    tokens = torch.tensor([[1, 2, 3]])
    # no pattern / norm-scale hooks: the cached run takes the same paths as the recording
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: not n.endswith(("pattern", "attn_scores", "scale")))
    _, frames = record_frames(model, tokens)
    sched = model.schedule
    for layer in sched:
        f = frames[layer.index]
        torch.testing.assert_close(f.x, cache[f"blocks.{layer.index}.hook_resid_pre"], rtol=0, atol=0)
        assert f.prelude_out is not None and f.state is not None and f.inner_state is not None
        if layer.stage == "core" and layer.layer_in_stack == 0:  # the step's injection just ran
            last_cycle = model.cfg.inner_cycles - 1
            torch.testing.assert_close(f.source, cache[f"loops.{layer.step}.inner.{last_cycle}.hook_state_out"])
            torch.testing.assert_close(f.state, cache[f"loops.{layer.step}.hook_state_in"])
