"""``benchmarks/real_scale.py`` on its tiny shape, in process: the script the real-shape figures
in ``benchmarks/RESULTS.md`` come from keeps working (its figures are never asserted here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "real_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    bench.write("tiny", folder)
    return folder


def test_write_is_a_sharded_loadable_checkpoint(bench, tiny):
    assert (tiny / "model.safetensors.index.json").exists() and (tiny / "config.json").exists()
    result = bench.measure_load(tiny, "stored")
    assert result["model_bytes"] > 0 and result["checkpoint_bytes"] >= result["model_bytes"]


def test_forward_and_its_kernel_replay(bench, tiny):
    result = bench.measure_forward(tiny, "stored", seq=6, repeats=1)
    assert result["n_steps"] == 4 and result["kernel_calls"] > 0
    assert result["kernel_replay_seconds"] > 0 and result["forward_over_kernels"] > 0


@pytest.mark.parametrize("kind", ["cache", "stream"])
def test_cache_and_stream_memory(bench, tiny, kind):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak resident set reset needs Linux /proc")
    result = bench.measure_cache(tiny, "stored", 6, kind)
    # a hook_resid_post per effective layer: 2 layers x 4 steps, 6 positions, d_model 64, bf16
    assert result["cache_bytes"] == (8 * 6 * 64 * 2 if kind == "cache" else 0)


def test_generate_cached_and_uncached_agree(bench, tiny):
    result = bench.measure_generate(tiny, "stored", seq=5, new=3, steps=0)
    assert result["same_tokens"] and result["uncached_seconds"] > 0 and result["decode_tokens_per_second"] > 0


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "smoke" in out.stdout and "measure" in out.stdout
