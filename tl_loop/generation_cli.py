"""``tl-loop generate MODEL --prompt TEXT --max-new-tokens N --steps N --exit entropy_diff:0.01``:
decode, print the text and the steps each generated token used.

``tl_loop.cli`` registers the command (model, ``--steps``, ``--force``, ``--prompt`` /
``--tokens``, loading and error reporting); this module adds the decoding arguments and runs it.
"""

from __future__ import annotations

import argparse
from typing import Any

from tl_loop.cli import bounded_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", metavar="N", type=bounded_int(1), default=None,
                   help="tokens to generate (default: 20, or what fits the context)")
    p.add_argument("--exit", metavar="RULE", default=None,
                   help="per-token exit rule NAME[:THRESHOLD], e.g. entropy_diff:0.01, kl:5e-4, "
                        "argmax_stability:2, gate:0.5, at_step:3 (default: the family's read-out)")
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", metavar="T", type=float, default=1.0)
    p.add_argument("--top-k", metavar="K", type=int, default=None)
    p.add_argument("--top-p", metavar="P", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")


def run(model: Any, tokens: Any, args: argparse.Namespace) -> str:
    """Decode ``tokens`` ``[1, pos]`` as ``args`` say; return the text to print."""
    import torch

    from tl_loop import exits

    rule = exits.parse(args.exit)  # a bad rule is refused before any decoding
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = max(1, min(20, model.cfg.n_ctx - tokens.shape[1]))
    eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    torch.manual_seed(args.seed)
    out = model.generate(
        tokens, max_new_tokens=max_new, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, stop_at_eos=eos is not None, use_past_kv_cache=not args.no_cache, verbose=False,
        exit=rule, force=args.force, return_details=True,
    )
    return format_result(model, out)


def format_result(model: Any, out: Any) -> str:
    """The generated text (or token ids) and one ``token  steps`` line per generated token."""
    new = out.new_tokens[0]
    steps = out.steps_used[0].tolist()
    if model.tokenizer is not None:
        head = out.text[0]
        labels = [repr(s) for s in model.to_str_tokens(new)]
    else:
        head = " ".join(str(t) for t in out.tokens[0].tolist())
        labels = [str(t) for t in new.tolist()]
    exit_name = "every step" if out.exit is None else repr(out.exit)
    width = max([len(label) for label in labels] + [5])
    lines = [head, "", f"steps per generated token (n_steps={out.n_steps}, exit: {exit_name}):"]
    lines += [f"  {label:<{width}}  {s if s > 0 else '-'}" for label, s in zip(labels, steps)]
    used = [s for s in steps if s > 0]
    if used:
        lines.append(f"  mean {sum(used) / len(used):.2f} steps per token")
    return "\n".join(lines)
