"""Real scale on CPU: bounded-memory loading, config following .to(), cache offload and save/load.

The GPU paths (``device="cuda"``) are the same code with another device; the tests that need one
skip without it. Memory figures are measured in ``benchmarks/real_scale.py``, never here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_model
from tl_loop import HookedLoopedTransformer
from tl_loop.cache import LoopedActivationCache
from tl_loop.cache_io import hook_kind
from tl_loop.errors import CheckpointError, InputError
from tl_loop.loading import lazy
from tl_loop.loading.lazy import LazyTensors

FIXTURES = Path(__file__).parent / "fixtures"
RAVEN = FIXTURES / "raven_tiny"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")


# ---------------------------------------------------------------------------------- loading
def test_lazy_tensors_read_one_tensor_converted(tmp_path):
    save_file({"w": torch.randn(3, 4, dtype=torch.bfloat16), "ids": torch.arange(5)}, str(tmp_path / "a.safetensors"))
    t = LazyTensors.from_files([tmp_path / "a.safetensors"], dtype=torch.float64)
    assert set(t) == {"w", "ids"} and t.stored_dtype() == torch.bfloat16
    assert t["w"].dtype == torch.float64 and t["ids"].dtype == torch.int64  # integers keep theirs
    assert t.stored_bytes() == 3 * 4 * 2 + 5 * 8 and t.loaded_bytes() == 3 * 4 * 8 + 5 * 8


def test_lazy_tensors_name_a_corrupt_shard(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        LazyTensors.from_files([tmp_path / "bad.safetensors"])


def test_loaded_parameters_own_their_memory():
    """Each parameter is a copy (never a view into a shard's memory map that closes)."""
    model = HookedLoopedTransformer.from_pretrained(str(RAVEN), dtype="stored")
    again = HookedLoopedTransformer.from_pretrained(str(RAVEN), dtype="stored")
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert p.device.type == "cpu" and p.is_contiguous(), name
        assert p.data_ptr() != q.data_ptr()
        assert torch.equal(p, q), name
    with torch.no_grad():
        model.embed.W_E.add_(1.0)  # writable, and the checkpoint file is untouched
    assert not torch.equal(model.embed.W_E, again.embed.W_E)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_loading_converts_and_matches_float32(dtype):
    ref = HookedLoopedTransformer.from_pretrained(str(RAVEN))
    model = HookedLoopedTransformer.from_pretrained(str(RAVEN), dtype=dtype)
    assert model.cfg.dtype == getattr(torch, dtype)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == model.cfg.dtype, name
        assert torch.equal(p, q.to(p.dtype)), name


def test_loading_on_meta_is_refused_clearly():
    with pytest.raises(InputError, match="device='meta'"):
        HookedLoopedTransformer.from_pretrained(str(RAVEN), device="meta")


def test_loading_refuses_what_clearly_does_not_fit(monkeypatch):
    monkeypatch.setattr(lazy, "available_bytes", lambda device: 1000)
    with pytest.raises(CheckpointError, match=r"need 0\.\d+ GiB on cpu, which has 0\.00 GiB free"):
        HookedLoopedTransformer.from_pretrained(str(RAVEN))
    model = HookedLoopedTransformer.from_pretrained(str(RAVEN), check_memory=False)  # the way out
    assert model.cfg.n_steps > 0


def test_available_bytes_reads_free_ram():
    free = lazy.available_bytes("cpu")
    assert free is None or free > 0
    assert lazy.available_bytes("meta") is None


@needs_cuda
def test_loading_straight_to_gpu():
    model = HookedLoopedTransformer.from_pretrained(str(RAVEN), device="cuda", dtype="stored")
    assert all(p.is_cuda for p in model.parameters()) and model.cfg.device.startswith("cuda")
    ref = HookedLoopedTransformer.from_pretrained(str(RAVEN), dtype="stored")
    tokens = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(tokens.cuda()).cpu(), ref(tokens), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------- devices
def test_to_dtype_and_device_keep_the_config_true():
    model = make_model("huginn_like")
    tokens = torch.tensor([[1, 2, 3, 4]])
    expected = model(tokens).double()
    model.to(torch.float64)
    assert model.cfg.dtype == torch.float64 and all(p.dtype == torch.float64 for p in model.parameters())
    torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)
    model.float()
    assert model.cfg.dtype == torch.float32
    model.bfloat16()
    assert model.cfg.dtype == torch.bfloat16
    model.to("meta")
    assert model.cfg.device == "meta" and model.cfg.n_devices == 1


def test_patching_allocates_on_cfg_device_after_a_cast():
    """TransformerLens's patching builds its result tensor from cfg.device/cfg.dtype-typed outputs."""
    from transformer_lens import patching

    model = make_model("plain").to(torch.float64)
    clean, corrupt = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 2, 3]])
    _, cache = model.run_with_cache(clean)
    result = patching.get_act_patch_resid_pre(model, corrupt, cache, lambda logits: logits[0, -1, 0])
    assert result.device.type == model.cfg.device and result.shape == (model.cfg.n_layers, 3)


# ---------------------------------------------------------------------------------- caches
def test_run_with_cache_offloads_each_activation():
    """``device=`` sends every cached activation elsewhere while the model computes where it is
    (here computing on the CPU, caching on ``meta``; on a GPU, ``device="cpu"``)."""
    model = make_model("ouro_like")
    logits, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), device="meta")
    assert logits.device.type == "cpu"
    assert len(cache) > 0 and all(t.is_meta for t in cache.values())


def test_hook_kind():
    assert hook_kind("blocks.12.attn.hook_pattern") == "blocks.attn.hook_pattern"
    assert hook_kind("loops.3.hook_state_out") == "loops.hook_state_out"
    assert hook_kind("hook_embed") == "hook_embed"


def test_cache_save_load_roundtrip_lazily_per_kind(tmp_path):
    model = make_model("huginn_like")
    tokens = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    _, cache = model.run_with_cache(tokens, n_steps=5)
    cache.save(tmp_path / "c")
    files = {p.name for p in (tmp_path / "c").glob("*.safetensors")}
    assert "blocks.hook_resid_post.safetensors" in files and "loops.hook_state_out.safetensors" in files

    model.set_n_steps(2)  # the saved cache keeps its own depth
    loaded = LoopedActivationCache.load(tmp_path / "c", model)
    assert loaded.model.n_steps == 5 and len(loaded) == len(cache)
    assert loaded.cache_dict.loaded_kinds() == set()
    assert torch.equal(loaded["blocks.7.hook_resid_post"], cache["blocks.7.hook_resid_post"])
    assert loaded.cache_dict.loaded_kinds() == {"blocks.hook_resid_post"}
    # analyses read through the lazy mapping exactly as through the in-memory one
    torch.testing.assert_close(loaded.decompose_resid(layer=6), cache.decompose_resid(layer=6))
    torch.testing.assert_close(loaded.stack_loop("hook_resid_post"), cache.stack_loop("hook_resid_post"))


def test_cache_saved_one_kind_at_a_time(tmp_path):
    model = make_model("plain")
    tokens = torch.tensor([[1, 2, 3]])
    folder = tmp_path / "c"
    for kind in ("hook_resid_post", "attn.hook_pattern"):
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(kind))
        cache.save(folder)
    loaded = LoopedActivationCache.load(folder, model)
    assert {hook_kind(n) for n in loaded} == {"blocks.hook_resid_post", "blocks.attn.hook_pattern"}
    with pytest.raises(InputError, match="already holds the hook kinds"):
        cache.save(folder)
    cache.save(folder, overwrite=True)


def test_cache_load_refuses_another_schedule(tmp_path):
    model = make_model("plain")
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), n_steps=4)
    cache.save(tmp_path / "c")
    _, other = model.run_with_cache(torch.tensor([[1, 2, 3]]), n_steps=2)
    with pytest.raises(InputError, match="n_steps = 4"):
        other.save(tmp_path / "c")
    different = make_model("prelude_coda_add")
    with pytest.raises(InputError, match="schedule"):
        LoopedActivationCache.load(tmp_path / "c", different)
    with pytest.raises(InputError, match="no saved cache"):
        LoopedActivationCache.load(tmp_path / "nothing", model)


@needs_cuda
@pytest.mark.parametrize("name", ["raven_tiny", "ouro_tiny", "retro_llama_tiny", "retro_olmo_tiny"])
def test_every_family_on_gpu_matches_cpu(name):
    """Forward, cache offload to the CPU, patching and a move back: the GPU run equals the CPU run."""
    from transformer_lens import patching

    cpu = HookedLoopedTransformer.from_pretrained(str(FIXTURES / name))
    gpu = HookedLoopedTransformer.from_pretrained(str(FIXTURES / name), device="cuda")
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    random_state = cpu.cfg.state_init == "random"  # the GPU's generator differs: give the state
    state = torch.randn(1, 5, cpu.cfg.d_model, generator=torch.Generator().manual_seed(0))
    logits, cache = gpu.run_with_cache(tokens.cuda(), device="cpu", **({"init_state": state.cuda()} if random_state else {}))
    ref_logits, ref_cache = cpu.run_with_cache(tokens, **({"init_state": state} if random_state else {}))
    torch.testing.assert_close(logits.cpu(), ref_logits, rtol=1e-4, atol=1e-4)
    assert all(t.device.type == "cpu" for t in cache.values())
    torch.testing.assert_close(cache["blocks.3.hook_resid_post"], ref_cache["blocks.3.hook_resid_post"], rtol=1e-4, atol=1e-4)

    if not random_state:  # TransformerLens's sweep runs the model without an initial state
        corrupt = torch.tensor([[5, 2, 3, 4, 1]])
        _, clean_gpu = gpu.run_with_cache(tokens.cuda())
        got = patching.get_act_patch_resid_pre(gpu, corrupt.cuda(), clean_gpu, lambda out: out[0, -1, 0])
        want = patching.get_act_patch_resid_pre(cpu, corrupt, ref_cache, lambda out: out[0, -1, 0])
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)
    gpu.to("cpu")
    assert gpu.cfg.device == "cpu"
