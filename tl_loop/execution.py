"""Running the program on tensors: the forward pass and the hook-free read-out.

``Forward`` interprets a ``tl_loop.program.Program`` with the model's modules and hook points.
The model's ``forward`` (with ``start_at_layer`` / ``stop_at_layer``), the batched patching
sweep (``on_block``, resuming at a block) and, through ``HookFree``, the per-step read-outs all
use it: none of them re-encodes the order of execution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tl_loop.errors import InputError
from tl_loop.program import Block, ExitGate, Inject, InnerIn, InnerOut, Interpreter, LeaveLoop, Op, RunFrame, StateIn, StateOut
from tl_loop.components.attention import AttentionContext
from tl_loop.placement import ContextMover, move_frame

#: What a pass started at ``start_at_layer`` must be given, by frame field: the keyword of
#: ``HookedLoopedTransformer.forward`` and what it is.
START_INPUTS = {
    "state": ("state", "the recurrent state of the current step (loops.{r}.hook_state_in, or HRM's z_H)"),
    "prelude_out": ("prelude_out", "the prelude's output, injected at every later step"),
    "inner_state": ("inner_state", "HRM's low-level state z_L"),
    "source": ("prelude_out", "what the step's injection adds"),
}


class Forward(Interpreter):
    """The forward pass over tensors, firing the model's hook points.

    ``context`` is what every attention layer reads besides its input (RoPE tables at the
    tokens' positions, padding, KV slots; ``context_for`` gives a block its own, which decoding
    overrides). ``on_block(frame)`` (optional) is called before every block with the live frame
    (its ``index`` set), which it may modify in place; ``on_op(position, frame)`` (optional)
    likewise before every operation, with its position in the program: the batched patching
    sweeps record frames and stack more rows onto the batch there.

    A model placed over several devices (``model.place``) has a ``Placement``: before each
    operation that uses weights, the whole frame moves to their device (``arrive``), before
    ``on_op`` / ``on_block`` see it, and each block reads its attention context there.
    """

    def __init__(
        self,
        model: Any,
        tokens: torch.Tensor | None,
        context: AttentionContext,
        *,
        init_state: torch.Tensor | None = None,
        init_seed: int | None = None,
        on_block: Callable[[RunFrame], None] | None = None,
        on_op: Callable[[int, RunFrame], None] | None = None,
        started_at: int | None = None,
    ) -> None:
        self.model, self.cfg = model, model.cfg
        self.tokens, self.context = tokens, context
        self.init_state, self.init_seed = init_state, init_seed
        self.on_block, self.on_op = on_block, on_op
        self.started_at = started_at
        self.placement = getattr(model, "_placement", None)
        self._mover = ContextMover() if self.placement is not None else None

    def run(self, program: Any, frame: Any, start: int = 0, stop: int | None = None) -> Any:
        if self.on_op is None:
            return super().run(program, frame, start, stop)
        for position in range(start, len(program) if stop is None else stop):
            self.arrive(program[position], frame)  # on_op sees the frame where the operation runs
            self.on_op(position, frame)
            super().run(program, frame, position, position + 1)
        return frame

    def arrive(self, op: Op, f: RunFrame) -> None:
        """Move the frame to the device of ``op``'s weights (a model placed over several devices)."""
        if self.placement is not None:
            device = self.placement.device_of(op)
            if device is not None:
                move_frame(f, device)

    # ---- modules (overridden by HookFree) ----
    def block_module(self, op: Block) -> Any:
        return self.model.blocks[op.index]

    def loop_module(self, step: int) -> Any:
        return self.model.loops[step]

    def norm_module(self, name: str) -> Any:
        return getattr(self.model, name)

    def context_for(self, op: Block) -> AttentionContext:
        """The attention context of ``op``'s block (the same for every block of a plain pass)."""
        return self.context

    # ---- reading the frame ----
    def need(self, f: RunFrame, name: str, op: Op) -> torch.Tensor:
        value = getattr(f, name)
        if value is None:
            keyword, what = START_INPUTS.get(name, (name, name))
            where = f"start_at_layer={self.started_at}" if self.started_at is not None else "this pass"
            raise InputError(
                f"{op.label} needs {name} ({what}), which {where} did not compute: pass it as "
                f"{keyword}= (e.g. from model.run_to_layer(tokens, layer))"
            )
        return value

    # ---- operations ----
    def embed(self, op: Op, f: RunFrame) -> None:
        model, cfg, tokens = self.model, self.cfg, self.tokens
        embedded = model.embed(tokens)
        f.x = model.hook_embed(embedded * cfg.embed_scale if cfg.embed_scale != 1.0 else embedded)
        if model.pos_embed is not None:
            f.x = f.x + model.hook_pos_embed(model.pos_embed(tokens, self.context.positions))

    def block(self, op: Block, f: RunFrame) -> None:
        self.arrive(op, f)
        if self.on_block is not None:
            f.index = op.index
            self.on_block(f)
        context = self.context_for(op)
        if self.placement is not None:  # the context on the block's device
            context = self._mover.context(context, self.placement.device_of(op))  # type: ignore[union-attr]
        f.x = self.block_module(op)(self.need(f, "x", op), context)

    def enter_loop(self, op: Op, f: RunFrame) -> None:
        model = self.model
        f.prelude_out = self.need(f, "x", op)
        f.state = model.initial_state(f.prelude_out, self.init_state, self.init_seed, self.context.key_valid)
        f.inner_state = model._initial_inner_state(f.prelude_out) if self.cfg.inner_cycles else None

    def state_in(self, op: StateIn, f: RunFrame) -> None:
        f.state = self.loop_module(op.step).hook_state_in(self.need(f, "state", op))
        f.source = f.prelude_out

    def inner_in(self, op: InnerIn, f: RunFrame) -> None:
        cycle = self.loop_module(op.step).inner[op.cycle]
        f.inner_state = cycle.hook_state_in(self.need(f, "inner_state", op))
        f.x = cycle.hook_injected(f.inner_state + self.need(f, "state", op))

    def inner_out(self, op: InnerOut, f: RunFrame) -> None:
        self.arrive(op, f)
        cycle = self.loop_module(op.step).inner[op.cycle]
        x = self.need(f, "x", op)
        f.inner_state = cycle.hook_state_out(cycle.ln_state(x) if op.norm else x)
        f.source = f.inner_state

    def inject(self, op: Inject, f: RunFrame) -> None:
        self.arrive(op, f)
        state = self.need(f, "state", op)
        if op.how == "none":
            f.x = state
            return
        source = self.need(f, "source", op)
        x = state + source if op.how == "add" else self.model.adapter(state, source)
        f.x = self.loop_module(op.step).hook_injected(x)

    def state_out(self, op: StateOut, f: RunFrame) -> None:
        self.arrive(op, f)
        step = self.loop_module(op.step)
        x = self.need(f, "x", op)
        f.state = step.hook_state_out(step.ln_state(x) if op.norm else x)

    def exit_gate(self, op: ExitGate, f: RunFrame) -> torch.Tensor:
        self.arrive(op, f)
        value = f.state if op.reads == "state" else f.x
        return self.loop_module(op.step).hook_exit_gate(self.model.exit_gate(value))

    def leave_loop(self, op: LeaveLoop, f: RunFrame) -> None:
        self.arrive(op, f)
        state = self.need(f, "state", op)
        f.x = self.norm_module("ln_loop_out")(state) if op.norm else state

    def final_norm(self, op: Op, f: RunFrame) -> None:
        self.arrive(op, f)
        f.x = self.norm_module("ln_final")(self.need(f, "x", op))

    def unembed(self, op: Op, f: RunFrame) -> None:
        self.arrive(op, f)
        f.x = self.model.unembed_residual(f.x)


class HookFree(Forward):
    """The same pass on hook-free copies of the modules: nothing fires, nothing is cached.

    Used to read the model's prediction out of a state taken elsewhere (``tl_loop.readout``)."""

    def __init__(self, model: Any, context: AttentionContext) -> None:
        super().__init__(model, None, context)
        self.modules = model._hook_free_modules()

    def block_module(self, op: Block) -> Any:
        return self.modules[op.layer.physical]

    def norm_module(self, name: str) -> Any:
        return self.modules[name]

    def exit_gate(self, op: ExitGate, f: RunFrame) -> None:
        return None
