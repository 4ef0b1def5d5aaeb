"""No-hook forward and ``run_with_cache`` of this checkout against another one, in one run.

    python benchmarks/forward_ab.py --baseline /path/to/older/checkout [--rounds 3]

Builds the same random Huginn-layout (36 effective layers) and HRM-layout (24) models, d_model
512, float32, batch 2 x 128 tokens, one thread, in each checkout in turn (a fresh process per
checkout and round, alternating), and prints per checkout the best of 5 CPU times of a forward
with no hooks and of ``run_with_cache`` (every hook), and their ratio. Quote medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, time, torch
torch.set_num_threads(1)
from tl_loop import HookedLoopedTransformer, LoopedConfig
layouts = dict(
    huginn=dict(n_prelude_layers=2, n_core_layers=4, n_coda_layers=2, n_steps=8, injection="linear",
                state_init="random", resid_norm=True, norm_after_loop=True, qk_bias=True,
                rotary_layout="interleaved", rope_in_float32=True, tie_embeddings=True, embed_scale=22.6),
    hrm=dict(n_core_layers=2, n_inner_layers=2, inner_cycles=3, n_steps=3, state_init="prelude",
             inner_state_init="learned", norm_weights=False, norm_between_steps=True, inner_norm=True,
             attn_output_gate=True, embed_scale=3.0),
)
out = {}
for name, kw in layouts.items():
    cfg = LoopedConfig(d_model=512, d_head=64, n_heads=8, d_mlp=1536, d_vocab=1000, n_ctx=256, **kw)
    model = HookedLoopedTransformer(cfg, seed=0)
    tokens = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(0))
    def best(fn):
        times = []
        for _ in range(5):
            t = time.process_time(); fn(); times.append(time.process_time() - t)
        return min(times)
    with torch.no_grad():
        out[name] = {"forward": best(lambda: model(tokens)), "cache_all": best(lambda: model.run_with_cache(tokens))}
print(json.dumps(out))
"""


def run(tree: Path) -> dict:
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, type=Path, help="another checkout of tl-loop")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    trees = {"this": Path(__file__).resolve().parents[1], "baseline": args.baseline.resolve()}
    results: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for key, tree in trees.items():
            results[key].append(run(tree))
    for model in ("huginn", "hrm"):
        for key in trees:
            fwd = statistics.median(r[model]["forward"] for r in results[key])
            ratio = statistics.median(r[model]["cache_all"] / r[model]["forward"] for r in results[key])
            print(f"{model:7s} {key:9s} forward {fwd * 1000:7.1f} ms cpu   run_with_cache / forward {ratio:.3f}")


if __name__ == "__main__":
    main()
