"""Command line: ``tl-loop info MODEL``, ``tl-loop report [MODEL] --prompt ... --out report.html``
and ``tl-loop generate MODEL --prompt TEXT --exit entropy_diff:0.01`` (``tl_loop.generation_cli``).

``MODEL`` is anything ``HookedLoopedTransformer.from_pretrained`` accepts (a local folder, a Hub
id, or the name of an embedded model); ``python -m tl_loop`` is the same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

#: Model used when ``report`` gets none (an embedded model, so the command works offline).
DEFAULT_MODEL = "tl-loop/varbind-looped"


def _load(name: str, n_steps: int | None):
    from tl_loop import HookedLoopedTransformer

    return HookedLoopedTransformer.from_pretrained(name, n_steps=n_steps)


def _tokens(model, prompt: str | None, token_ids: str | None) -> torch.Tensor:
    if token_ids:
        return torch.tensor([[int(t) for t in token_ids.replace(",", " ").split()]])
    if prompt is None:
        if "task" in model.cfg.extra:  # a model trained by tl-loop: one of its held-out problems
            from tl_loop.pretrained import task_for

            task = task_for(model)
            return task.encode(task.dataset(hops=min(3, task.max_hops), n=1, split="test"))[0]
        raise SystemExit("error: give --prompt TEXT (or --tokens 1,2,3 for a model without tokenizer)")
    return model.to_tokens(prompt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-loop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="layout, parameter count, effective depth and hook names of a model")
    info.add_argument("model")
    info.add_argument("--steps", type=int, default=None, help="number of recurrent steps")
    report = sub.add_parser("report", help="write an HTML report with the loop analyses")
    report.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    report.add_argument("--prompt", default=None,
                        help="text prompt (needs a tokenizer; default for a tl-loop-trained model: a held-out problem)")
    report.add_argument("--tokens", default=None, help="token ids, e.g. 1,2,3 (instead of --prompt)")
    report.add_argument("--steps", type=int, default=None, help="number of recurrent steps")
    report.add_argument("--out", default="report.html", help="output HTML file")
    report.add_argument("--no-progress", action="store_true")
    from tl_loop import generation_cli

    generation_cli.add_arguments(sub.add_parser("generate", help=generation_cli.HELP))
    args = parser.parse_args(argv)

    from tl_loop.errors import TlLoopError

    try:
        if args.command == "generate":
            print(generation_cli.run(args))  # noqa: T201 - CLI output
            return 0
        model = _load(args.model, args.steps)
        if args.command == "info":
            from tl_loop.report import format_summary, model_summary

            print(format_summary(model_summary(model)))  # noqa: T201 - CLI output
            return 0
        from tl_loop.report import write_report

        tokens = _tokens(model, args.prompt, args.tokens)
        path = write_report(model, tokens, args.out, n_steps=args.steps, progress=not args.no_progress)
        print(f"wrote {path}")  # noqa: T201 - CLI output
        return 0
    except TlLoopError as e:
        print(f"error: {e}", file=sys.stderr)  # noqa: T201 - CLI output
        return 2


if __name__ == "__main__":
    sys.exit(main())
