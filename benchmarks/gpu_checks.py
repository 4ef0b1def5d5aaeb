"""Every GPU check in one short run: parity, hooks, bf16, patching, generation, placement, timings.

    python benchmarks/gpu_checks.py                       # on cuda, every check, within 240 s
    python benchmarks/gpu_checks.py --device cpu --d-model 128 --steps 2 --seq 32 --batch 1
                                                          # the same checks on the CPU (a smoke run, ~5 s;
                                                          # the GPU-sized timing model takes minutes there)
    python benchmarks/gpu_checks.py --time-limit 120 --json-out gpu.jsonl

Prints one JSON object per line (``{"check": ..., "ok": ..., figures}``) and writes them to
``--json-out``. Offline: the reference fixtures (``tests/fixtures``: tiny checkpoints of each
family with the upstream reference's outputs) and small random models only. A check that would
start after ``--time-limit`` seconds is reported as skipped; the whole run stays under the limit
plus the check in flight (each is seconds on a GPU).

Checks (``D`` = ``--device``):

* ``env``: torch, CUDA, the GPUs.
* ``fixture_parity``: each fixture loaded on D vs the reference logits and vs the same model on
  the CPU (relative deviation: max |difference| / max |reference|; target 1e-4).
* ``hooks_cache``: ``run_with_cache`` on D (hook count, cache on D, largest deviation of any cached
  activation from the CPU's) and a ``run_with_hooks`` ablation that changes the logits.
* ``bf16_parity``: each fixture in bfloat16 on D vs the float32 reference (bound 0.05).
* ``patching``: ``get_act_patch_cycle_batched`` on D vs the CPU, and its time.
* ``generation``: greedy decoding on D with the KV cache vs the CPU, and vs the reference's
  recorded tokens where the fixture has them; tokens per second.
* ``placement``: each fixture split over two devices (``device_map``: two GPUs, or with one GPU
  that GPU and the CPU) vs one GPU: logits, cache, exact attribution, generation; and
  ``device_map="auto"`` over every GPU.
* ``timing``: forward tokens per second of a random Huginn-layout model (d_model 1024, 8
  physical blocks, 32 steps: 132 effective layers as Huginn-0125) on D, in float32 and bfloat16
  (and split over two GPUs where there are two), ``run_with_cache`` of every ``resid_post``, and a
  batched ``get_act_patch_cycle_batched`` sweep over it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_loop import HookedLoopedTransformer, LoopedConfig  # noqa: E402

FAMILIES = ("raven_tiny", "ouro_tiny", "retro_llama_tiny", "retro_olmo_tiny")


def rel_dev(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float().cpu(), ref.detach().float().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Run:
    """Collects the JSON lines and keeps the time limit."""

    def __init__(self, limit: float, out: Path | None) -> None:
        self.start, self.limit, self.out, self.lines = time.monotonic(), limit, out, []

    def check(self, name: str, fn, *args, **kwargs) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed > self.limit:
            self.emit({"check": name, "ok": None, "skipped": f"time limit ({self.limit:.0f} s) reached"})
            return
        t0 = time.monotonic()
        try:
            record = fn(*args, **kwargs)
        except Exception as e:  # a check that fails reports and the run goes on
            record = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
        record = {"check": name, **record, "seconds": round(time.monotonic() - t0, 3)}
        self.emit(record)

    def emit(self, record: dict) -> None:
        line = json.dumps(record, default=str)
        print(line, flush=True)
        self.lines.append(line)
        if self.out is not None:
            self.out.write_text("\n".join(self.lines) + "\n")


# ---------------------------------------------------------------------------- fixtures
def load_fixture(folder: Path, **kwargs) -> tuple[HookedLoopedTransformer, dict]:
    from safetensors.torch import load_file

    expected = load_file(str(folder / "expected.safetensors"))
    return HookedLoopedTransformer.from_pretrained(str(folder), **kwargs), expected


def fixture_inputs(expected: dict, device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict]:
    kwargs = {"init_state": expected["init_state"].to(device, dtype)} if "init_state" in expected else {}
    return expected["input_ids"].to(device), kwargs


def check_env(device: str) -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    import transformer_lens

    return {"ok": True, "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformer_lens": getattr(transformer_lens, "__version__", "?"), "gpus": gpus,
            "memory_gib": [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1) for i in range(len(gpus))]}


def fixture_pair(folder: Path, device: str) -> tuple:
    """The fixture's model on ``device`` and on the CPU, its expected outputs, and the inputs for each."""
    on_device, expected = load_fixture(folder, device=device)
    on_cpu, _ = load_fixture(folder)
    return on_device, on_cpu, expected, fixture_inputs(expected, device), fixture_inputs(expected, "cpu")


def check_fixture_parity(folder: Path, device: str) -> dict:
    on_device, on_cpu, expected, (tokens, kw), (tokens_cpu, kw_cpu) = fixture_pair(folder, device)
    with torch.no_grad():
        logits = on_device(tokens, **kw)
        cpu = on_cpu(tokens_cpu, **kw_cpu)
    vs_ref, vs_cpu = rel_dev(logits, expected["logits"]), rel_dev(logits, cpu)
    return {"ok": vs_ref <= 1e-4 and vs_cpu <= 1e-4 and str(logits.device) == str(torch.device(device)),
            "fixture": folder.name, "dev_vs_reference": vs_ref, "dev_vs_cpu": vs_cpu, "cfg_device": on_device.cfg.device}


def check_hooks_cache(folder: Path, device: str) -> dict:
    model, on_cpu, expected, (tokens, kw), (tokens_cpu, kw_cpu) = fixture_pair(folder, device)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, **kw)
        _, cache_cpu = on_cpu.run_with_cache(tokens_cpu, **kw_cpu)
        worst = max(rel_dev(cache[k], cache_cpu[k]) for k in cache_cpu.keys() if cache_cpu[k].abs().max() > 0)
        on_device = all(str(v.device) == str(torch.device(device)) for v in cache.values())
        last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(last, lambda act, hook: act * 0)], **kw)
    return {"ok": on_device and worst <= 1e-3 and not torch.equal(ablated, logits), "fixture": folder.name,
            "hook_points": len(model.hook_dict), "cached": len(cache), "worst_cache_dev_vs_cpu": worst}


def check_bf16(folder: Path, device: str) -> dict:
    model, expected = load_fixture(folder, device=device, dtype="bfloat16")
    tokens, kw = fixture_inputs(expected, device, torch.bfloat16)
    with torch.no_grad():
        logits = model(tokens, **kw)
    dev = rel_dev(logits, expected["logits"])
    return {"ok": dev <= 0.05 and logits.dtype == torch.bfloat16, "fixture": folder.name, "dev_vs_fp32_reference": dev}


def check_patching(folder: Path, device: str) -> dict:
    from tl_loop.patching import get_act_patch_cycle_batched

    results, times = {}, {}
    for where in dict.fromkeys((device, "cpu")):
        model, expected = load_fixture(folder, device=where)
        tokens = expected["input_ids"][:1].to(where)
        corrupted = tokens.flip(-1)
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(tokens)
            answer = int(model(tokens)[0, -1].argmax())
            sync(where)
            t0 = time.perf_counter()
            results[where] = get_act_patch_cycle_batched(model, corrupted, clean_cache,
                                                         lambda logits: logits[:, -1, answer].mean(), verbose=False)
            sync(where)
            times[where] = time.perf_counter() - t0
    dev = rel_dev(results[device], results["cpu"])
    return {"ok": dev <= 1e-3, "fixture": folder.name, "cells": results[device].numel(), "dev_vs_cpu": dev,
            "sweep_seconds": times[device], "sweep_seconds_cpu": times["cpu"]}


def check_generation(folder: Path, device: str) -> dict:
    from safetensors.torch import load_file

    model, expected = load_fixture(folder, device=device)
    on_cpu, _ = load_fixture(folder)
    gen_file = folder / "generation" / "generation.safetensors"
    recorded = load_file(str(gen_file)) if gen_file.exists() else {}
    key = "greedy_zero.0" if "greedy_zero.0.sequences" in recorded else "greedy.0"
    prompt = recorded.get("prompt.0", expected["input_ids"][:1])
    n_new = 8
    kw = dict(max_new_tokens=n_new, do_sample=False, verbose=False, return_type="tokens", stop_at_eos=False)
    if "init_state" in expected or model.cfg.state_init == "random":
        kw["init_state"] = "zeros"
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(prompt.to(device), **kw)
    sync(device)
    seconds = time.perf_counter() - t0
    ref_cpu = on_cpu.generate(prompt, **kw)
    same_cpu = torch.equal(out.cpu(), ref_cpu)
    ref = recorded.get(f"{key}.sequences")
    same_ref = None if ref is None else torch.equal(out.cpu(), ref[:, : out.shape[1]])
    return {"ok": same_cpu and same_ref is not False, "fixture": folder.name, "same_as_cpu": same_cpu,
            "same_as_reference": same_ref, "new_tokens_per_s": n_new / seconds}


def _split_map(model: HookedLoopedTransformer, devices: list[int]) -> dict:
    from tl_loop.placement import placement_units

    units = list(placement_units(model))
    per = -(-len(units) // len(devices))
    return {u: devices[k // per] for k, u in enumerate(units)}


def check_placement(folder: Path, device: str) -> dict:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 1:
        return {"ok": None, "skipped": "needs a GPU (two for a GPU-GPU split), torch sees none", "fixture": folder.name}
    one, expected = load_fixture(folder, device="cuda:0")
    devices = [0, 1] if n >= 2 else [0, "cpu"]  # one GPU: split between it and the CPU
    split, _ = load_fixture(folder, device_map=_split_map(one, devices))
    auto, _ = load_fixture(folder, device_map="auto" if n >= 2 else {"": 0})
    tokens, kw = fixture_inputs(expected, "cuda:0")
    with torch.no_grad():
        ref, ref_cache = one.run_with_cache(tokens, **kw)
        logits, cache = split.run_with_cache(tokens, **kw)
        logits_auto = auto(tokens, **kw)
    worst = max(rel_dev(cache[k], ref_cache[k]) for k in ref_cache.keys() if ref_cache[k].abs().max() > 0)
    gen = dict(max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens", stop_at_eos=False)
    if one.cfg.state_init == "random":
        gen["init_state"] = "zeros"
    same_gen = torch.equal(split.generate(tokens[:1], **gen), one.generate(tokens[:1], **gen))
    layer = one.cfg.n_layers - 1
    attribution = rel_dev(cache.decompose_resid(layer), ref_cache.decompose_resid(layer))
    dev, dev_auto = rel_dev(logits, ref), rel_dev(logits_auto, ref)
    tol = 1e-5 if n >= 2 else 1e-4  # GPU vs CPU kernels for the CPU half
    return {"ok": dev <= tol and dev_auto <= tol and worst <= 10 * tol and attribution <= 10 * tol and same_gen,
            "fixture": folder.name, "devices": sorted({str(d) for d in split.device_map.values()}),
            "n_devices": split.cfg.n_devices, "dev_attribution": attribution, "dev_split_vs_one": dev, "dev_auto_vs_one": dev_auto,
            "worst_cache_dev": worst, "same_generation": same_gen, "auto_map": auto.device_map}


def huginn_layout(d_model: int, n_steps: int) -> HookedLoopedTransformer:
    """A random Huginn-0125-shaped model (2 prelude, 4 core, 2 coda blocks), at ``d_model``."""
    cfg = LoopedConfig(d_model=d_model, d_head=d_model // 16, d_vocab=8192, d_mlp=4 * d_model, n_ctx=4096,
                       n_prelude_layers=2, n_core_layers=4, n_coda_layers=2, n_steps=n_steps, max_steps=64,
                       injection="linear", norm_after_loop=True, state_init="random")
    return HookedLoopedTransformer(cfg, seed=0)


def check_timing(device: str, d_model: int, n_steps: int, batch: int, seq: int, sweep_seq: int) -> dict:
    from tl_loop.patching import get_act_patch_cycle_batched

    base = huginn_layout(d_model, n_steps)
    figures = {"ok": True, "effective_layers": base.cfg.n_layers, "d_model": d_model, "batch": batch, "seq": seq}
    tokens = torch.randint(0, base.cfg.d_vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to(device, dtype)
        name = str(dtype).removeprefix("torch.")
        with torch.no_grad():
            model(tokens)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                model(tokens)
            sync(device)
            figures[f"forward_tok_per_s_{name}"] = reps * batch * seq / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
            sync(device)
            figures[f"run_with_cache_resid_s_{name}"] = time.perf_counter() - t0
            del cache
        if device.startswith("cuda"):
            figures[f"peak_gib_{name}"] = torch.cuda.max_memory_allocated() / 2**30
        del model
    if torch.cuda.device_count() >= 2 and device.startswith("cuda"):  # the cost of the boundary moves
        split = copy.deepcopy(base).place(_split_map(base, [0, 1]))
        with torch.no_grad():
            split(tokens)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(3):
                split(tokens)
            torch.cuda.synchronize(0), torch.cuda.synchronize(1)
        figures["forward_tok_per_s_float32_two_gpus"] = 3 * batch * seq / (time.perf_counter() - t0)
        del split
    model = copy.deepcopy(base).to(device)
    short = tokens[:1, :sweep_seq]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(short)
        sync(device)
        t0 = time.perf_counter()
        result = get_act_patch_cycle_batched(model, short.flip(-1), clean_cache, lambda l: l[:, -1, 0].mean(),
                                             verbose=False)
        sync(device)
    figures.update(sweep_cells=result.numel(), sweep_seconds=time.perf_counter() - t0, sweep_seq=sweep_seq)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="where to run (default cuda)")
    parser.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "fixtures")
    parser.add_argument("--time-limit", type=float, default=240.0, help="start no check after this many seconds")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--d-model", type=int, default=1024, help="timing model width (Huginn-0125: 5280)")
    parser.add_argument("--steps", type=int, default=32, help="timing model steps (132 effective layers at 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--sweep-seq", type=int, default=16)
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"check": "env", "ok": False, "error": "--device cuda but torch sees no CUDA GPU"}))
        return 2
    run = Run(args.time_limit, args.json_out)
    device = args.device
    run.check("env", check_env, device)
    folders = [args.fixtures / f for f in FAMILIES if (args.fixtures / f).exists()]
    for name, fn in (("fixture_parity", check_fixture_parity), ("hooks_cache", check_hooks_cache),
                     ("bf16_parity", check_bf16)):
        for folder in folders:
            run.check(name, fn, folder, device)
    run.check("patching", check_patching, args.fixtures / "raven_tiny", device)
    for folder in folders[:2]:  # the fixtures with recorded generations
        run.check("generation", check_generation, folder, device)
    for folder in folders:
        run.check("placement", check_placement, folder, device)
    run.check("timing", check_timing, device, args.d_model, args.steps, args.batch, args.seq, args.sweep_seq)
    failed = [json.loads(line) for line in run.lines if json.loads(line).get("ok") is False]
    run.emit({"check": "summary", "ok": not failed, "failed": [f["check"] + ":" + str(f.get("fixture", "")) for f in failed],
              "total_seconds": round(time.monotonic() - run.start, 1)})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
