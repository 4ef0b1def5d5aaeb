"""Cached decoding against one full forward, and how far one bf16 ulp travels, at several depths.

For a checkpoint written by ``real_scale.py write``: greedy ``generate`` with the KV cache, then
one forward over the final sequence with the same initial state; prints the relative deviation
of the logits at each new position. Then, in a plain forward, changes one coordinate of the last
position's initial state by one bf16 ulp and prints how far that position's logits move: a
model whose dynamics amplify rounding this much cannot be expected to decode the same tokens
through two kernel orders.

    python benchmarks/decode_parity.py /tmp/ckpt/huginn --steps 1 2 4 8 16
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

from real_scale import _load, _tokens


def rel_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--dtype", default="stored")
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--new", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = p.parse_args()
    model = _load(args.folder, args.dtype)
    tokens = _tokens(model, args.seq)
    kw = dict(do_sample=False, stop_at_eos=False, verbose=False, return_details=True)
    with torch.inference_mode():
        for steps in args.steps:
            out = model.generate(tokens, max_new_tokens=args.new, n_steps=steps, **kw)
            full = model(out.tokens[:, :-1], init_state=out.init_state, n_steps=steps)[:, args.seq - 1:]
            devs = [f"{rel_dev(out.logits[:, i], full[:, i]):.2e}" for i in range(args.new)]
            state = out.init_state[:, : args.seq].clone()
            nudged = state.clone()
            nudged[0, -1, 0] = nudged[0, -1, 0] * (1 + 2**-7)  # one bf16 ulp
            a = model(tokens, init_state=state, n_steps=steps)[0, -1]
            b = model(tokens, init_state=nudged, n_steps=steps)[0, -1]
            print(f"{steps} steps: cached vs full forward at new positions {devs}; "
                  f"one ulp of one initial-state coordinate moves the logits by {rel_dev(b, a):.2e}", flush=True)


if __name__ == "__main__":
    main()
