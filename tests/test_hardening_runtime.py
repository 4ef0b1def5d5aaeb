"""Runtime: the thread rule, read-outs at n_steps=0, bad call arguments (issue 15)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import make_model

from tl_loop import InputError, ModelInUseError
from tl_loop.patching import get_act_patch_resid_pre_batched

TOKENS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))


def hold_model(model, entered: threading.Event, release: threading.Event) -> threading.Thread:
    """A thread running ``model`` that stays inside its forward pass until ``release`` is set."""

    def wait(x, hook):
        entered.set()
        release.wait(20)
        return x

    thread = threading.Thread(target=lambda: model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", wait)]))
    thread.start()
    assert entered.wait(20)
    return thread


@pytest.mark.parametrize("call", [
    lambda m: m(TOKENS),
    lambda m: m(TOKENS, n_steps=5),
    lambda m: m.run_with_cache(TOKENS),
    lambda m: m.run_with_hooks(TOKENS),
    lambda m: m.set_n_steps(5),
    lambda m: m.step_logits(TOKENS),
    lambda m: m.add_hook("hook_embed", lambda x, hook: x),
    lambda m: m.run_to_layer(TOKENS, 2),
    lambda m: m.generate(TOKENS, max_new_tokens=2, do_sample=False, stop_at_eos=False, verbose=False),
    lambda m: get_act_patch_resid_pre_batched(m, TOKENS, m.run_with_cache(TOKENS)[1], lambda x: x.sum(),
                                              verbose=False),
], ids=["forward", "forward_n_steps", "run_with_cache", "run_with_hooks", "set_n_steps", "step_logits",
        "add_hook", "run_to_layer", "generate", "batched_sweep"])
def test_a_second_thread_gets_a_clear_error_while_the_model_runs(call):
    model = make_model("huginn_like")
    expected = model(TOKENS)
    entered, release = threading.Event(), threading.Event()
    holder = hold_model(model, entered, release)
    try:
        with pytest.raises(ModelInUseError, match="in use by another thread"):
            call(model)
    finally:
        release.set()
        holder.join(20)
    assert model.cfg.n_steps == 3 and not model._any_hooks_attached()
    torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=0)


@pytest.mark.parametrize("call", [
    lambda m: m(TOKENS, n_steps=1),
    lambda m: m.run_to_layer(TOKENS, 4),
    lambda m: m.generate(TOKENS, max_new_tokens=2, do_sample=False, stop_at_eos=False, verbose=False),
], ids=["forward", "run_to_layer", "generate"])
def test_a_call_never_mixes_its_depth_with_a_thread_leaving_steps(call, monkeypatch):
    """The collision behind a rare wrong answer: thread B is inside ``steps(1)``, thread A asks for
    one step, sees the depth already at 1, and B leaves (back to 3 steps) before A's pass starts
    (or A reads layer numbers, or decodes, while B's depth is in place). A call holds the model
    from its first look at the depth, so A is refused (or right), never run at B's depth."""
    model = make_model("ouro_like")
    expected = call(model)
    entered, release, left = threading.Event(), threading.Event(), threading.Event()

    def hold():
        with model.steps(1):
            entered.set()
            release.wait(20)
        left.set()

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(20)
    check = model._check_no_hidden_hooks

    def let_the_holder_leave():  # runs between a call's depth check and its pass
        release.set()
        assert left.wait(20)
        check()

    monkeypatch.setattr(model, "_check_no_hidden_hooks", let_the_holder_leave)
    try:
        out = call(model)
    except ModelInUseError:
        out = None
    finally:
        release.set()
        holder.join(20)
    assert out is None or _same(out, expected)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return all(torch.equal(x, y) for x, y in zip((a.x, a.state), (b.x, b.state)))


def test_concurrent_calls_are_correct_or_refused_never_wrong():
    model = make_model("ouro_like")
    expected = {n: model(TOKENS, n_steps=n) for n in (1, 4)}
    outcomes: list[str] = []

    def work(n):
        for _ in range(15):
            try:
                out = model(TOKENS, n_steps=n)
                outcomes.append("ok" if torch.equal(out, expected[n]) else "WRONG")
            except ModelInUseError:
                outcomes.append("refused")
            except Exception as e:  # noqa: BLE001 - any other error is a failure
                outcomes.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(n,)) for n in (1, 4, 1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(outcomes) <= {"ok", "refused"}, sorted(set(outcomes))
    assert "ok" in outcomes and len(outcomes) == 60


def test_calls_within_one_thread_nest_and_copies_run_in_parallel():
    model = make_model("plain")
    inner: list = []

    def call_again(x, hook):
        if not inner:  # the nested call fires this hook too
            inner.append(None)
            inner[0] = model(TOKENS, n_steps=1)

    model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", call_again)])
    assert inner[0].shape == (2, 7, 61)  # the same thread may call the model from a hook
    twin = copy.deepcopy(model)
    entered, release = threading.Event(), threading.Event()
    holder = hold_model(model, entered, release)
    try:
        torch.testing.assert_close(twin(TOKENS), make_model("plain")(TOKENS))  # a copy has its own guard
    finally:
        release.set()
        holder.join(20)


@pytest.mark.parametrize("variant", ["huginn_like", "ouro_like", "hrm_like"])
def test_read_outs_at_zero_steps_have_an_empty_step_axis(variant):
    model = make_model(variant)
    logits = model.step_logits(TOKENS, n_steps=0)
    assert logits.shape == (0, 2, 7, model.cfg.d_vocab) and logits.dtype == model.cfg.dtype
    assert model.step_logits(TOKENS, n_steps=2).shape == (2, 2, 7, model.cfg.d_vocab)
    with model.steps(0):
        assert model.step_logits(TOKENS).shape[0] == 0
    if model.cfg.exit_gate:
        assert model.exit_probabilities(TOKENS, n_steps=0).shape == (0, 2, 7)
        with pytest.raises(InputError, match="threshold exit needs at least one step"):
            model.threshold_exit_logits(TOKENS, n_steps=0)


def test_a_loss_on_one_token_raises():
    with pytest.raises(InputError, match="a loss needs at least 2 tokens per sequence.*got 1"):
        make_model("plain")(TOKENS[:, :1], return_type="loss")


@pytest.mark.parametrize("seed", [1.5, True, "3", torch.tensor(1.5)])
def test_init_seed_must_be_an_int(seed):
    with pytest.raises(InputError, match="init_seed must be an int"):
        make_model("huginn_like")(TOKENS, init_seed=seed)


def test_meta_device_tokens_are_refused():
    with pytest.raises(InputError, match="meta device"):
        make_model("plain")(TOKENS.to("meta"))


def test_hooks_are_clean_after_an_exception_at_another_depth():
    model = make_model("prelude_coda_add")
    expected = model(TOKENS)

    def boom(x, hook):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        model.run_with_hooks(TOKENS, n_steps=6, fwd_hooks=[("blocks.9.hook_resid_post", boom)])
    assert model.cfg.n_steps == 3 and not model._any_hooks_attached()
    torch.testing.assert_close(model(TOKENS, n_steps=6), model(TOKENS, n_steps=6))
    torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=0)


def test_a_hook_on_a_layer_the_depth_lacks_raises_until_reset():
    model = make_model("prelude_coda_add")
    model.set_n_steps(6)
    model.add_hook("blocks.11.hook_resid_post", lambda x, hook: x * 0)
    model.set_n_steps(2)
    with pytest.raises(InputError, match=r"hooks are attached to \['blocks.11.hook_resid_post'\].*n_steps=2"):
        model(TOKENS)
    model.reset_hooks()
    model(TOKENS)
    model.set_n_steps(6)
    assert not model._any_hooks_attached()
