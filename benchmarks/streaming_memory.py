"""Peak memory of a 32-step analysis run: streamed (reducers in hooks) vs a full cache.

Builds a mid-size random looped model (default: d_model 512, 8 heads, d_mlp 1536, 1 prelude
layer, a 4-layer recurrent block, 1 coda layer; 32 steps = 130 effective layers, 128 of them in
the loop) and runs, each in a fresh subprocess so peaks do not mix:

* ``forward``  -- a plain forward pass (the floor);
* ``stream``   -- ``run_streaming`` with ``ResidualStats`` + ``AttentionStats``, then
                  ``streaming_inference_stages`` (two more passes);
* ``cache``    -- ``run_with_cache`` of every hook, then the same three analyses from the cache.

On CPU the peak is the growth of the process's peak resident set (``ru_maxrss``) over its
resident set just before the run (after building the model and a warm-up pass); on CUDA it is
``torch.cuda.max_memory_allocated`` over the memory allocated before the run. Both analyses give
the same numbers (checked at the end).

    python benchmarks/streaming_memory.py                   # CPU, defaults above
    python benchmarks/streaming_memory.py --device cuda --seq 1024
    python benchmarks/streaming_memory.py --threads 1        # a busy machine: less contention
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tl_loop import HookedLoopedTransformer, LoopedConfig  # noqa: E402
from tl_loop import analysis as A  # noqa: E402


def build(args: argparse.Namespace) -> HookedLoopedTransformer:
    cfg = LoopedConfig(
        d_model=args.d_model,
        d_head=args.d_model // args.n_heads,
        n_heads=args.n_heads,
        d_mlp=3 * args.d_model,
        d_vocab=args.vocab,
        n_ctx=max(args.seq, 2048),
        n_prelude_layers=1,
        n_core_layers=args.n_core,
        n_coda_layers=1,
        n_steps=args.n_steps,
        injection="add",
        state_init="prelude",
    )
    return HookedLoopedTransformer(cfg, seed=0).to(args.device)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def summary(resid, attn, stages) -> dict:
    return {
        "step_distance": resid.step_distance.tolist(),
        "attn_distance_mean": float(attn.distance.mean()),
        "kl_to_final": stages.kl_to_final.tolist(),
    }


@torch.no_grad()
def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    model(tokens[:, :8])  # warm-up: allocator, kernels
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    start = time.perf_counter()
    cache_bytes = 0
    result = None
    if args.mode == "forward":
        model(tokens)
    elif args.mode == "stream":
        resid, attn = A.run_streaming(model, tokens, A.ResidualStats(), A.AttentionStats())
        stages = A.streaming_inference_stages(model, tokens)
        result = summary(resid, attn, stages)
    else:
        _, cache = model.run_with_cache(tokens)
        cache_bytes = sum(t.numel() * t.element_size() for t in cache.cache_dict.values())
        result = summary(A.residual_stats(cache), A.attention_stabilisation(cache), A.inference_stages(cache))
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = max(peak_rss_bytes() - before, 0)
    print(
        json.dumps(
            {
                "mode": args.mode,
                "peak_bytes": peak,
                "cache_bytes": cache_bytes,
                "seconds": time.perf_counter() - start,
                "result": result,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-core", type=int, default=4)
    p.add_argument("--n-steps", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--mode", choices=["forward", "stream", "cache"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return child(args)

    n_layers = 2 + args.n_core * args.n_steps
    print(
        f"model: d_model={args.d_model}, heads={args.n_heads}, d_mlp={3 * args.d_model}, "
        f"1 prelude + {args.n_core}-layer block x {args.n_steps} steps + 1 coda = {n_layers} effective "
        "layers; "
        f"batch={args.batch}, seq={args.seq}, device={args.device}"
    )
    what = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak RSS growth"
    rows = {}
    for mode in ("forward", "stream", "cache"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode] + [
            a for a in sys.argv[1:] if not a.startswith("--mode")
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[mode] = json.loads(out)
    mib = 1024**2
    print(f"{'mode':<10}{what + ' (MiB)':>36}{'cached tensors (MiB)':>24}{'time (s)':>12}")
    for mode, r in rows.items():
        cached = f"{r['cache_bytes'] / mib:.1f}" if r["cache_bytes"] else "-"
        print(f"{mode:<10}{r['peak_bytes'] / mib:>36.1f}{cached:>24}{r['seconds']:>12.2f}")
    ratio = rows["cache"]["peak_bytes"] / max(rows["stream"]["peak_bytes"], 1)
    print(f"streamed / cached peak: 1 / {ratio:.1f}")
    s, c = rows["stream"]["result"], rows["cache"]["result"]
    same = (
        torch.allclose(
            torch.tensor(s["step_distance"]), torch.tensor(c["step_distance"]), rtol=1e-4, atol=1e-6
        )
        and torch.allclose(
            torch.tensor(s["kl_to_final"]), torch.tensor(c["kl_to_final"]), rtol=1e-4, atol=1e-5
        )
        and abs(s["attn_distance_mean"] - c["attn_distance_mean"]) < 1e-5
    )
    print(f"streamed results equal cached results: {same}")


if __name__ == "__main__":
    main()
