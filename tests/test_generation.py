"""``model.generate``: parity with the reference generation fixtures (Huginn, Ouro), HRM-Text
against ``transformers``' own ``generate``, cached against uncached decoding, left padding,
exit rules, hooks while decoding, the ragged replay and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model, rel_dev
from safetensors.torch import load_file

from tl_loop import HookedLoopedTransformer, InputError, LoopedActivationCache, UnsupportedError, exits

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = 1e-4  # relative to the largest magnitude of the expected logits (fixtures/README.md)
GREEDY = dict(do_sample=False, stop_at_eos=False, verbose=False, return_details=True)


def reference(name: str) -> tuple[HookedLoopedTransformer, dict, dict[str, torch.Tensor]]:
    folder = FIXTURES / name
    meta = json.loads((folder / "generation" / "generation.json").read_text())
    return (HookedLoopedTransformer.from_pretrained(folder), meta,
            load_file(str(folder / "generation" / "generation.safetensors")))


@pytest.fixture(scope="module")
def raven():
    return reference("raven_tiny")


@pytest.fixture(scope="module")
def ouro():
    return reference("ouro_tiny")


RAVEN_CRITERIA = {"entropy-diff": exits.entropy_diff, "argmax-stability": exits.argmax_stability}


def raven_call(run_name: str, run: dict, tensors: dict) -> dict:
    """Our arguments for a recorded raven run."""
    kwargs = dict(max_new_tokens=run["max_new_tokens"] if "max_new_tokens" in run else 8, n_steps=4, **GREEDY)
    kwargs["init_state"] = tensors[f"{run_name}.init_state"] if "seeded" in run_name else "zeros"
    if "criterion" in run:
        kwargs["exit"] = RAVEN_CRITERIA[run["criterion"]](run["exit_threshold"])
    return kwargs


def check_run(out, tensors: dict, run_name: str, exit_steps: list[int] | None) -> None:
    assert torch.equal(out.tokens, tensors[f"{run_name}.sequences"]), run_name
    dev = rel_dev(out.logits[0], tensors[f"{run_name}.logits"])
    assert dev <= PARITY, f"{run_name}: logits deviate {dev:.3g}"
    if exit_steps is not None:
        assert out.exit_step[0].tolist() == exit_steps, run_name


@pytest.mark.parametrize("run_name", ["greedy_zero.0", "greedy_seeded.0", "greedy_zero.1", "greedy_seeded.1",
                                      "adaptive_entropy", "adaptive_argmax"])
def test_raven_reference_generation(raven, run_name):
    model, meta, tensors = raven
    run = meta["runs"][run_name]
    out = model.generate(tensors[run["prompt"]], **raven_call(run_name, run, tensors))
    used = run.get("num_steps_used")
    check_run(out, tensors, run_name, [n - 1 for n in used] if used else [3] * 8)
    if "criterion" in run:  # the criterion's values where the reference computed them
        checked = tensors[f"{run_name}.checked"]
        ours = out.exit_values[0][checked]
        assert torch.allclose(ours, tensors[f"{run_name}.exit_values"][checked], rtol=5e-3, atol=1e-5)
        assert bool(out.exit_values[0][~checked].isnan().all())


@pytest.mark.parametrize("run_name", ["greedy_zero.0", "greedy_seeded.1"])
def test_raven_uncached_equals_cached_at_fixed_depth(raven, run_name):
    model, meta, tensors = raven
    run = meta["runs"][run_name]
    out = model.generate(tensors[run["prompt"]], use_past_kv_cache=False, **raven_call(run_name, run, tensors))
    check_run(out, tensors, run_name, [3] * 8)


OURO_EXITS = {"greedy.0": None, "greedy.1": None, "early_exit": exits.gate(0.5), "exit_at_step": exits.at_step(1)}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("run_name", list(OURO_EXITS))
def test_ouro_reference_generation(ouro, run_name, use_cache):
    """Ouro runs every step for every token: cached and uncached both equal the reference."""
    model, meta, tensors = ouro
    run = meta["runs"][run_name]
    out = model.generate(tensors[run["prompt"]], max_new_tokens=8, exit=OURO_EXITS[run_name],
                         use_past_kv_cache=use_cache, **GREEDY)
    check_run(out, tensors, run_name, run["exit_step"])


def test_huginn_adaptive_cached_differs_from_uncached_but_replays(raven):
    """Adaptive Huginn decoding has no uncached equivalent (earlier tokens' depths are not kept
    by a fresh pass), but the ragged replay reproduces it exactly."""
    model, meta, tensors = raven
    run = meta["runs"]["adaptive_entropy"]
    kwargs = raven_call("adaptive_entropy", run, tensors)
    cached = model.generate(tensors[run["prompt"]], **kwargs)
    uncached = model.generate(tensors[run["prompt"]], use_past_kv_cache=False, **kwargs)
    assert not torch.equal(cached.exit_step, uncached.exit_step)
    logits, cache = cached.replay(model)
    prompt = cached.prompt_length
    assert rel_dev(logits[:, prompt - 1:], cached.logits) <= PARITY
    assert isinstance(cache, LoopedActivationCache)
    assert cache["blocks.0.hook_resid_post"].shape[1] == cached.tokens.shape[1] - 1


# ---------------------------------------------------------------------------- every layout
LAYOUTS = ["plain", "prelude_coda_add", "huginn_like", "ouro_like", "olmo_retro_like", "hrm_like", "layernorm_plain_mlp"]


@pytest.mark.parametrize("variant", LAYOUTS)
def test_cached_equals_uncached_at_fixed_depth(variant):
    model = make_model(variant)
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    kwargs = dict(max_new_tokens=6, exit=exits.at_step(model.cfg.n_steps - 1), **GREEDY)
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert rel_dev(cached.logits, uncached.logits) <= 1e-5
    # the logits of the uncached forward on the final sequence
    full = model(cached.tokens[:, :-1], init_state=cached.init_state)
    assert rel_dev(cached.logits, full[:, prompt.shape[1] - 1:]) <= 1e-5


@pytest.mark.parametrize("variant", ["plain", "huginn_like", "ouro_like"])
def test_left_padded_batch_equals_each_row_alone(variant):
    model = make_model(variant)
    rows = [torch.tensor([3, 1, 4, 1, 5, 9]), torch.tensor([2, 7, 1])]
    tokens = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, 6 - len(row):], mask[i, 6 - len(row):] = row, 1
    rule = exits.kl(0.05) if variant != "ouro_like" else None
    batch = model.generate(tokens, attention_mask=mask, max_new_tokens=5, exit=rule, **GREEDY)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=5, exit=rule, **GREEDY)
        assert torch.equal(batch.new_tokens[i], alone.new_tokens[0])
        assert torch.equal(batch.exit_step[i], alone.exit_step[0])
        assert rel_dev(batch.logits[i], alone.logits[0]) <= 1e-5


def test_adaptive_exit_varies_per_token_and_replays():
    model = make_model("huginn_like", n_steps=6)
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    out = model.generate(prompt, max_new_tokens=8, exit=exits.latent_diff(0.5), **GREEDY)
    assert out.exit_step.min() < out.exit_step.max()  # a run that exercises ragged depths
    logits, cache = out.replay(model)
    assert rel_dev(logits[:, prompt.shape[1] - 1:], out.logits) <= 1e-5
    assert cache.model.n_steps == 6 and "blocks.12.hook_resid_post" in cache


def test_continuous_compute_starts_from_the_previous_state():
    model = make_model("huginn_like")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    out = model.generate(prompt, max_new_tokens=4, continuous_compute=True, **GREEDY)
    plain = model.generate(prompt, max_new_tokens=4, **GREEDY)
    assert torch.equal(out.init_state[:, :5], plain.init_state[:, :5])
    assert not torch.equal(out.init_state[:, 5:], plain.init_state[:, 5:])
    logits, _ = out.replay(model)  # the states used are recorded, so the run replays
    assert rel_dev(logits[:, 4:], out.logits) <= 1e-5


def test_n_steps_and_exit_rules_on_the_step_count():
    model = make_model("plain")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, n_steps=5, **GREEDY)
    assert out.n_steps == 5 and out.exit_step.tolist() == [[4, 4, 4]] and model.cfg.n_steps == 3
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, exit="at_step:1", **GREEDY)
    assert out.exit_step.tolist() == [[1, 1, 1]]


# ---------------------------------------------------------------------------- hooks
def test_hooks_fire_during_decoding_with_per_iteration_names():
    model = make_model("prelude_coda_add")
    seen: list[tuple[str, tuple]] = []
    hook = lambda act, hook: seen.append((hook.name, tuple(act.shape)))  # noqa: E731
    names = ["blocks.1.hook_resid_post", "loops.2.hook_state_out"]
    model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3, fwd_hooks=[(n, hook) for n in names], **GREEDY)
    d = model.cfg.d_model
    assert seen == [(n, (1, p, d)) for p in (4, 1, 1) for n in names]
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", hook)]):
        seen.clear()
        model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3, **GREEDY)
    assert [s[1][-2:] for s in seen] == [(4, 4), (1, 5), (1, 6)]
    assert not model._any_hooks_attached()


def test_hook_edits_change_the_generation():
    model = make_model("plain")
    prompt = torch.tensor([[1, 2, 3]])
    clean = model.generate(prompt, max_new_tokens=4, **GREEDY)
    zeroed = model.generate(prompt, max_new_tokens=4, fwd_hooks=[("loops.1.hook_state_out", lambda a, hook: a * 0)], **GREEDY)
    assert rel_dev(zeroed.logits, clean.logits) > 1e-3


# ---------------------------------------------------------------------------- sampling and stopping
def test_sampling_is_seeded_and_stops_at_eos():
    model = make_model("plain")
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    kwargs = dict(max_new_tokens=6, do_sample=True, top_k=10, top_p=0.9, temperature=0.8, freq_penalty=0.5,
                  stop_at_eos=False, verbose=False)
    torch.manual_seed(0)
    a = model.generate(prompt, **kwargs)
    torch.manual_seed(0)
    b = model.generate(prompt, **kwargs)
    assert torch.equal(a, b) and a.shape == (2, 9)
    greedy = model.generate(prompt, max_new_tokens=6, **GREEDY)
    eos = int(greedy.new_tokens[0, 1])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=True, eos_token_id=[eos, 0],
                         verbose=False, return_details=True)
    first = (out.new_tokens == eos).int().argmax(1)
    assert bool((out.new_tokens[0, int(first[0]):] == eos).all())
    assert int(out.exit_step[0, -1]) == -1 or out.new_tokens.shape[1] < 6


# ---------------------------------------------------------------------------- HRM-Text vs transformers
def test_hrm_text_generate_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "HrmTextForCausalLM"):
        pytest.skip("this transformers has no HRM-Text")
    from test_loading_hrm_text import build_hf

    hf = build_hf()
    hf.save_pretrained(str(tmp_path))
    ours = HookedLoopedTransformer.from_pretrained(tmp_path)
    prompt = torch.tensor([[5, 17, 3, 42, 8]])
    ref = hf.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                      pad_token_id=0)
    out = ours.generate(prompt, max_new_tokens=6, **GREEDY)
    assert torch.equal(out.tokens, ref.sequences)
    assert rel_dev(out.logits[0], torch.cat(ref.logits)) <= PARITY


# ---------------------------------------------------------------------------- errors
def test_errors():
    model = make_model("plain")
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="past the context"):
        model.generate(prompt, max_new_tokens=model.cfg.n_ctx, **GREEDY)
    with pytest.raises(UnsupportedError, match="exit gate"):
        model.generate(prompt, exit=exits.gate(0.5), **GREEDY)
    with pytest.raises(InputError, match="threshold"):
        exits.entropy_diff("0.1")
    with pytest.raises(InputError, match="int"):
        exits.argmax_stability(1.5)
    with pytest.raises(InputError, match="does not exist"):
        model.generate(prompt, exit=exits.at_step(3), **GREEDY)
    with pytest.raises(InputError, match="init_state has shape"):
        model.generate(prompt, max_new_tokens=4, init_state=torch.zeros(1, 5, model.cfg.d_model), **GREEDY)
    for bad in (dict(temperature=0), dict(top_k=0), dict(top_p=1.5), dict(freq_penalty=-1.0)):
        with pytest.raises(InputError):
            model.generate(prompt, do_sample=True, stop_at_eos=False, verbose=False, **bad)
    with pytest.raises(InputError, match="eos_token_id"):
        model.generate(prompt, do_sample=False, verbose=False)
    with pytest.raises(InputError, match="unknown exit rule"):
        model.generate(prompt, exit="entropy:0.1", **GREEDY)
    with pytest.raises(InputError, match="left padding"):
        model.generate(torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), **GREEDY)


def test_exit_rule_parsing():
    assert exits.parse("entropy-diff:0.01") == exits.entropy_diff(0.01)
    assert exits.parse("argmax_stability:3") == exits.argmax_stability(3)
    assert exits.parse("kl") == exits.kl()
    assert exits.parse(None) is None


# ---------------------------------------------------------------------------- CLI and figure
def test_cli_generate_prints_text_and_steps(capsys):
    from tl_loop.cli import main

    code = main(["generate", str(FIXTURES / "raven_tiny"), "--tokens", "1,2,3,4", "--max-new-tokens", "5",
                 "--steps", "4", "--exit", "entropy_diff:0.012"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out[0].split()) == 9  # prompt + 5 token ids
    assert "n_steps=4, exit: entropy_diff(0.012)" in out[2]
    steps = [int(line.split()[-1]) for line in out[3:8]]
    assert all(1 <= s <= 4 for s in steps)


def test_cli_generate_errors_are_one_line(capsys):
    from tl_loop.cli import main

    assert main(["generate", str(FIXTURES / "raven_tiny"), "--tokens", "1,2", "--exit", "gate:0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tl-loop generate: error:") and "exit gate" in err and "\n" not in err


def test_generation_figure(tmp_path):
    from tl_loop.plot import generation_steps_figure

    model = make_model("huginn_like", n_steps=6)
    out = model.generate(torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=8, exit=exits.latent_diff(0.5), **GREEDY)
    fig = generation_steps_figure(out)
    heat, bars = fig.data
    assert list(bars.y) == out.steps_used[0].tolist()
    assert list(heat.text[0]) == [str(t) for t in out.new_tokens[0].tolist()]
    assert "exit: latent_diff(0.5)" in fig.layout.title.text
    fig.write_html(tmp_path / "generation.html")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_feedforward_generate_equals_transformers(tmp_path, name):
    """A feedforward checkpoint at its own depth decodes as ``transformers``' ``generate``, left
    padding included."""
    pytest.importorskip("transformers")
    from test_loading_feedforward import _hf_model

    hf = _hf_model(name)
    hf.save_pretrained(str(tmp_path))
    hf.generation_config.eos_token_id = None  # decode every token, as stop_at_eos=False
    ours = HookedLoopedTransformer.from_pretrained(tmp_path)
    prompt = torch.tensor([[0, 0, 5, 17, 3, 42, 8], [11, 12, 13, 14, 15, 16, 17]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    ref = hf.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                      output_logits=True, pad_token_id=0)
    out = ours.generate(prompt, attention_mask=mask, max_new_tokens=6, **GREEDY)
    assert torch.equal(out.tokens, ref.sequences)
    assert rel_dev(out.logits, torch.stack(ref.logits, 1)) <= PARITY


def test_ouro_replay_reads_out_each_token_at_its_exit(ouro):
    model, meta, tensors = ouro
    out = model.generate(tensors["prompt.0"], max_new_tokens=8, exit=exits.gate(0.5), **GREEDY)
    logits, cache = out.replay(model, names_filter=lambda n: n.endswith("hook_exit_gate"))
    assert rel_dev(logits[:, out.prompt_length - 1:], out.logits) <= PARITY
    assert sorted(cache.keys()) == [f"loops.{r}.hook_exit_gate" for r in range(3)]


def test_text_prompts_and_return_types():
    model = HookedLoopedTransformer.from_pretrained("tl-loop/varbind-looped")
    text = model.generate("a=1;b=a;?b", max_new_tokens=1, do_sample=False, verbose=False, stop_at_eos=False)
    assert text == "<bos>a=1;b=a;?b1"  # the answer of this 1-hop problem
    texts = model.generate(["a=1;b=a;?b", "c=2;?c"], max_new_tokens=1, do_sample=False, verbose=False,
                           stop_at_eos=False, return_type="str")
    assert isinstance(texts, list) and len(texts) == 2
    alone = model.generate("c=2;?c", max_new_tokens=1, do_sample=False, verbose=False, stop_at_eos=False)
    assert texts == ["<bos>a=1;b=a;?b1", "<pad>" + alone] and alone == "<bos>c=2;?c2"  # padded on the left
    tokens = model.generate("c=2;?c", max_new_tokens=1, do_sample=False, verbose=False, stop_at_eos=False,
                            return_type="tokens")
    assert tokens.ndim == 2 and tokens.dtype == torch.long


def test_random_initial_state_does_not_depend_on_the_length():
    """Huginn's random initial state: the prompt gets forward(prompt)'s, each decoded position a
    state of its own, whatever max_new_tokens (so a shorter run is a prefix of a longer one)."""
    model = make_model("huginn_like")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    short = model.generate(prompt, max_new_tokens=3, **GREEDY)
    long = model.generate(prompt, max_new_tokens=6, **GREEDY)
    assert torch.equal(long.tokens[:, :8], short.tokens)
    assert torch.equal(long.init_state[:, :7], short.init_state)
    assert rel_dev(short.logits[:, 0], model(prompt)[:, -1]) <= 1e-6
