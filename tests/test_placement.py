"""Placing a model's physical blocks over several devices (``model.place`` / ``device_map``).

Without a GPU: a map over the CPU only gives the unplaced model's numbers exactly; strategies
resolve over devices that need not exist (accelerate plans on shapes); the interpreter moves the
frame at each device boundary (recorded with a fake second device, and run for real with the
tail of the model on the meta device, where any tensor left behind raises); bad maps are refused.
With a GPU: a GPU / CPU split matches the CPU; with two GPUs: a split matches one GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tl_loop.placement as placement_mod
from tl_loop import HookedLoopedTransformer, LoopedConfig
from tl_loop.errors import InputError
from tl_loop.placement import Placement, infer_device_map, placement_units

FIXTURES = Path(__file__).parent / "fixtures"

CONFIGS = {
    "huginn_like": dict(n_prelude_layers=2, n_core_layers=2, n_coda_layers=1, n_steps=3, injection="linear",
                        norm_after_loop=True, state_init="random"),
    "ouro_like": dict(n_core_layers=2, n_steps=3, exit_gate=True, norm_between_steps=True),
    "hrm_like": dict(n_inner_layers=1, n_core_layers=1, n_steps=2, inner_cycles=2, injection="add"),
}


def _model(kind: str) -> HookedLoopedTransformer:
    cfg = LoopedConfig(d_model=32, d_head=8, d_vocab=50, n_ctx=32, **CONFIGS[kind])
    return HookedLoopedTransformer(cfg, seed=0)


@pytest.fixture(params=list(CONFIGS))
def model(request):
    try:
        return _model(request.param)
    except (ValueError, InputError) as e:  # a combination this LoopedConfig version refuses
        pytest.skip(f"{request.param}: {e}")


TOKENS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))


def _fake_split(model: HookedLoopedTransformer) -> HookedLoopedTransformer:
    """``model`` with a placement that puts the loop on a second CPU device object: every path
    that follows the placement moves at each boundary (no-op copies), numbers unchanged."""
    placed = copy.deepcopy(model)
    placement = Placement(placed)
    other = torch.device("cpu", 0)
    placement.blocks = {k: (other if k.startswith(("core", "inner")) else v) for k, v in placement.blocks.items()}
    placement.adapter = other if placement.adapter is not None else None
    placed._placement = placement
    return placed


# ---------------------------------------------------------------------------- CPU-only maps
def test_cpu_map_is_exact(model):
    ref_logits, ref_cache = model.run_with_cache(TOKENS)
    placed = copy.deepcopy(model).place({"": "cpu"})
    assert placed.cfg.device == "cpu" and placed.cfg.n_devices == 1
    assert set(placed.device_map) == set(placement_units(placed)) and set(placed.device_map.values()) == {"cpu"}
    logits, cache = placed.run_with_cache(TOKENS)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for name in ref_cache.keys():
        torch.testing.assert_close(cache[name], ref_cache[name], rtol=0, atol=0)


def test_forced_move_path_is_exact(model):
    """The placed code path (frame moves, context per device) on one device: the same numbers,
    generation included."""
    placed = copy.deepcopy(model)
    placed._placement = Placement(placed)  # as if the weights spanned devices
    torch.testing.assert_close(placed(TOKENS), model(TOKENS), rtol=0, atol=0)
    mask = torch.ones_like(TOKENS)
    mask[0, :3] = 0
    torch.testing.assert_close(placed(TOKENS, attention_mask=mask), model(TOKENS, attention_mask=mask), rtol=0, atol=0)
    kw = dict(max_new_tokens=4, do_sample=False, verbose=False, return_type="tokens", stop_at_eos=False)
    assert torch.equal(placed.generate(TOKENS[:1], **kw), model.generate(TOKENS[:1], **kw))
    torch.testing.assert_close(placed.step_logits(TOKENS), model.step_logits(TOKENS), rtol=0, atol=0)


def test_fixture_loads_with_device_map():
    folder = FIXTURES / "raven_tiny"
    expected = load_file(str(folder / "expected.safetensors"))
    plain = HookedLoopedTransformer.from_pretrained(str(folder))
    for device_map, max_memory in (({"": "cpu"}, None), ({"embed": "cpu", "prelude": "cpu", "": "cpu"}, None),
                                   ("auto", {"cpu": "4GiB"})):
        placed = HookedLoopedTransformer.from_pretrained(str(folder), device_map=device_map, max_memory=max_memory)
        assert placed.cfg.device == "cpu"
        with torch.no_grad():
            a = placed(expected["input_ids"], init_state=expected["init_state"])
            b = plain(expected["input_ids"], init_state=expected["init_state"])
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        kw = dict(max_new_tokens=3, do_sample=False, verbose=False, return_type="tokens", init_state="zeros",
                  stop_at_eos=False)
        assert torch.equal(placed.generate(expected["input_ids"][:1], **kw), plain.generate(expected["input_ids"][:1], **kw))


def test_device_and_device_map_together_refused():
    with pytest.raises(InputError, match="not both"):
        HookedLoopedTransformer.from_pretrained(str(FIXTURES / "raven_tiny"), device="cpu", device_map="auto")


# ---------------------------------------------------------------------------- map resolution
def test_auto_splits_over_two_devices_in_order():
    cfg = LoopedConfig(d_model=64, d_head=16, d_vocab=1000, n_prelude_layers=2, n_core_layers=4, n_coda_layers=2,
                       n_steps=3, injection="linear")
    with torch.device("meta"):  # planning allocates nothing
        model = HookedLoopedTransformer(cfg, init_weights=False)
    for strategy in ("auto", "balanced"):
        resolved = infer_device_map(model, strategy, max_memory={0: "1GiB", 1: "1GiB"})
        assert list(resolved) == list(placement_units(model))  # every unit, in execution order
        devices = list(resolved.values())
        assert set(devices) == {0, 1} and devices == sorted(devices)  # blocks in order, split once
        assert resolved["embed"] == 0 and resolved["unembed"] == 1
    tight = infer_device_map(model, "sequential", max_memory={0: 200_000, 1: "1GiB"})
    assert list(tight.values()) == sorted(tight.values())


def test_prefix_keys_and_most_specific_wins(model):
    resolved = infer_device_map(model, {"": "cpu", "core": 1, "core.0": 0})
    assert resolved["core.0"] == 0 and all(v == 1 for k, v in resolved.items() if k.startswith("core.") and k != "core.0")
    assert resolved["embed"] == "cpu"


@pytest.mark.parametrize(
    "device_map, match",
    [
        ({"embed": "cpu"}, "places no device for"),
        ({"": "cpu", "blocks.3": "cpu"}, "'blocks.3', which is no module"),
        ({"": "cpu", "core.7": "cpu"}, "'core.7', which is no module"),
        ({"": "disk"}, "offloading is not supported"),
        ({"": "meta"}, "offloading is not supported"),
        ({"": "nonsense"}, "is not a torch device"),
        ({"": 7}, "not available"),
        ({"": "cuda:5"}, "not available"),
        ("everywhere", "device_map='everywhere'"),
    ],
)
def test_bad_maps_refused(device_map, match):
    model = _model("huginn_like")
    with pytest.raises(InputError, match=match):
        model.place(device_map)
    assert model.cfg.n_devices == 1 and model.device_map["core.0"] == "cpu"


def test_tied_unembedding_follows_embed():
    cfg = LoopedConfig(d_model=16, d_head=8, d_vocab=20, n_core_layers=1, tie_embeddings=True)
    model = HookedLoopedTransformer(cfg)
    assert "unembed" not in placement_units(model)
    with pytest.raises(InputError, match="tied to the embedding"):
        model.place({"": "cpu", "unembed": "cpu"})


# ---------------------------------------------------------------------------- the moves
def test_frame_moves_at_each_boundary(monkeypatch):
    """Two CPU device objects (``torch.device('cpu', 0) != torch.device('cpu')``): every operation
    on the other one asks for the move, which the CPU makes a no-op."""
    model = _model("huginn_like")
    a, b = torch.device("cpu"), torch.device("cpu", 0)
    placement = Placement(model)
    placement.blocks = {k: (b if k.startswith("core") else a) for k in placement.blocks}
    placement.adapter = b
    model._placement = placement
    moves = []
    real = placement_mod.move_frame

    def record(frame, device):
        moves.append((device, frame.index))
        real(frame, device)

    import tl_loop.execution as execution

    monkeypatch.setattr(execution, "move_frame", record)
    model(TOKENS)
    to_b = [m for m in moves if m[0] == b]
    to_a = [m for m in moves if m[0] == a]
    # every core block and adapter runs on b, everything else on a: the frame is asked to move
    # at every operation with weights, and the move happens at each boundary (3 steps: a->b, b->a)
    n_steps, n_core = model.cfg.n_steps, model.cfg.n_core_layers
    assert len(to_b) == n_steps * (n_core + 1)  # adapter + core blocks, every step
    assert len(to_a) >= 2 + 1 + 1  # prelude blocks, ln_loop_out, coda ...


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tail_on_meta_runs_without_device_errors(kind):
    """Embedding and prelude on the CPU, everything from the loop on on the meta device: a tensor
    the move missed would raise 'not on the expected device'. Hooks see their block's device, and
    a hook returning a tensor from another device is moved to the hooked activation's. (Logits
    go back to the embedding's device, which a meta tensor cannot: ``return_type=None``.)"""
    model = _model(kind)
    head = {"embed": "cpu", "prelude": "cpu"}
    units = placement_units(model)
    device_map = {u: head.get(u.split(".")[0], "meta") for u in units}
    monkey = pytest.MonkeyPatch()
    monkey.setattr(placement_mod, "parse_device", lambda value, key="": torch.device(value))
    try:
        model.place(device_map)
    finally:
        monkey.undo()
    assert model.cfg.device == "cpu" and model.cfg.n_devices == 2
    seen = {}

    def record(act, hook):
        seen[hook.name] = act.device
        return torch.zeros(act.shape)  # on the CPU: must be moved to the activation's device

    first_loop = model.cfg.n_prelude_layers
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    names.append("ln_final.hook_normalized")
    assert model.run_with_hooks(TOKENS, return_type=None, fwd_hooks=[(n, record) for n in names]) is None
    assert seen["ln_final.hook_normalized"].type == "meta"
    names.pop()
    for i, name in enumerate(names):
        assert seen[name].type == ("cpu" if i < first_loop else "meta"), name


def test_to_gathers_a_placed_model():
    model = _model("huginn_like")
    model._placement = Placement(model)
    model.to(torch.float64)
    assert model._placement is None  # one device: the plain path again
    assert model.cfg.dtype == torch.float64


# ---------------------------------------------------------------------------- GPUs
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@requires_cuda
def test_cuda_map_matches_cpu():
    model = _model("huginn_like")
    gpu = copy.deepcopy(model).place({"": 0})
    torch.testing.assert_close(gpu(TOKENS.cuda()).cpu(), model(TOKENS), rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_gpu_cpu_split_matches_cpu(kind):
    """One GPU is enough for a real split: the first half of the units on it, the rest on the CPU."""
    model = _model(kind)
    units = list(placement_units(model))
    split = copy.deepcopy(model).place({u: (0 if k < len(units) // 2 else "cpu") for k, u in enumerate(units)})
    assert split.cfg.n_devices == 2 and split.cfg.device == "cuda:0"
    torch.testing.assert_close(split(TOKENS.cuda()).cpu(), model(TOKENS), rtol=1e-4, atol=1e-4)
    _, c1 = split.run_with_cache(TOKENS.cuda())
    _, c0 = model.run_with_cache(TOKENS)
    for name in c0.keys():
        torch.testing.assert_close(c1[name].cpu(), c0[name], rtol=1e-4, atol=1e-4)
    layer = model.cfg.n_layers - 1
    torch.testing.assert_close(c1.decompose_resid(layer).cpu(), c0.decompose_resid(layer), rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=4, do_sample=False, verbose=False, return_type="tokens", stop_at_eos=False)
    assert torch.equal(split.generate(TOKENS[:1].cuda(), **kw).cpu(), model.generate(TOKENS[:1], **kw))


@requires_two_gpus
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_two_gpu_split_matches_one(kind):
    model = _model(kind).to("cuda:0")
    units = list(placement_units(model))
    half = len(units) // 2
    split = copy.deepcopy(model).place({u: (0 if k < half else 1) for k, u in enumerate(units)})
    assert split.cfg.n_devices == 2 and split.cfg.device == "cuda:0"
    tokens = TOKENS.cuda()
    torch.testing.assert_close(split(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    _, c1 = split.run_with_cache(tokens)
    _, c0 = model.run_with_cache(tokens)
    for name in c0.keys():
        torch.testing.assert_close(c1[name], c0[name], rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=4, do_sample=False, verbose=False, return_type="tokens", stop_at_eos=False)
    assert torch.equal(split.generate(tokens[:1], **kw), model.generate(tokens[:1], **kw))


def test_patching_sweeps_on_the_move_path():
    """The batched patching sweep (frames recorded and stacked at ``on_op``) and TransformerLens's
    own patching give the same numbers on the placed code path."""
    import tl_loop.patching as lp
    from transformer_lens import patching as tl_patching

    model = _model("huginn_like")
    placed = _fake_split(model)
    clean, corrupted = TOKENS[:1], TOKENS[1:]
    metric = lambda logits: logits[0, -1, 3]  # noqa: E731
    for m in (model, placed):
        _, m.clean_cache = m.run_with_cache(clean)
    for sweep in (lp.get_act_patch_cycle, lp.get_act_patch_cycle_batched, lp.get_act_patch_state_batched):
        kw = {"verbose": False} if sweep is not lp.get_act_patch_cycle else {}
        a = sweep(model, corrupted, model.clean_cache, metric, **kw)
        b = sweep(placed, corrupted, placed.clean_cache, metric, **kw)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    a = lp.get_act_patch_resid_pre_batched(model, corrupted, model.clean_cache, metric, verbose=False)
    b = lp.get_act_patch_resid_pre_batched(placed, corrupted, placed.clean_cache, metric, verbose=False)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    a = tl_patching.get_act_patch_resid_pre(model, corrupted, model.clean_cache, metric)
    b = tl_patching.get_act_patch_resid_pre(placed, corrupted, placed.clean_cache, metric)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_exact_attribution_on_the_move_path(kind):
    model = _model(kind)
    placed = _fake_split(model)
    _, cache = model.run_with_cache(TOKENS)
    _, placed_cache = placed.run_with_cache(TOKENS)
    layer = model.cfg.n_layers - 1
    for fn in (lambda c: c.decompose_resid(layer, return_labels=True),
               lambda c: c.decompose_resid(layer, mlp_input=True, return_labels=True),
               lambda c: c.stack_head_results(layer, return_labels=True)):
        (a, la), (b, lb) = fn(cache), fn(placed_cache)
        assert la == lb
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    kw = dict(max_new_tokens=3, do_sample=False, verbose=False, return_type="tokens", stop_at_eos=False)
    assert torch.equal(placed.generate(TOKENS[:1], **kw), model.generate(TOKENS[:1], **kw))


@pytest.mark.parametrize("name", ["raven_tiny", "ouro_tiny", "retro_llama_tiny", "retro_olmo_tiny"])
def test_checkpoint_tensors_go_straight_to_their_module(name, monkeypatch):
    """Tracing the conversion on shapes gives each checkpoint tensor its module's device (fake CPU
    device objects: one per unit); a model loaded from that plan reads each tensor there."""
    from tl_loop.loading import build_config, checkpoint_devices, detect_family
    from tl_loop.loading.files import read_config, weight_files
    from tl_loop.loading.lazy import LazyTensors

    folder = FIXTURES / name
    tensors = LazyTensors.from_files(weight_files(folder, False)[0], dtype=torch.float32)
    fam = detect_family(read_config(folder), set(tensors))
    cfg = build_config(fam, read_config(folder), set(tensors), folder)
    with torch.device("meta"):
        model = HookedLoopedTransformer(cfg, init_weights=False)
    devices = {u: torch.device("cpu", k) for k, u in enumerate(placement_units(model))}
    plan = checkpoint_devices(fam, cfg, tensors, devices)
    assert plan is not None and set(plan) >= set(tensors) - {"freqs_cis"}
    embed_names = [n for n in plan if n.endswith(("wte.weight", "embed_tokens.weight"))]
    assert embed_names and all(plan[n] == devices["embed"] for n in embed_names)
    core = [n for n in plan if ".core_block.1." in n or ".layers.1." in n]
    assert core and all(plan[n] == devices["core.1"] for n in core)
    reads = {}
    real = LazyTensors.__getitem__

    def record(self, key):
        reads[key] = self.device_of.get(key, self.device)
        return real(self, key)

    monkeypatch.setattr(LazyTensors, "__getitem__", record)
    HookedLoopedTransformer.from_pretrained(str(folder), device_map=devices)  # torch keeps CPU tensors on "cpu"
    assert {k: reads[k] for k in plan} == plan  # every tensor read onto its module's device


def test_untraceable_conversion_stages_on_the_host(monkeypatch):
    import tl_loop.loading as loading

    monkeypatch.setattr(loading, "checkpoint_devices", lambda *a: None)
    folder = FIXTURES / "ouro_tiny"
    expected = load_file(str(folder / "expected.safetensors"))
    model = HookedLoopedTransformer.from_pretrained(str(folder), device_map={"": "cpu"})
    torch.testing.assert_close(model(expected["input_ids"]), expected["logits"], rtol=1e-4, atol=1e-4)
