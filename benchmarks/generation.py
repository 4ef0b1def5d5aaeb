"""tl-loop decoding benchmark: the KV cache's speed-up, the cost per token against context, and
HRM-Text's ``generate`` against ``transformers``' own on the same weights.

    python benchmarks/generation.py                 # about 5 minutes on 2 busy CPU cores
    python benchmarks/generation.py --quick         # 2 rounds (a smoke run)
    python benchmarks/generation.py --json out.json

Models (random, float32, CPU, built offline):

* **Huginn layout, d_model 256** (4 heads x 64, d_mlp 512, 1 prelude + 2 core + 1 coda layers,
  4 steps, linear adapter, random initial state, interleaved RoPE, sandwich norms: 10 effective
  layers, vocabulary 512).
* **HRM-Text, d_model 256**: a random ``transformers.HrmTextForCausalLM`` (4 heads x 64, d_mlp
  512, 2 layers per stack, H_cycles 2, L_cycles 2), saved with ``save_pretrained`` and loaded by
  ``HookedLoopedTransformer.from_pretrained`` (identical weights).

Measured (greedy decoding, ``torch.no_grad``; the calls compared run in turn inside each round;
a ratio is the median of per-round ratios, a time the median over rounds; CPU time of the
process with one intra-op thread):

1. 48 new tokens after a 128-token prompt with ``use_past_kv_cache=True`` vs ``False`` (tokens
   checked identical);
2. ms per decoded token with the cache at 32 and at 256 tokens of context: (time of 17 new
   tokens - time of 1) / 16, after a prompt of that length;
3. HRM-Text: 32 new tokens, ``model.generate`` vs ``HrmTextForCausalLM.generate`` (sdpa, its own
   cache; tokens checked identical).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tl_loop import HookedLoopedTransformer, LoopedConfig  # noqa: E402

GREEDY = dict(do_sample=False, stop_at_eos=False, verbose=False)


def cpu_time() -> float:
    t = os.times()
    return t.user + t.system


def timed(fn: Callable[[], object]) -> float:
    start = cpu_time()
    fn()
    return cpu_time() - start


def rounds(fns: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Each function once per round, in a rotating order."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(n):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(timed(fns[k]))
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def huginn_model() -> HookedLoopedTransformer:
    cfg = LoopedConfig(d_model=256, d_head=64, n_heads=4, d_mlp=512, d_vocab=512, n_ctx=512,
                       n_prelude_layers=1, n_core_layers=2, n_coda_layers=1, n_steps=4, injection="linear",
                       state_init="random", resid_norm=True, norm_after_loop=True, qk_bias=True,
                       rotary_layout="interleaved", rope_in_float32=True, tie_embeddings=True, embed_scale=16.0)
    return HookedLoopedTransformer(cfg, seed=0)


def hrm_models(folder: str):
    import transformers

    kwargs = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  head_dim=64, H_cycles=2, L_cycles=2, max_position_embeddings=512, initializer_range=0.05,
                  attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.HrmTextForCausalLM(transformers.HrmTextConfig(**kwargs)).eval()
    hf.save_pretrained(folder)
    return hf, HookedLoopedTransformer.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = 2 if args.quick else args.repeats
    torch.set_num_threads(1)
    results: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)

    with torch.no_grad():
        model = huginn_model()
        prompt = torch.randint(0, 512, (1, 128), generator=gen)
        cached = model.generate(prompt, max_new_tokens=48, **GREEDY)
        uncached = model.generate(prompt, max_new_tokens=48, use_past_kv_cache=False, **GREEDY)
        assert torch.equal(cached, uncached), "cached and uncached decoding disagree"
        t = rounds({"cached": lambda: model.generate(prompt, max_new_tokens=48, **GREEDY),
                    "uncached": lambda: model.generate(prompt, max_new_tokens=48, use_past_kv_cache=False, **GREEDY)}, n)
        results["huginn256: 48 tokens, uncached / cached"] = ratio(t, "uncached", "cached")
        results["huginn256: 48 tokens cached, ms per token"] = 1000 * statistics.median(t["cached"]) / 48

        per_token = {}
        for ctx in (32, 256):
            p = torch.randint(0, 512, (1, ctx), generator=gen)
            t = rounds({"one": lambda p=p: model.generate(p, max_new_tokens=1, **GREEDY),
                        "many": lambda p=p: model.generate(p, max_new_tokens=17, **GREEDY)}, n)
            per_token[ctx] = 1000 * (statistics.median(t["many"]) - statistics.median(t["one"])) / 16
            results[f"huginn256: cached ms per token at {ctx} tokens of context"] = per_token[ctx]
        results["huginn256: cached per-token cost, 256 / 32 tokens of context"] = per_token[256] / per_token[32]

        with tempfile.TemporaryDirectory() as folder:
            hf, ours = hrm_models(folder)
            p = torch.randint(0, 512, (1, 16), generator=gen)
            ref = hf.generate(p, max_new_tokens=32, do_sample=False, pad_token_id=0)
            assert torch.equal(ours.generate(p, max_new_tokens=32, **GREEDY), ref), "HRM-Text tokens differ"
            t = rounds({"ours": lambda: ours.generate(p, max_new_tokens=32, **GREEDY),
                        "hf": lambda: hf.generate(p, max_new_tokens=32, do_sample=False, pad_token_id=0)}, n)
            results["hrm256: 32 tokens, tl-loop generate / HrmTextForCausalLM.generate"] = ratio(t, "ours", "hf")

    for k, v in results.items():
        print(f"{k:70s} {v:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
