"""The execution program: a looped model's forward pass as one ordered list of operations.

This module is the one place that knows the order in which a looped model runs. ``Program``
compiles a config at a number of steps into typed operations::

    Embed                              tokens -> x (token embedding, learned positions)
    Block(prelude.j)                   x -> x, once per prelude layer
    EnterLoop                          prelude_out = x; the initial state(s)
    per step r:
        StateIn(r)                     state -> state (loops.{r}.hook_state_in); source = prelude_out
        per inner cycle c (HRM):
            InnerIn(r, c)              x = inner_state + state
            Block(inner...)            x -> x
            InnerOut(r, c)             inner_state = x (normed); source = inner_state
        Inject(r)                      x = state + source, or adapter(state, source), or state
        Block(core...)                 x -> x
        StateOut(r)                    state = x (normed between steps, not after the last)
        ExitGate(r, reads="state")     exit-gate logit of the state (Ouro; every step but the last)
    LeaveLoop                          x = state (normed after the loop, Huginn)
    ExitGate(last, reads="x")          where the last gate reads the stream after the loop
    Block(coda.j)                      x -> x
    FinalNorm                          x = ln_final(x)
    ExitGate(last, reads="x")          where the last gate reads ln_final's output (Ouro)
    Unembed                            x = logits

Every path that executes a model interprets this list: the forward pass and its
``start_at_layer`` / ``stop_at_layer`` (``tl_loop.execution.Forward``), per-step read-outs
(``tl_loop.readout``), the exact attribution replay (``tl_loop.cache``) and the batched
patching sweep (``tl_loop.patching``). An ``Interpreter`` subclass defines one method per
operation kind (the op's ``kind``, e.g. ``def block(self, op, frame)``) acting on a ``RunFrame``,
the live variables of the pass.

To add an operation: define its dataclass here with a ``kind``, emit it in
``Program.from_config`` at its place, and give every interpreter a method of that name (the base
``Interpreter`` raises for a kind an interpreter does not handle, so none is silently skipped).

>>> from tl_loop.config import LoopedConfig
>>> cfg = LoopedConfig(n_prelude_layers=1, n_core_layers=1, n_steps=2, injection="add")
>>> [op.label for op in Program.from_config(cfg)]
['embed', 'block 0', 'enter_loop', 'state_in 0', 'inject 0', 'block 1', 'state_out 0', 'state_in 1', 'inject 1', 'block 2', 'state_out 1', 'leave_loop', 'final_norm', 'unembed']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, Literal

import torch

from tl_loop.config import LoopedConfig
from tl_loop.schedule import EffectiveLayer, Schedule


# ---------------------------------------------------------------------------- operations
@dataclasses.dataclass(frozen=True)
class Op:
    kind: ClassVar[str]

    @property
    def label(self) -> str:
        return self.kind


@dataclasses.dataclass(frozen=True)
class Embed(Op):
    kind: ClassVar[str] = "embed"


@dataclasses.dataclass(frozen=True)
class Block(Op):
    layer: EffectiveLayer
    kind: ClassVar[str] = "block"

    @property
    def index(self) -> int:
        return self.layer.index

    @property
    def label(self) -> str:
        return f"block {self.index}"


@dataclasses.dataclass(frozen=True)
class EnterLoop(Op):
    kind: ClassVar[str] = "enter_loop"


@dataclasses.dataclass(frozen=True)
class StepOp(Op):
    step: int

    @property
    def label(self) -> str:
        return f"{self.kind} {self.step}"


@dataclasses.dataclass(frozen=True)
class StateIn(StepOp):
    kind: ClassVar[str] = "state_in"


@dataclasses.dataclass(frozen=True)
class InnerIn(StepOp):
    cycle: int = 0
    kind: ClassVar[str] = "inner_in"


@dataclasses.dataclass(frozen=True)
class InnerOut(StepOp):
    cycle: int = 0
    norm: bool = False
    kind: ClassVar[str] = "inner_out"


@dataclasses.dataclass(frozen=True)
class Inject(StepOp):
    how: Literal["none", "add", "linear"] = "none"
    kind: ClassVar[str] = "inject"


@dataclasses.dataclass(frozen=True)
class StateOut(StepOp):
    norm: bool = False  # the norm between steps follows this step
    kind: ClassVar[str] = "state_out"


@dataclasses.dataclass(frozen=True)
class ExitGate(StepOp):
    reads: Literal["state", "x"] = "state"
    kind: ClassVar[str] = "exit_gate"


@dataclasses.dataclass(frozen=True)
class LeaveLoop(Op):
    norm: bool = False  # Huginn's norm after the loop
    kind: ClassVar[str] = "leave_loop"


@dataclasses.dataclass(frozen=True)
class FinalNorm(Op):
    kind: ClassVar[str] = "final_norm"


@dataclasses.dataclass(frozen=True)
class Unembed(Op):
    kind: ClassVar[str] = "unembed"


# ---------------------------------------------------------------------------- the program
class Program(Sequence[Op]):
    """The operations of one forward pass at a fixed number of steps."""

    def __init__(self, ops: list[Op], schedule: Schedule) -> None:
        self.ops = tuple(ops)
        self.schedule = schedule
        self._block_pos = {op.index: k for k, op in enumerate(self.ops) if isinstance(op, Block)}
        self._kind_pos = {}
        for k, op in enumerate(self.ops):
            self._kind_pos.setdefault(op.kind, k)

    @classmethod
    def from_config(cls, cfg: LoopedConfig, n_steps: int | None = None) -> "Program":
        schedule = Schedule.from_config(cfg, n_steps)
        n = schedule.n_steps
        layers = iter(schedule)
        ops: list[Op] = [Embed()]

        def blocks(count: int) -> None:
            ops.extend(Block(next(layers)) for _ in range(count))

        blocks(cfg.n_prelude_layers)
        ops.append(EnterLoop())
        gate_after_final = last_gate_reads_final_norm(cfg)
        for r in range(n):
            ops.append(StateIn(r))
            for c in range(cfg.inner_cycles):
                ops.append(InnerIn(r, c))
                blocks(cfg.n_inner_layers)
                ops.append(InnerOut(r, c, norm=cfg.inner_norm))
            ops.append(Inject(r, how=cfg.injection))
            blocks(cfg.n_core_layers)
            ops.append(StateOut(r, norm=cfg.norm_between_steps and r < n - 1))
            if cfg.exit_gate and r < n - 1:
                ops.append(ExitGate(r, reads="state"))
        ops.append(LeaveLoop(norm=cfg.norm_after_loop))
        last_gate = [ExitGate(n - 1, reads="x")] if cfg.exit_gate and n > 0 else []
        if not gate_after_final:
            ops.extend(last_gate)
        blocks(cfg.n_coda_layers)
        ops.append(FinalNorm())
        if gate_after_final:
            ops.extend(last_gate)
        ops.append(Unembed())
        return cls(ops, schedule)

    # ---- Sequence protocol ----
    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, k):  # type: ignore[override]
        return self.ops[k]

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __repr__(self) -> str:
        return f"Program({len(self.ops)} ops, n_steps={self.schedule.n_steps})"

    # ---- positions ----
    def block_position(self, layer: int) -> int:
        """Position of effective layer ``layer``'s block; ``layer == n_layers``: of ``FinalNorm``
        (what TransformerLens's ``stop_at_layer=n_layers`` / the stream before ``ln_final`` means)."""
        n_layers = len(self.schedule)
        if layer == n_layers:
            return self.position("final_norm")
        if layer not in self._block_pos:
            raise IndexError(f"effective layer {layer} out of range [0, {n_layers}]")
        return self._block_pos[layer]

    def position(self, kind: str) -> int:
        """Position of the first operation of ``kind``."""
        return self._kind_pos[kind]


def last_gate_reads_final_norm(cfg: LoopedConfig) -> bool:
    """Where the last step's exit gate reads ``ln_final``'s output (``ExitGate`` after
    ``FinalNorm``): when nothing sits between the loop and ``ln_final`` (Ouro, whose final norm
    *is* the last step's state norm). Elsewhere it reads the stream leaving the loop."""
    return cfg.n_coda_layers == 0 and not cfg.norm_after_loop


# ---------------------------------------------------------------------------- interpreters
@dataclasses.dataclass
class RunFrame:
    """The live variables of a pass just before operation ``index`` of a block runs.

    ``x``: the residual stream (entering the block, before its ``hook_resid_pre``); ``state``: the
    recurrent state of the current step; ``inner_state``: HRM's low-level state; ``source``: what
    the step's injection adds (the prelude output, or HRM's inner state); ``prelude_out``: the
    prelude's output. Tensors not defined yet are None. ``index`` is the effective layer.
    """

    index: int
    x: torch.Tensor | None = None
    state: torch.Tensor | None = None
    inner_state: torch.Tensor | None = None
    source: torch.Tensor | None = None
    prelude_out: torch.Tensor | None = None

    TENSORS: ClassVar[tuple[str, ...]] = ("x", "state", "inner_state", "source", "prelude_out")

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RunFrame":
        """A frame with ``fn`` applied to every tensor (None stays None)."""
        return RunFrame(self.index, *(None if (t := getattr(self, k)) is None else fn(t) for k in self.TENSORS))


class Interpreter:
    """Walks a ``Program``, calling ``self.<op.kind>(op, frame)`` for each operation.

    ``run(program, frame, start, stop)`` interprets ``program[start:stop]``. The frame's values
    are whatever the interpreter computes with (tensors for a forward pass, stacks of
    components for the attribution replay).
    """

    def run(self, program: Program, frame: object, start: int = 0, stop: int | None = None) -> object:
        for op in program.ops[start:stop]:
            method = getattr(self, op.kind, None)
            if method is None:
                raise NotImplementedError(f"{type(self).__name__} has no method for operation {op.kind!r}")
            method(op, frame)
        return frame
