"""The batched patching engine: many patched runs per forward pass, each from where it diverges.

Every sweep of ``tl_loop.patching`` that ends in ``_batched`` is a list of **cells**; a cell is
one patched run of the corrupted prompt, given as hook functions ``(hook_name, fn)`` in
TransformerLens's signature (``fn(activation, hook) -> activation``). :func:`run_cells` returns
what ``evaluate(logits)`` gives for every cell, as if each cell had been run alone with
``model.run_with_hooks(corrupted_tokens, fwd_hooks=cell.hooks)``, but:

* **No prefix recomputation.** Nothing before the first operation that fires one of a cell's
  hooks can differ from the unpatched corrupted run. One unpatched pass records the live frame
  (``tl_loop.program.RunFrame``: residual stream, recurrent state, prelude output, HRM's inner
  state) before every operation where some cell diverges; the cell starts there.
* **No recomputation of earlier positions.** A cell that promises to change nothing before
  position ``p`` (``Cell.pos``) runs only positions from ``p`` on (the pass's least ``p``): its
  queries attend to the corrupted run's keys and values of the earlier positions, recorded once
  per layer and handed in through the attention context's KV slot; the logits of the earlier
  positions are the corrupted run's.
* **No run for what the patch leaves equal.** A cell with one hook is first applied to the
  unpatched corrupted activation (on a copy): if its output equals its input at every position
  before ``p`` (bit for bit), the cell runs from ``p`` on, and a cell that changes nothing is not
  run at all (its value is the unpatched run's metric). With clean and corrupted prompts that
  share their first tokens, every activation before the first differing token is the same in
  both runs, so patching it changes nothing; the cost of a sweep then falls with that prefix.
* **Many cells per pass.** Cells are sorted by where they diverge and run ``batch_size`` at a
  time, stacked along the batch axis: a pass starts at its first cell's operation and the others
  join it at theirs (``Forward``'s ``on_op`` callback appends their rows), so every copy runs
  only the operations its patch can change, across loop boundaries, injection, state norms
  and inner cycles alike. Each hook of the pass patches exactly the rows of its cells.

Which operation fires a hook is learned from the program itself (a one-token pass that notes
the position of the operation running when each hook fires), not from parsing its name.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from tl_loop.components.attention import AttentionContext
from tl_loop.errors import InputError
from tl_loop.program import RunFrame

HookFn = Callable[[torch.Tensor, Any], torch.Tensor]

#: Token rows (copies x batch x positions) per pass above which a CPU gains nothing: larger
#: matrices no longer amortise per-operation overhead, and activations fall out of cache.
CPU_ROWS = 2048


@dataclasses.dataclass(frozen=True)
class Cell:
    """One patched run: the hooks ``(hook_name, fn)`` it adds to the corrupted run.

    ``pos > 0`` promises that the patch changes nothing at positions before ``pos`` (attention
    is causal): the run may then compute only positions ``start..`` for some ``start <= pos``,
    and its hook functions are called as ``fn(activation, hook, start)`` with the activation of
    those positions only (query positions, for an attention pattern).
    """

    hooks: tuple[tuple[str, HookFn], ...]
    pos: int = 0


def _query_axis(hook_name: str) -> int:
    """The axis of (query) positions of the activation at ``hook_name``."""
    return 2 if hook_name.endswith(("hook_pattern", "hook_attn_scores")) else 1


def _first_change(before: torch.Tensor, after: torch.Tensor, axis: int) -> int | None:
    """The first position along ``axis`` where ``after`` differs from ``before`` (NaN counts as
    a difference), or None where they are equal."""
    if after.shape != before.shape:
        return 0
    changed = (after != before).movedim(axis, 0).reshape(before.shape[axis], -1).any(dim=1)
    where = changed.nonzero()
    return int(where[0]) if len(where) else None


class _Probe:
    """Finds, during the unpatched run, where each single-hook cell's patch first changes its
    activation; keeps that activation for cells that will start after position 0."""

    def __init__(self, cells: Sequence[Cell]) -> None:
        self.by_name: dict[str, list[int]] = {}
        for c, cell in enumerate(cells):
            if len(cell.hooks) == 1:
                self.by_name.setdefault(cell.hooks[0][0], []).append(c)
        self.cells = cells
        self.start: dict[int, int | None] = {}  # cell -> first changed position (None: no change)
        self.unpatched: dict[str, torch.Tensor] = {}

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(name, self._hook) for name in sorted(self.by_name)]

    def _hook(self, activation: torch.Tensor, hook: Any) -> None:
        axis = _query_axis(hook.name)
        if any(self.cells[c].pos == 0 for c in self.by_name[hook.name]):  # may run from a later position
            self.unpatched[hook.name] = activation.clone()
        for c in self.by_name[hook.name]:
            fn = self.cells[c].hooks[0][1]
            copy = activation.clone()
            out = fn(copy, hook, 0) if self.cells[c].pos > 0 else fn(copy, hook)
            self.start[c] = _first_change(activation, copy if out is None else out, axis)


def _positions(model: Any, tokens: torch.Tensor, names: set[str]) -> dict[str, int]:
    """The program position of the operation that fires each hook in ``names``."""
    unknown = sorted(n for n in names if n not in model.hook_dict)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(model.hook_dict), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(
            f"unknown hook point {unknown[0]!r}{hint} at n_steps={model.cfg.n_steps}"
            f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}"
        )
    running = [0]
    fired: dict[str, int] = {}

    def note(x: torch.Tensor, hook: Any) -> None:
        fired.setdefault(hook.name, running[0])

    def at(position: int, frame: RunFrame) -> None:
        running[0] = position

    with model.hooks(fwd_hooks=[(n, note) for n in sorted(names)]):
        model._execute(tokens[:1, :1], on_op=at)
    silent = sorted(names - fired.keys())
    if silent:
        raise InputError(f"hook point {silent[0]} never fires in a forward pass: there is nothing to patch")
    return fired


def default_batch_size(model: Any, batch: int, n_pos: int, materialised: bool) -> int:
    """Cells per pass: what fits in a quarter of the free memory (the logits of every row are
    kept for the metric; a hooked attention pattern is materialised per layer), and on a CPU
    at most :data:`CPU_ROWS` token rows."""
    cfg = model.cfg
    device = model.W_E.device
    elem = model.W_E.element_size()
    per_copy = batch * n_pos * elem * (cfg.d_vocab + 3 * (cfg.d_mlp or 4 * cfg.d_model) + 8 * cfg.d_model)
    if materialised:
        per_copy += 3 * batch * cfg.n_heads * n_pos * n_pos * elem
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        rows = None
    else:
        free = _available_memory()
        rows = max(1, CPU_ROWS // (batch * n_pos))
    fits = max(1, int(free // 4 // per_copy))
    return fits if rows is None else min(fits, rows)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def run_cells(
    model: Any,
    tokens: torch.Tensor,
    cells: Sequence[Cell],
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int | None = None,
    verbose: bool = True,
    desc: str = "patching",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(values, corrupted_logits)``: ``evaluate`` of each cell's patched logits
    (``[batch, pos, d_vocab]``, the corrupted batch's size), in the order of ``cells``, and the
    unpatched corrupted run's logits.

    ``model`` must run at the depth the hook names refer to, in eval mode, with no hooks
    attached; ``tokens`` are valid ids ``[batch, pos]``.
    """
    batch, n_pos = int(tokens.shape[0]), int(tokens.shape[1])
    names = {name for cell in cells for name, _ in cell.hooks}
    where = _positions(model, tokens, names)
    joins = [min(where[name] for name, _ in cell.hooks) for cell in cells]
    program = model.program
    enter = program.position("enter_loop")
    wanted = set(joins)

    frames: dict[int, RunFrame] = {}
    first_state: list[torch.Tensor] = []

    def record(position: int, frame: RunFrame) -> None:
        if position in wanted:
            frames[position] = dataclasses.replace(frame)
        if position == enter + 1:  # the initial state, drawn for the corrupted batch
            first_state.append(frame.state)

    keys: dict[int, dict[str, torch.Tensor]] = {}  # layer -> rotated keys and values of the corrupted run

    def keep(x: torch.Tensor, hook: Any) -> None:
        keys.setdefault(int(hook.name.split(".")[1]), {})[hook.name.rsplit("_", 1)[-1]] = x

    probe = _Probe(cells)
    kv_hooks = [(n, keep) for n in model.hook_dict if n.endswith(("attn.hook_rot_k", "attn.hook_v"))]
    with model.hooks(fwd_hooks=kv_hooks + probe.hooks()):
        corrupted_logits = model._execute(tokens, on_op=record).x
    random_state = model.cfg.state_init == "random" and bool(first_state)
    # where each cell starts: its promise, or (one hook) where its patch first changes anything
    starts = [cell.pos for cell in cells]
    for c, first in probe.start.items():
        if first is not None and cells[c].pos == 0:
            starts[c] = first
    unchanged = [c for c, first in probe.start.items() if first is None]
    values: list[torch.Tensor | None] = [None] * len(cells)
    if unchanged:
        corrupted_value = evaluate(corrupted_logits)
        for c in unchanged:
            values[c] = corrupted_value
    todo = [c for c in range(len(cells)) if values[c] is None]

    if batch_size is None:
        materialised = any(n.endswith(("hook_pattern", "hook_attn_scores")) for n in names)
        batch_size = default_batch_size(model, batch, n_pos, materialised)
    order = sorted(todo, key=lambda c: (starts[c], joins[c]))
    with tqdm(total=len(cells), desc=desc, disable=not verbose) as bar:
        bar.update(len(cells) - len(todo))
        for first in range(0, len(order), batch_size):
            chunk = sorted(order[first : first + batch_size], key=lambda c: joins[c])
            offset = 0 if joins[chunk[0]] == 0 else min(starts[c] for c in chunk)
            logits = _run_pass(model, tokens, cells, joins, chunk, frames,
                               first_state[0] if random_state else None, enter, offset, keys, probe.unpatched)
            for k, c in enumerate(chunk):
                rows = logits[k * batch : (k + 1) * batch]
                if offset:
                    rows = torch.cat([corrupted_logits[:, :offset], rows], dim=1)
                values[c] = evaluate(rows)
            bar.update(len(chunk))
    return values, corrupted_logits  # type: ignore[return-value]


class _PrefixKV:
    """A KV slot handing every layer the corrupted run's keys and values of the positions
    before the pass's first one, in front of the pass's own (``layer`` is set as blocks run)."""

    def __init__(self, keys: dict[int, dict[str, torch.Tensor]], offset: int) -> None:
        self.prefix = {layer: (kv["k"][:, :offset], kv["v"][:, :offset]) for layer, kv in keys.items()}
        self.layer = -1

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pk, pv = self.prefix[self.layer]
        copies = k.shape[0] // pk.shape[0]
        return (torch.cat([pk.repeat(copies, 1, 1, 1), k], dim=1),
                torch.cat([pv.repeat(copies, 1, 1, 1), v], dim=1), None)


def _stack(frame: RunFrame, n: int, offset: int = 0) -> RunFrame:
    """``n`` copies of ``frame`` along the batch axis, positions from ``offset`` on."""
    return frame.map(lambda t: t[:, offset:].repeat(n, *([1] * (t.ndim - 1))))


def _run_pass(
    model: Any,
    tokens: torch.Tensor,
    cells: Sequence[Cell],
    joins: list[int],
    chunk: list[int],
    frames: dict[int, RunFrame],
    first_state: torch.Tensor | None,
    enter: int,
    offset: int,
    keys: dict[int, dict[str, torch.Tensor]],
    prefix: dict[str, torch.Tensor],
) -> torch.Tensor:
    """One stacked pass over the cells ``chunk`` (sorted by where they join), positions from
    ``offset`` on: logits, one block of ``batch`` rows per cell in chunk order."""
    batch = int(tokens.shape[0])
    groups: dict[int, int] = {}
    for c in chunk:
        groups[joins[c]] = groups.get(joins[c], 0) + 1
    start = joins[chunk[0]]
    by_name: dict[str, list[tuple[int, int, HookFn, bool]]] = {}
    for k, c in enumerate(chunk):
        for name, fn in cells[c].hooks:
            by_name.setdefault(name, []).append((k * batch, (k + 1) * batch, fn, cells[c].pos > 0))
    context = None
    slot = None
    if offset:
        slot = _PrefixKV(keys, offset)
        full = model.attention_context(int(tokens.shape[1]), tokens.device)
        rotary = full.rotary
        if rotary is not None:
            rotary = rotary._replace(cos=rotary.cos[offset:], sin_signed=rotary.sin_signed[offset:])
        context = AttentionContext(rotary=rotary, kv=slot)
    program = model.program

    def join(position: int, f: RunFrame) -> None:
        if slot is not None and program[position].kind == "block":
            slot.layer = program[position].index
        if position == start or position not in groups:
            return
        new = _stack(frames[position], groups[position], offset)
        for name in RunFrame.TENSORS:
            have, more = getattr(f, name), getattr(new, name)
            if (have is None) != (more is None):
                raise AssertionError(f"frames disagree on {name} at program position {position}")
            if have is not None:
                setattr(f, name, torch.cat([have, more]))

    init_state = None
    if first_state is not None and start <= enter:  # the pass draws the initial state: as each run
        through = sum(n for position, n in groups.items() if position <= enter)
        init_state = first_state[:, offset:].repeat(through, *([1] * (first_state.ndim - 1)))
    n_start = groups[start]
    run_tokens = tokens.repeat(n_start, 1) if start == 0 else tokens
    hooks = [(name, _rows_hook(entries, offset, prefix.get(name))) for name, entries in by_name.items()]
    with model.hooks(fwd_hooks=hooks):
        return model._execute(run_tokens, frame=_stack(frames[start], n_start, offset), start=start,
                              init_state=init_state, on_op=join, context=context).x


def _rows_hook(entries: list[tuple[int, int, HookFn, bool]], offset: int,
               unpatched: torch.Tensor | None) -> HookFn:
    """A hook applying each cell's own hook to that cell's rows of the stacked activation.

    In a pass of positions ``offset..``, a cell that did not promise a first position sees the
    whole activation: the unpatched run's positions before ``offset`` (equal to what it would
    compute there) in front of the pass's own, and the pass keeps the positions from ``offset``.
    """

    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        axis = _query_axis(hook.name)
        for lo, hi, fn, shifted in entries:
            rows = activation[lo:hi]
            if shifted or not offset:
                out = fn(rows, hook, offset) if shifted else fn(rows, hook)
                if out is not None and out is not rows:
                    activation[lo:hi] = out
                continue
            assert unpatched is not None
            whole = torch.cat([unpatched.narrow(axis, 0, offset), rows], dim=axis)
            out = fn(whole, hook)
            activation[lo:hi] = (whole if out is None else out).narrow(axis, offset, rows.shape[axis])
        return activation

    return hook


def scalar_evaluate(metrics: dict[str, Callable[[torch.Tensor], Any]], batch: int, per_example: bool,
                    reduce: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """TransformerLens's ``evaluate``: every metric on one set of logits, ``[metric, batch?]``."""

    def evaluate(logits: torch.Tensor) -> torch.Tensor:
        rows = []
        for name, fn in metrics.items():
            out = torch.as_tensor(fn(logits))
            if per_example and (out.ndim != 1 or out.shape[0] != batch):
                raise InputError(
                    f"patching_metric {name!r} must return a [batch] tensor of length {batch} under "
                    f"reduce={reduce!r}, got shape {tuple(out.shape)}"
                )
            if not per_example and out.ndim != 0:
                raise InputError(
                    f"patching_metric {name!r} must return a scalar under reduce='scalar' (it is called "
                    f"once per patch on logits of the corrupted batch's size), got shape {tuple(out.shape)}; "
                    "return a [batch] tensor and pass reduce='mean' or reduce='none' to keep per-example values"
                )
            rows.append(out.detach())
        return torch.stack(rows)

    return evaluate


__all__ = ["Cell", "default_batch_size", "run_cells", "scalar_evaluate"]
