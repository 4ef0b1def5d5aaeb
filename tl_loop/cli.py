"""Command line: ``tl-loop info MODEL``, ``tl-loop report [MODEL] --out report.html`` and
``tl-loop generate MODEL --prompt TEXT --exit entropy_diff:0.01`` (``tl_loop.generation_cli``).

``MODEL`` is anything ``HookedLoopedTransformer.from_pretrained`` accepts (a local folder, a Hub
id, or the name of an embedded model); ``python -m tl_loop`` is the same command.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a name, a one-line help, a function
adding its arguments and a function running it. Arguments are checked before any model is
loaded; torch and TransformerLens are imported only when a command runs, so ``--help`` answers
at once. Every mistake is one ``error:`` line on stderr and exit status 2 (``--debug`` shows the
traceback instead); an unexpected failure exits with 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

#: Model used when ``report`` gets none (an embedded model, so the command works offline).
DEFAULT_MODEL = "tl-loop/varbind-looped"
#: Below this many parameters a command runs torch on one thread.
SMALL_MODEL = 20_000_000

DESCRIPTION = """\
Looped (recurrent-depth) language models as TransformerLens hooked models.

MODEL is a local checkpoint folder (Hugging Face layout), a Hub id (owner/name) or an
embedded model: tl-loop/varbind-looped (the default of 'report') or tl-loop/varbind-baseline.

examples:
  tl-loop info tl-loop/varbind-looped
  tl-loop report --out report.html
  tl-loop report path/to/checkpoint --prompt "The capital of France is" --steps 16
  tl-loop generate path/to/checkpoint --prompt "The capital of France is" --exit kl:5e-4
"""


class UsageError(Exception):
    """A mistake on the command line: reported as one ``error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse itself prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


# ---------------------------------------------------------------- argument types (checked at parse time)
def bounded_int(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number ``>= minimum`` (``why`` is added to the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not >= {minimum}{f' ({why})' if why else ''}")
        return value

    parse.__name__ = f"int>={minimum}"  # argparse names the type in its messages
    return parse


def token_ids(text: str) -> list[int]:
    """``"1,2,3"`` or ``"1 2 3"`` -> ``[1, 2, 3]``."""
    parts = text.replace(",", " ").split()
    if not parts:
        raise argparse.ArgumentTypeError("no token ids given (expected e.g. 1,2,3)")
    bad = [p for p in parts if not p.isdigit()]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{bad[0]!r} is not a token id (expected non-negative integers, e.g. 1,2,3)"
        )
    return [int(p) for p in parts]


def prompt_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty")
    return text


# ---------------------------------------------------------------- checks before any work
def check_model_arg(name: str) -> None:
    """Refuse a model argument that cannot load, before importing anything heavy: an unknown
    embedded name, a file, or a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) that does not exist."""
    from tl_loop.pretrained import available, resolve

    if resolve(name) is not None:  # embedded model (raises CheckpointError naming the known ones)
        return
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise UsageError(f"{name} is a file; MODEL must be a checkpoint folder (with config.json) or a Hub id")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:  # a path, not a Hub id owner/name
        where = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
        raise UsageError(
            f"checkpoint folder {name} does not exist{where}; MODEL is a folder, a Hub id (owner/name) "
            f"or an embedded model ({', '.join(sorted(available()))})"
        )


def check_out_path(out: str) -> Path:
    """The report's output file must be writable: its folder exists, it is not a folder."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name, e.g. {path / 'report.html'}")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--out {out}: cannot write there (permission denied)")
    return path


def check_steps(model: Any, steps: int | None, force: bool) -> None:
    if steps is not None and steps > model.cfg.max_steps and not force:
        raise UsageError(
            f"--steps {steps} exceeds this model's max_steps={model.cfg.max_steps}; add --force if you mean it"
        )


def unknown_characters(tokenizer: Any, text: str) -> list[str]:
    """The distinct characters of ``text`` that the tokenizer maps to its unknown token alone."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    return [c for c in dict.fromkeys(text) if not c.isspace() and tokenizer.encode(c, add_special_tokens=False) == [unk]]


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)  # noqa: T201 - CLI output


# ---------------------------------------------------------------- commands
def _load(name: str, steps: int | None, force: bool) -> Any:
    from tl_loop import HookedLoopedTransformer

    model = HookedLoopedTransformer.from_pretrained(name)
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        import torch

        torch.set_num_threads(1)  # matrices this small gain nothing from threads, and lose a lot on a busy machine
    check_steps(model, steps, force)
    if steps is not None:
        model.set_n_steps(steps, force=force)
    return model


def _report_tokens(model: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """Tokens of ``--tokens`` / ``--prompt`` / the model's own task, and the task problem (or None)."""
    import torch

    if args.tokens is not None:
        return torch.tensor([args.tokens]), None
    if args.prompt is None:
        if "task" in model.cfg.extra:  # a model trained by tl-loop: one of its held-out problems
            from tl_loop.pretrained import task_for

            task = task_for(model)
            problem = task.dataset(hops=min(3, task.max_hops), n=1, split="test")[0]
            return task.encode([problem])[0], problem
        raise UsageError("this model has no task of its own: give --prompt TEXT (or --tokens 1,2,3)")
    if model.tokenizer is None:
        raise UsageError("this model has no tokenizer: give --tokens 1,2,3 instead of --prompt")
    tokens = model.to_tokens(args.prompt, truncate=False)  # too long for n_ctx: an error, not a cut
    unk_id = getattr(model.tokenizer, "unk_token_id", None)
    n_unk = int((tokens == unk_id).sum()) if unk_id is not None else 0
    if n_unk:
        chars = unknown_characters(model.tokenizer, args.prompt)
        shown = " ".join(repr(c) for c in chars[:20]) + (" ..." if len(chars) > 20 else "")
        warn(f"{n_unk} of {tokens.shape[1]} prompt tokens became {model.tokenizer.unk_token} "
             f"(characters the tokenizer does not know: {shown})")
    return tokens, None


def run_info(args: argparse.Namespace) -> int:
    check_model_arg(args.model)
    model = _load(args.model, args.steps, args.force)
    from tl_loop.report import format_summary, model_summary

    print(format_summary(model_summary(model)))  # noqa: T201 - CLI output
    return 0


def run_report(args: argparse.Namespace) -> int:
    out = check_out_path(args.out)
    check_model_arg(args.model)
    model = _load(args.model, args.steps, args.force)
    tokens, problem = _report_tokens(model, args)
    from tl_loop.report import write_report

    path = write_report(model, tokens, out, n_steps=args.steps, progress=not args.no_progress,
                        problem=problem, force=args.force)
    print(f"wrote {path}")  # noqa: T201 - CLI output
    return 0


def _model_arguments(p: argparse.ArgumentParser, default: str | None) -> None:
    if default is None:
        p.add_argument("model", metavar="MODEL", help="checkpoint folder, Hub id or embedded model name")
    else:
        p.add_argument("model", metavar="MODEL", nargs="?", default=default,
                       help=f"checkpoint folder, Hub id or embedded model name (default: {default})")
    p.add_argument("--steps", metavar="N", type=bounded_int(0, "0 skips the loop"), default=None,
                   help="number of recurrent steps; 0 skips the loop (default: the model's own)")
    p.add_argument("--force", action="store_true", help="allow --steps above the model's max_steps")


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p, default=None)


def _prompt_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT", type=prompt_text, default=None,
                        help="text prompt (needs a tokenizer; default for a model trained by tl-loop: "
                             "one of its held-out problems)")
    source.add_argument("--tokens", metavar="IDS", type=token_ids, default=None,
                        help="token ids instead of a prompt, e.g. 1,2,3")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p, default=DEFAULT_MODEL)
    _prompt_arguments(p)
    p.add_argument("--out", metavar="FILE", default="report.html", help="output HTML file (default: report.html)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    from tl_loop import generation_cli

    _model_arguments(p, default=None)
    _prompt_arguments(p)
    generation_cli.add_arguments(p)


def run_generate(args: argparse.Namespace) -> int:
    from tl_loop import generation_cli

    check_model_arg(args.model)
    model = _load(args.model, args.steps, args.force)
    tokens, _ = _report_tokens(model, args)
    print(generation_cli.run(model, tokens, args))  # noqa: T201 - CLI output
    return 0


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares it, ``run(args)`` returns the exit status."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("info", "print the layout, parameter count, effective depth and hook names of a model",
            add_info_arguments, run_info),
    Command("report", "write one HTML file with the loop analyses of a model on a prompt",
            add_report_arguments, run_report),
    Command("generate", "decode from a prompt; print the text and the steps each generated token used",
            add_generate_arguments, run_generate),
]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = _Parser(prog="tl-loop", description=DESCRIPTION, formatter_class=_Formatter, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help[0].upper() + command.help[1:] + ".",
                           formatter_class=_Formatter, parents=[common])
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"tl-loop {args.command}"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)  # noqa: T201 - CLI output
        return 130
    except Exception as e:  # noqa: BLE001 - the command line never shows a raw traceback
        if getattr(args, "debug", False):
            raise
        from tl_loop.errors import TlLoopError

        known = isinstance(e, (UsageError, TlLoopError))
        message = " ".join(str(e).split()) or type(e).__name__  # one line
        if not known:
            message = f"unexpected {type(e).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"{prog}: error: {message}", file=sys.stderr)  # noqa: T201 - CLI output
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
