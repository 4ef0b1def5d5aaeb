"""Released checkpoints at their real shapes (random weights): loading memory, speed, cache memory.

``write`` builds a checkpoint shaped like a released model in that family's own format (sharded
bf16 safetensors + index + config.json; random weights, written shard by shard so writing
holds one shard), once. ``measure`` then runs each measurement in a fresh subprocess and prints a
JSON line per measurement:

* ``load``      -- ``from_pretrained(dtype=...)``: seconds, peak resident set (``VmHWM``) over
                   the checkpoint's bytes, and the growth of the peak over the resident set
                   just before loading (imports excluded) over the same bytes;
* ``forward``   -- forward tokens/s at the checkpoint's default depth (one prompt of ``--seq``
                   tokens, median of ``--repeats``), and the same run's floor: every dense kernel
                   call the forward made (``F.linear``, ``matmul``, ``einsum``, ``bmm``,
                   ``scaled_dot_product_attention``), recorded once with its very tensors and
                   replayed bare in the same order, timed in turn with the forward. The ratio
                   forward / replay is what the library adds over its matrix products (norms,
                   RoPE, hook points, Python), independent of how loaded the machine is;
* ``cache``     -- peak growth of ``run_with_cache`` with ``names_filter`` = ``hook_resid_post``
                   and of ``analysis.run_streaming(ResidualStats())``, each over a plain forward
                   in the same process (peak growth measured from the same resident set), with
                   the bytes the cache holds;
* ``generate``  -- greedy ``model.generate`` of ``--new`` tokens after the ``--seq``-token prompt,
                   with the KV cache and without (``use_past_kv_cache=False``), in the same
                   process, in turn; ``--steps`` sets the depth (0: the checkpoint's default).
                   ``decode_tokens_per_second`` leaves out the prompt's pass (a 1-token call timed
                   on its own).

    python benchmarks/real_scale.py write ouro-1.4b /tmp/ckpt/ouro      # 2.9 GB on disk
    python benchmarks/real_scale.py measure /tmp/ckpt/ouro --dtype stored
    python benchmarks/real_scale.py measure /tmp/ckpt/ouro --dtype float32 --only load
    python benchmarks/real_scale.py measure /tmp/ckpt/ouro --only generate --seq 16 --new 16
    python benchmarks/real_scale.py smoke          # every measurement on a tiny checkpoint

Shapes (``SHAPES``): Huginn-0125 (3.5B: n_embd 5280, 55 heads, 2 + 4 + 2 layers, 32 steps = 132
effective layers), Ouro-1.4B (24 layers x 4 steps = 96), HRM-Text-1B (the transformers defaults:
hidden 1536, 16 layers per stack, H_cycles 2 x L_cycles 3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

#: family, config.json seed (the released model's values) and the tensor names the family's
#: detection needs before any tensor exists
SHAPES: dict[str, tuple[str, dict, set[str]]] = {
    "huginn-0125": ("huginn", {"model_type": "huginn_raven", "architectures": ["RavenForCausalLM"]},
                    {"transformer.core_block.0.norm_3.weight"}),
    "ouro-1.4b": ("ouro", {
        "model_type": "ouro", "architectures": ["OuroForCausalLM"], "vocab_size": 49152, "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "use_sliding_window": False, "total_ut_steps": 4, "early_exit_threshold": 1.0,
    }, set()),
    "hrm-text-1b": ("hrm_text", {}, set()),  # filled from transformers.HrmTextConfig()
}
#: a tiny Ouro layout, for ``smoke`` (seconds)
SHAPES["tiny"] = ("ouro", {**SHAPES["ouro-1.4b"][1], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16},
                  set())

SHARD_BYTES = 2 * 10**9


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    """Return freed heap to the system, then reset ``VmHWM`` to the current resident set (Linux)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _seed_config(shape: str) -> tuple[str, dict, set[str]]:
    family, raw, names = SHAPES[shape]
    if family == "hrm_text":
        from transformers import HrmTextConfig

        raw = {k: v for k, v in HrmTextConfig().to_dict().items() if v is not None}
        raw["architectures"] = ["HrmTextForCausalLM"]
    return family, raw, names


def write(shape: str, folder: Path, seed: int = 0) -> None:
    """Write a ``shape``-shaped checkpoint with random bf16 weights, in shards of ~2 GB."""
    from safetensors.torch import save_file

    from tl_loop import HookedLoopedTransformer
    from tl_loop.loading import get_family

    family, raw, names = _seed_config(shape)
    fam = get_family(family)
    cfg = fam.to_config(raw, names)
    cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        model = HookedLoopedTransformer(cfg, init_weights=False)
    config_json, tensors = fam.export(model)  # meta tensors: names and shapes, no memory
    config_json["torch_dtype"] = config_json["dtype"] = "bfloat16"
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names_in_shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name in names_in_shard:
            t = tensors[name]
            if t.device.type != "meta":  # a real buffer the family computes (Huginn's freqs_cis)
                data[name] = t.contiguous()
            elif name.endswith(("norm.weight", "_norm.weight")) or ".norm_" in name or "layernorm" in name:
                data[name] = torch.ones(t.shape, dtype=torch.bfloat16)
            else:
                data[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(data, str(folder / file), metadata={"format": "pt"})
        del data
    total = sum(t.numel() * (2 if t.device.type == "meta" else t.element_size()) for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config_json, indent=1))
    print(json.dumps({"shape": shape, "folder": str(folder), "shards": len(shards), "bytes": total}))


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _load(folder: Path, dtype: str):
    from tl_loop import HookedLoopedTransformer

    return HookedLoopedTransformer.from_pretrained(str(folder), dtype=dtype)


def measure_load(folder: Path, dtype: str) -> dict:
    import tl_loop.loading
    import tl_loop.model  # noqa: F401
    from tl_loop.loading import families  # noqa: F401

    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    model = _load(folder, dtype)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ckpt = checkpoint_bytes(folder)
    return {"what": "load", "dtype": dtype, "seconds": round(seconds, 2), "checkpoint_bytes": ckpt,
            "model_bytes": weights, "rss_before": before, "peak_rss": peak,
            "peak_over_checkpoint": round(peak / ckpt, 3), "growth_over_checkpoint": round((peak - before) / ckpt, 3),
            "growth_over_model": round((peak - before) / weights, 3)}


def _tokens(model, seq: int) -> torch.Tensor:
    return torch.randint(0, min(model.cfg.d_vocab, 30000), (1, seq), generator=torch.Generator().manual_seed(0))


#: the dense kernels a forward's floor is made of
_KERNELS = {torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.einsum,
            torch.bmm, torch.baddbmm, torch.nn.functional.scaled_dot_product_attention}


class _KernelRecorder(torch.overrides.TorchFunctionMode):
    """Record every dense kernel call (function, arguments) a forward makes, keeping its tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _KERNELS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _replay(calls: list[tuple]) -> float:
    start = time.perf_counter()
    for func, args, kwargs in calls:
        func(*args, **kwargs)
    return time.perf_counter() - start


def measure_forward(folder: Path, dtype: str, seq: int, repeats: int, steps: int = 0) -> dict:
    model = _load(folder, dtype)
    if steps:
        model.set_n_steps(steps, force=True)  # hook points, schedule and program follow
    tokens = _tokens(model, seq)
    times, floors = [], []
    with torch.inference_mode():
        recorder = _KernelRecorder()
        with recorder:
            model(tokens)  # warm-up, and the kernel calls it makes
        calls = recorder.calls
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
            floors.append(_replay(calls))
    med = sorted(times)[len(times) // 2]
    floor = sorted(floors)[len(floors) // 2]
    ratios = sorted(t / f for t, f in zip(times, floors))
    return {"what": "forward", "dtype": dtype, "seq": seq, "n_steps": model.cfg.n_steps,
            "effective_layers": model.cfg.n_layers, "median_seconds": round(med, 3),
            "tokens_per_second": round(seq / med, 3), "kernel_calls": len(calls),
            "kernel_replay_seconds": round(floor, 3), "forward_over_kernels": round(ratios[len(ratios) // 2], 3),
            "times": [round(t, 3) for t in times], "replays": [round(f, 3) for f in floors]}


def measure_cache(folder: Path, dtype: str, seq: int, kind: str) -> dict:
    from tl_loop import analysis as A

    model = _load(folder, dtype)
    tokens = _tokens(model, seq)
    held = 0
    with torch.inference_mode():
        model(tokens)  # warm-up: allocator pools, RoPE tables
        _reset_peak()
        before = _status("VmRSS")
        if kind == "forward_mem":
            model(tokens)
        elif kind == "cache":
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
            held = sum(t.numel() * t.element_size() for t in cache.values())
        else:
            A.run_streaming(model, tokens, A.ResidualStats())
        growth = _status("VmHWM") - before
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    one_state = seq * model.cfg.d_model * next(model.parameters()).element_size()
    return {"what": kind, "dtype": dtype, "seq": seq, "n_steps": model.cfg.n_steps,
            "effective_layers": model.cfg.n_layers, "peak_growth_bytes": growth, "cache_bytes": held,
            "one_residual_state_bytes": one_state, "model_bytes": weights}


def measure_generate(folder: Path, dtype: str, seq: int, new: int, steps: int, uncached: bool = True) -> dict:
    model = _load(folder, dtype)
    tokens = _tokens(model, seq)
    kw: dict = {"do_sample": False, "stop_at_eos": False, "verbose": False, "return_type": "tokens"}
    if steps:
        kw["n_steps"] = steps
    with torch.inference_mode():
        model.generate(tokens, max_new_tokens=2, **kw)  # warm-up
        start = time.perf_counter()
        model.generate(tokens, max_new_tokens=1, **kw)  # the prompt's pass alone
        t_prefill = time.perf_counter() - start
        start = time.perf_counter()
        cached = model.generate(tokens, max_new_tokens=new, **kw)
        t_cached = time.perf_counter() - start
        result = {"what": "generate", "dtype": dtype, "seq": seq, "new_tokens": new,
                  "n_steps": steps or model.cfg.n_steps, "cached_seconds": round(t_cached, 3),
                  "cached_tokens_per_second": round(new / t_cached, 3), "prefill_seconds": round(t_prefill, 3),
                  "decode_tokens_per_second": round((new - 1) / max(t_cached - t_prefill, 1e-9), 3)}
        if uncached:
            start = time.perf_counter()
            plain = model.generate(tokens, max_new_tokens=new, use_past_kv_cache=False, **kw)
            t_plain = time.perf_counter() - start
            result.update(uncached_seconds=round(t_plain, 3), uncached_tokens_per_second=round(new / t_plain, 3),
                          uncached_over_cached=round(t_plain / t_cached, 2),
                          same_tokens=bool(torch.equal(cached, plain)))
    return result


def smoke(folder: Path) -> None:
    """Every measurement on a tiny Ouro-layout checkpoint written by ``write`` (seconds)."""
    write("tiny", folder)
    for what in ("load", "forward", "forward_mem", "cache", "stream", "generate"):
        print(json.dumps(_child([what, str(folder), "stored", "8", "1", "1", "", "4", "0", "1"])), flush=True)


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "_child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("shape", choices=sorted(SHAPES))
    w.add_argument("folder", type=Path)
    m = sub.add_parser("measure")
    m.add_argument("folder", type=Path)
    m.add_argument("--dtype", default="stored")
    m.add_argument("--seq", type=int, default=16)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    m.add_argument("--new", type=int, default=16, help="generate: new tokens")
    m.add_argument("--steps", type=int, default=0, help="forward / generate: depth (0: the checkpoint's default)")
    m.add_argument("--no-uncached", action="store_true", help="generate: skip use_past_kv_cache=False")
    m.add_argument("--only", choices=["load", "forward", "cache", "generate"], action="append")
    m.add_argument("--tree", default="", help="import tl_loop from this checkout (e.g. an older commit, as a baseline)")
    c = sub.add_parser("_child")
    c.add_argument("what")
    c.add_argument("folder", type=Path)
    c.add_argument("dtype")
    c.add_argument("seq", type=int)
    c.add_argument("repeats", type=int)
    c.add_argument("threads", type=int)
    c.add_argument("tree")
    c.add_argument("new", type=int)
    c.add_argument("steps", type=int)
    c.add_argument("uncached", type=int)
    k = sub.add_parser("smoke", help="every measurement on a tiny checkpoint (a check of this script)")
    k.add_argument("folder", type=Path, nargs="?", default=None)
    args = p.parse_args()
    if args.cmd == "write":
        write(args.shape, args.folder)
    elif args.cmd == "smoke":
        import tempfile

        if args.folder is not None:
            smoke(args.folder)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                smoke(Path(tmp))
    elif args.cmd == "_child":
        if args.tree:
            sys.path.insert(0, args.tree)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.what == "load":
            result = measure_load(args.folder, args.dtype)
        elif args.what == "forward":
            result = measure_forward(args.folder, args.dtype, args.seq, args.repeats, args.steps)
        elif args.what == "generate":
            result = measure_generate(args.folder, args.dtype, args.seq, args.new, args.steps, bool(args.uncached))
        else:  # memory of a plain forward ("forward_mem"), a filtered cache, a streamed analysis
            result = measure_cache(args.folder, args.dtype, args.seq, args.what)
        print(json.dumps(result))
    else:
        only = args.only or ["load", "forward", "cache"]
        jobs = [j for group in only for j in {"load": ["load"], "forward": ["forward"],
                                               "cache": ["forward_mem", "cache", "stream"],
                                               "generate": ["generate"]}[group]]
        for what in jobs:
            result = _child([what, str(args.folder), args.dtype, str(args.seq), str(args.repeats), str(args.threads),
                             args.tree, str(args.new), str(args.steps), str(int(not args.no_uncached))])
            print(json.dumps({**result, "tree": args.tree or "this"}), flush=True)


if __name__ == "__main__":
    main()
