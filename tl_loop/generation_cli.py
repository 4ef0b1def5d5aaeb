"""``tl-loop generate MODEL --prompt TEXT --max-new-tokens N --steps N --exit entropy_diff:0.01``:
decode, print the text and the steps each generated token used.

Registered in ``tl_loop.cli`` (``add_arguments`` / ``run``); errors are ``TlLoopError``s, which the
command line reports as one line.
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "decode from a prompt; print the text and the steps each generated token used"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model")
    parser.add_argument("--prompt", default=None, help="text prompt (needs a tokenizer)")
    parser.add_argument("--tokens", default=None, help="prompt token ids, e.g. 1,2,3 (instead of --prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="recurrence depth (default: the model's)")
    parser.add_argument("--exit", default=None,
                        help="per-token exit rule NAME[:THRESHOLD], e.g. entropy_diff:0.01, kl:5e-4, "
                             "argmax_stability:2, gate:0.5, at_step:3 (default: the family's read-out)")
    parser.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    parser.add_argument("--force", action="store_true", help="allow --steps above the model's max_steps")


def run(args: argparse.Namespace) -> str:
    """Decode as ``args`` say; return the text to print."""
    import torch

    from tl_loop import HookedLoopedTransformer
    from tl_loop.errors import InputError

    if (args.prompt is None) == (args.tokens is None):
        raise InputError("give exactly one of --prompt TEXT or --tokens 1,2,3")
    model = HookedLoopedTransformer.from_pretrained(args.model)
    if args.tokens is not None:
        try:
            prompt: Any = torch.tensor([[int(t) for t in args.tokens.replace(",", " ").split()]])
        except ValueError:
            raise InputError(f"--tokens {args.tokens!r}: expected token ids, e.g. 1,2,3") from None
    else:
        prompt = args.prompt
    eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    torch.manual_seed(args.seed)
    out = model.generate(
        prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, stop_at_eos=eos is not None, use_past_kv_cache=not args.no_cache,
        verbose=False, n_steps=args.steps, exit=args.exit, force=args.force, return_details=True,
    )
    return format_result(model, out)


def format_result(model: Any, out: Any) -> str:
    """The generated text (or token ids) and one ``token  steps`` line per generated token."""
    new = out.new_tokens[0].tolist()
    steps = out.steps_used[0].tolist()
    if model.tokenizer is not None:
        head = out.text[0]
        labels = [repr(s) for s in model.to_str_tokens(torch_tensor(new))]
    else:
        head = " ".join(str(t) for t in out.tokens[0].tolist())
        labels = [str(t) for t in new]
    exit_name = "every step" if out.exit is None else repr(out.exit)
    width = max([len(label) for label in labels] + [5])
    lines = [head, "", f"steps per generated token (n_steps={out.n_steps}, exit: {exit_name}):"]
    lines += [f"  {label:<{width}}  {s if s > 0 else '-'}" for label, s in zip(labels, steps)]
    used = [s for s in steps if s > 0]
    if used:
        lines.append(f"  mean {sum(used) / len(used):.2f} steps per token")
    return "\n".join(lines)


def torch_tensor(values: list[int]) -> Any:
    import torch

    return torch.tensor(values)
