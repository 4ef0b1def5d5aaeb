"""Decoding: ``model.generate`` with per-step KV caches and per-token adaptive exit.

How the pieces connect:

* ``Decode`` interprets the model's ``Program`` (the same operations as the forward pass, with
  the model's hook points firing) on the new positions of one decoding call. After every
  step's ``StateOut`` it evaluates the exit rule (``tl_loop.exits``) per batch row.
* **Exit semantics by family.** *Freeze* (Huginn, retrofitted, custom loops): a row that exits
  at step ``s`` keeps its state of step ``s``; later steps write no KV entries for it (they are
  marked missing, and later tokens skip it there: the reference's ``"full"`` lookup); once every
  row has exited the remaining steps are not run. *Select* (models with an exit gate, Ouro):
  every step runs and is cached; the exit only chooses which step's state is read out.
* ``KVCache`` holds one slot per effective layer (Huginn's ``(step, layer)`` slots, Ouro's
  ``step * layers + layer``, HRM's per-cycle slots are all "one slot per effective layer at a
  fixed depth"). A slot stores keys by absolute position, so a coda slot written again for the
  same position (Huginn's read-out during the exit checks) is overwritten, as in the reference.
* The uncached path (``use_past_kv_cache=False``) reruns ``Decode`` on the whole sequence each
  token; its exit is decided on the last position for the whole row, as the reference's prefill.
  At a fixed depth it equals cached decoding; with an adaptive exit it cannot (earlier tokens'
  depths are not kept), which is what ``replay`` reproduces instead: one pass over prompt +
  generation with every position at its own exit step (ragged steps).

>>> from tl_loop import LoopedConfig, HookedLoopedTransformer, exits
>>> cfg = LoopedConfig(d_model=32, d_head=8, d_vocab=50, n_core_layers=2, n_steps=3)
>>> model = HookedLoopedTransformer(cfg, seed=0)
>>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False,
...                      stop_at_eos=False, verbose=False, exit=exits.at_step(1), return_details=True)
>>> out.tokens.shape, out.logits.shape, out.exit_step.tolist()
(torch.Size([1, 7]), torch.Size([1, 4, 50]), [[1, 1, 1, 1]])
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int

from tl_loop import exits as exits_module
from tl_loop.components.attention import AttentionContext
from tl_loop.errors import InputError, UnsupportedError
from tl_loop.execution import Forward, HookFree
from tl_loop.exits import ExitRule, Probe
from tl_loop.program import Block, ExitGate, LeaveLoop, Op, Program, RunFrame, StateIn, StateOut, StepOp
from tl_loop.threads import exclusive


# ---------------------------------------------------------------------------- KV cache
class KVCache:
    """Per-effective-layer keys and values of one generation, by absolute position.

    ``length``: every position the generation will run; ``start``: where the current call's
    new positions begin. Slots are allocated on their first write (a step first reached late
    has no entries for the earlier positions)."""

    def __init__(self, batch: int, length: int) -> None:
        self.batch, self.length, self.start = batch, length, 0
        self.slots: dict[int, _Slot] = {}

    def writer(self, layer: int, valid: Bool[torch.Tensor, "batch pos"] | None) -> "_Writer":
        slot = self.slots.get(layer)
        if slot is None:
            slot = self.slots[layer] = _Slot(self)
        return _Writer(slot, self.start, valid)

    def __repr__(self) -> str:
        return f"KVCache({len(self.slots)} slots, batch={self.batch}, length={self.length}, filled={self.start})"


class _Slot:
    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.gaps = False  # some position before the newest holds no entry
        self.filled = 0  # positions below this were written (or skipped) by earlier calls

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> tuple:
        if self.k is None:
            shape = (self.cache.batch, self.cache.length, *k.shape[2:])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
            self.valid = torch.zeros(self.cache.batch, self.cache.length, dtype=torch.bool, device=k.device)
        end = start + k.shape[1]
        self.gaps = self.gaps or start > self.filled  # calls that skipped this slot left no entries
        self.filled = max(self.filled, end)
        self.k[:, start:end], self.v[:, start:end] = k, v
        if valid is None:
            self.valid[:, start:end] = True
        else:
            self.valid[:, start:end] = valid
            self.gaps = True
        return self.k[:, :end], self.v[:, :end], (self.valid[:, :end] if self.gaps else None)


@dataclasses.dataclass
class _Writer:
    """A ``KVSlot`` (``tl_loop.components.attention``): one layer's slot in one call."""

    slot: _Slot
    start: int
    valid: torch.Tensor | None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        return self.slot.write(self.start, k, v, self.valid)


# ---------------------------------------------------------------------------- one decoding call
def _in_loop(op: Op) -> bool:
    return isinstance(op, StepOp) or (isinstance(op, Block) and op.layer.step is not None)


class Decode(Forward):
    """One decoding call: the program on the new positions, with KV slots and exits.

    ``valid``: real positions of the call ``[batch, pos]`` (None: all); ``rule``: the exit rule
    (None: every step); ``exit_at``: predetermined exit step per position ``[batch, pos]``
    (the ragged replay); ``select``: Ouro's semantics (every step runs, the exit picks the
    read-out) instead of freezing exited rows."""

    def __init__(
        self,
        model: Any,
        tokens: torch.Tensor,
        context: AttentionContext,
        *,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        rule: ExitRule | None = None,
        exit_at: torch.Tensor | None = None,
        select: bool = False,
        init_state: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, tokens, context, init_state=init_state)
        batch, n_pos = tokens.shape
        self.cache, self.valid, self.rule, self.exit_at, self.select = cache, valid, rule, exit_at, select
        self.n_steps = model.cfg.n_steps
        self._active = torch.ones(batch, n_pos, dtype=torch.bool, device=tokens.device)
        self._masked_context: AttentionContext | None = None
        self.exit_step = torch.full((batch,), self.n_steps - 1, dtype=torch.long, device=tokens.device)
        self.memory = rule.start(batch, model.cfg.d_vocab, tokens.device) if rule is not None else {}
        self.done = False
        self.initial: torch.Tensor | None = None
        self.final_x: torch.Tensor | None = None
        self.entering: list[torch.Tensor] = []
        self.xs: list[torch.Tensor] = []
        self.gates: dict[int, torch.Tensor] = {}
        self.values: list[torch.Tensor] = []
        self._tail: HookFree | None = None

    @property
    def active(self) -> Bool[torch.Tensor, "batch pos"]:
        """Which positions run the current step (False once their row / position exited)."""
        return self._active

    @active.setter
    def active(self, value: torch.Tensor) -> None:
        self._active, self._masked_context = value, None

    # ---- contexts: each layer its slot, with the rows / positions that run it ----
    def context_for(self, op: Block) -> AttentionContext:
        step = op.layer.step
        running = None if step is None or bool(self.active.all()) else self.active
        valid = self.valid if running is None else (running if self.valid is None else running & self.valid)
        if self.cache is not None:
            return dataclasses.replace(self.context, kv=self.cache.writer(op.index, valid))
        if running is None:
            return self.context
        if self._masked_context is None:  # without a cache: keys of exited positions masked out
            self._masked_context = dataclasses.replace(self.context, key_valid=valid, _bias_memo={})
        return self._masked_context

    # ---- interpretation ----
    def run(self, program: Program, frame: Any, start: int = 0, stop: int | None = None) -> Any:
        for op in program.ops[start:stop]:
            if self.done and _in_loop(op):
                continue
            getattr(self, op.kind)(op, frame)
        return frame

    def enter_loop(self, op: Op, f: RunFrame) -> None:
        super().enter_loop(op, f)
        self.initial = f.state

    def state_in(self, op: StateIn, f: RunFrame) -> None:
        super().state_in(op, f)
        self.entering.append(f.state)
        if self.exit_at is not None and not self.select:
            self.active = self.exit_at >= op.step

    def state_out(self, op: StateOut, f: RunFrame) -> None:
        self.arrive(op, f)  # a placed model: x on the device of the step's norm
        x = self.need(f, "x", op)
        super().state_out(op, f)
        if self.select:
            self.xs.append(x)
            return
        if self.final_x is None:
            self.final_x = x
        else:
            self.final_x = torch.where(self.active[..., None].to(x.device), x, self.final_x.to(x.device))
        if self.rule is not None:
            exited, value = self.rule.check(self._probe(op.step, x, self.entering[-1]), self.memory)
            self.values.append(value)
            running = self.active.any(-1)
            newly = exited.to(running.device) & running
            self.exit_step = torch.where(newly, op.step, self.exit_step)
            self.active = self.active & ~newly[:, None]
        if not self.active.any():
            self.done = True

    def exit_gate(self, op: ExitGate, f: RunFrame) -> torch.Tensor:
        gate = super().exit_gate(op, f)
        self.gates[op.step] = gate[..., 0]
        return gate

    def leave_loop(self, op: LeaveLoop, f: RunFrame) -> None:
        if self.final_x is not None:
            f.state = self.final_x
        super().leave_loop(op, f)

    # ---- read-outs and exit decisions ----
    def _probe(self, step: int, x: torch.Tensor, previous: torch.Tensor) -> Probe:
        home = self.exit_step.device  # a placed model: the rule computes where the tokens are
        return Probe(step, x.to(home), previous.to(home), self.valid, lambda: self.read_out(x)[:, -1].to(home),
                     lambda: self.gates[step][:, -1].to(home))

    def read_out(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """Logits of step-end states ``x``: the program from ``LeaveLoop`` on, on hook-free
        modules, with this call's KV slots (Huginn's coda runs with the cache)."""
        if self._tail is None:
            self._tail = _Tail(self)
        program = self.model.program
        frame = RunFrame(0, state=x)
        self._tail.run(program, frame, program.position("leave_loop"))
        return frame.x

    def finish(self, f: RunFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [batch, pos, d_vocab], exit_step [batch])`` after ``run``: in select mode
        the rule (or ``exit_at``) picks each row's step now, and rows that exit early are read
        out again from their step's state."""
        logits = f.x.to(self.exit_step.device)  # a placed model: back where the tokens are
        if not self.select or (self.rule is None and self.exit_at is None):
            return logits, self.exit_step
        states = torch.stack([x.to(self.exit_step.device) for x in self.xs])  # [step, batch, pos, d_model]
        if self.exit_at is not None:
            choice = self.exit_at
        else:
            exited = torch.zeros_like(self.exit_step, dtype=torch.bool)
            for step, x in enumerate(self.xs):
                hit, value = self.rule.check(self._probe(step, x, self.entering[step]), self.memory)
                self.values.append(value)
                newly = hit.to(exited.device) & ~exited
                self.exit_step = torch.where(newly, step, self.exit_step)
                exited |= newly
            choice = self.exit_step[:, None].expand(states.shape[1:3])
        if bool((choice == self.n_steps - 1).all()):
            return logits, self.exit_step
        index = choice[None, ..., None].expand(1, *states.shape[1:])
        chosen = states.gather(0, index)[0]
        return self.read_out(chosen).to(self.exit_step.device), self.exit_step


class _Tail(HookFree):
    """The hook-free read-out of a ``Decode`` call, with the call's KV slots."""

    def __init__(self, decode: Decode) -> None:
        super().__init__(decode.model, decode.context)
        self.decode = decode

    def context_for(self, op: Block) -> AttentionContext:
        return self.decode.context_for(op)


# ---------------------------------------------------------------------------- results
@dataclasses.dataclass
class GenerationResult:
    """What ``generate(..., return_details=True)`` returns.

    ``tokens`` ``[batch, P + new]``; ``logits`` ``[batch, new, d_vocab]`` (the logits that
    produced each generated token); ``exit_step`` ``[batch, new]`` (0-based step read out for
    each token; -1 after a row stopped at EOS); ``attention_mask`` ``[batch, P + new]`` (False
    on padding; None without padding); ``init_state`` ``[batch, P + new - 1, d_model]``: the
    initial state every position ran from; ``exit_values`` ``[batch, new, n_steps]``: the exit
    rule's value after each step (NaN where not computed).
    """

    tokens: Int[torch.Tensor, "batch seq"]
    logits: Float[torch.Tensor, "batch new d_vocab"]
    exit_step: Int[torch.Tensor, "batch new"]
    prompt_length: int
    n_steps: int
    exit: ExitRule | None
    semantics: Literal["freeze", "select"]
    attention_mask: Bool[torch.Tensor, "batch seq"] | None
    init_state: Float[torch.Tensor, "batch run d_model"]
    exit_values: Float[torch.Tensor, "batch new step"]
    text: list[str] | None = None

    @property
    def steps_used(self) -> Int[torch.Tensor, "batch new"]:
        """Steps each generated token ran (freeze semantics) or read out at (select): ``exit_step + 1``."""
        return self.exit_step + 1

    @property
    def new_tokens(self) -> Int[torch.Tensor, "batch new"]:
        return self.tokens[:, self.prompt_length :]

    def position_exit_steps(self) -> Int[torch.Tensor, "batch run"]:
        """The exit step of every position that was run (prompt positions: the prefill's)."""
        prefill = self.exit_step[:, :1].clamp(min=0).expand(-1, self.prompt_length)
        return torch.cat([prefill, self.exit_step[:, 1:].clamp(min=0)], dim=1)

    def replay(self, model: Any, names_filter: Any = None, fwd_hooks: Sequence = ()) -> tuple[torch.Tensor, Any]:
        """One hooked forward over prompt + generation with every position at its own exit
        step: ``(logits [batch, run, d_vocab], LoopedActivationCache)``; see ``replay``."""
        return replay(model, self, names_filter=names_filter, fwd_hooks=fwd_hooks)


# ---------------------------------------------------------------------------- checks
def _family_rule(model: Any) -> ExitRule | None:
    """The read-out ``exit=None`` keeps: Ouro's exit gate at its configured threshold / step."""
    cfg = model.cfg
    if not cfg.exit_gate:
        return None
    if cfg.extra.get("early_exit_step") is not None:
        return exits_module.at_step(int(cfg.extra["early_exit_step"]))
    return exits_module.gate(float(cfg.extra.get("early_exit_threshold", 1.0)))


def _check_rule(model: Any, rule: ExitRule, n_steps: int) -> None:
    if rule.uses == "gate" and not model.cfg.exit_gate:
        raise UnsupportedError(f"exit={rule!r} needs an exit gate (Ouro); this model has none (cfg.exit_gate is False)")
    if rule.uses == "step" and rule.threshold >= n_steps:
        raise InputError(f"exit={rule!r}: step {rule.threshold} does not exist at n_steps={n_steps} (steps 0..{n_steps - 1})")
    if n_steps == 0:
        raise UnsupportedError("an exit rule needs at least one step (n_steps=0 runs none)")


def _check_sampling(model: Any, do_sample: bool, top_k: Any, top_p: Any, temperature: Any, freq_penalty: Any) -> None:
    if not isinstance(do_sample, bool):
        raise InputError(f"do_sample must be True or False, got {do_sample!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= model.cfg.d_vocab):
        raise InputError(f"top_k must be an int in [1, d_vocab={model.cfg.d_vocab}] or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(freq_penalty, bool) or not isinstance(freq_penalty, (int, float)) or not (math.isfinite(freq_penalty) and freq_penalty >= 0):
        raise InputError(f"freq_penalty must be a number >= 0, got {freq_penalty!r}")


def _eos_ids(model: Any, stop_at_eos: bool, eos_token_id: Any) -> list[int]:
    if eos_token_id is None:
        tok_eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
        if tok_eos is None and stop_at_eos:
            raise InputError("stop_at_eos=True needs an EOS id: pass eos_token_id= (this model's tokenizer has none), or stop_at_eos=False")
        return [] if tok_eos is None else [int(tok_eos)]
    ids = [eos_token_id] if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool) else eos_token_id
    if not isinstance(ids, (list, tuple)) or not ids or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < model.cfg.d_vocab for i in ids
    ):
        raise InputError(f"eos_token_id must be a token id or a list of token ids in [0, {model.cfg.d_vocab}), got {eos_token_id!r}")
    return [int(i) for i in ids]


def _resolve_init(
    model: Any, init_state: Any, batch: int, prompt_len: int, length: int, mask: torch.Tensor | None,
    positions: torch.Tensor, device: torch.device,
) -> torch.Tensor | None:
    """The initial state of every position to run ``[batch, length, d_model]`` (None: the
    family's rule computes it from the prelude output in each call).

    A random initial state (Huginn) is drawn so that it does not depend on ``max_new_tokens``,
    the batch or the cache: the prompt's positions get what ``forward(prompt)`` draws, each
    decoded position a state from a generator seeded with ``(cfg.state_init_seed, position)``."""
    cfg = model.cfg
    shape = (batch, length, cfg.d_model)
    dtype = model.W_E.dtype
    if isinstance(init_state, str):
        if init_state != "zeros":
            raise InputError(f"init_state must be 'zeros', a tensor [batch, P + max_new_tokens - 1, d_model] or None, got {init_state!r}")
        return torch.zeros(shape, dtype=dtype, device=device)
    if init_state is not None:
        if not isinstance(init_state, torch.Tensor):
            raise InputError(f"init_state must be 'zeros', a tensor or None, got {type(init_state).__name__}")
        if tuple(init_state.shape) != shape:
            raise InputError(
                f"init_state has shape {tuple(init_state.shape)}, expected [batch, P + max_new_tokens - 1, d_model] = {shape} "
                "(the initial state of every position the decoding runs)"
            )
        return init_state.to(device=device, dtype=dtype)
    if cfg.state_init != "random":
        return None
    like = torch.zeros(shape, dtype=dtype, device=device)
    state = like.clone()
    state[:, :prompt_len] = model.initial_state(like[:, :prompt_len], None, None, mask)
    for j in range(prompt_len, length):
        for row in range(batch):
            seed = 1_000_003 * (int(cfg.state_init_seed) + 1) + int(positions[row, j])
            state[row, j] = model._random_state((1, 1, cfg.d_model), like, seed)[0, 0]
    return state


# ---------------------------------------------------------------------------- generate
@exclusive
@torch.no_grad()
def generate(
    model: Any,
    input: Any = "",
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: bool | None = None,
    padding_side: Literal["left", "right"] | None = None,
    return_type: Literal["input", "str", "tokens"] | None = "input",
    verbose: bool = True,
    *,
    n_steps: int | None = None,
    exit: ExitRule | str | None = None,
    init_state: str | torch.Tensor | None = None,
    continuous_compute: bool = False,
    attention_mask: torch.Tensor | None = None,
    fwd_hooks: Sequence = (),
    return_details: bool = False,
    force: bool = False,
) -> Any:
    """Sample tokens as TransformerLens's ``generate`` (same arguments and defaults), with
    per-step KV caches (``use_past_kv_cache``) and, as keywords:

    * ``n_steps``: the recurrence depth for this call (hooks are named at it);
    * ``exit``: a per-token exit rule from ``tl_loop.exits`` (or ``"entropy_diff:0.01"``);
      None keeps the family's read-out (Ouro: its exit gate at the configured threshold);
    * ``init_state``: ``"zeros"``, a tensor ``[batch, P + max_new_tokens - 1, d_model]``
      (the initial state of every position the decoding runs), or None (the family's rule);
    * ``continuous_compute``: each new token starts from the previous token's final state;
    * ``attention_mask`` (left padding), ``fwd_hooks`` (fire during decoding, on the new
      positions of each call), ``force``;
    * ``return_details=True``: a ``tl_loop.generation.GenerationResult`` (``.tokens``,
      ``.logits``, ``.exit_step``, ``.replay(model)`` ...).

    See this module's docstring for each family's cache and exit semantics.
    """
    if return_type not in ("input", "str", "tokens", None):
        raise InputError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_sampling(model, do_sample, top_k, top_p, temperature, freq_penalty)
    rule = exits_module.parse(exit)
    stops = _eos_ids(model, stop_at_eos, eos_token_id)
    if continuous_compute and not use_past_kv_cache:
        raise UnsupportedError("continuous_compute needs use_past_kv_cache=True (each token starts from the previous token's final state)")
    is_text = isinstance(input, str) or (isinstance(input, list) and bool(input) and isinstance(input[0], str))
    tokens, mask = model._input_tokens(input, prepend_bos, padding_side or "left", attention_mask)
    if mask is not None and not bool(mask[:, -1].all()):
        raise InputError("generate needs left padding (every row's last prompt token real): pass padding_side='left'")
    batch, prompt_len = tokens.shape
    if prompt_len + max_new_tokens > model.cfg.n_ctx:
        raise InputError(
            f"max_new_tokens={max_new_tokens} runs past the context: the prompt has {prompt_len} tokens and "
            f"n_ctx={model.cfg.n_ctx}, so at most {model.cfg.n_ctx - prompt_len} new tokens fit"
        )
    steps_ctx = model.steps(n_steps, force) if n_steps is not None else contextlib.nullcontext()
    hooks_ctx = model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else contextlib.nullcontext()
    with steps_ctx, hooks_ctx:
        depth = model.cfg.n_steps
        select = bool(model.cfg.exit_gate)
        rule = rule if rule is not None else _family_rule(model)
        if rule is not None:
            _check_rule(model, rule, depth)
        result = _decode(model, tokens, mask, max_new_tokens, rule, select, init_state, continuous_compute,
                         use_past_kv_cache, do_sample, top_k, top_p, temperature, freq_penalty, stops, verbose)
    result.n_steps, result.exit = depth, rule
    if model.tokenizer is not None:
        result.text = model.to_string(result.tokens)
    if return_details:
        return result
    if return_type == "tokens" or (return_type == "input" and not is_text) or return_type is None:
        return result.tokens
    text = model.to_string(result.tokens)
    return text[0] if isinstance(input, str) else text


def _decode(
    model: Any, tokens: torch.Tensor, mask: torch.Tensor | None, max_new: int, rule: ExitRule | None, select: bool,
    init_state: Any, continuous: bool, use_cache: bool, do_sample: bool, top_k: Any, top_p: Any,
    temperature: float, freq_penalty: float, stops: list[int], verbose: bool,
) -> GenerationResult:
    from transformer_lens.utilities import sample_logits

    device = tokens.device
    batch, prompt_len = tokens.shape
    run_len = prompt_len + max_new - 1  # positions that will be run (the last token is never fed)
    full_valid = torch.ones(batch, run_len, dtype=torch.bool, device=device)
    if mask is not None:
        full_valid[:, :prompt_len] = mask
    positions = (full_valid.long().cumsum(-1) - 1).clamp_(min=0)
    padded = mask is not None
    init_full = _resolve_init(model, init_state, batch, prompt_len, run_len, mask, positions, device)
    used_init = torch.zeros(batch, run_len, model.cfg.d_model, dtype=model.W_E.dtype, device=device)
    cache = KVCache(batch, run_len) if use_cache else None
    seq = tokens
    logits_out, exit_out, values_out = [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(stops, device=device, dtype=torch.long) if stops else None
    last_state: torch.Tensor | None = None
    bar = _progress(max_new, verbose)
    for k in range(max_new):
        start = prompt_len + k - 1 if (use_cache and k > 0) else 0
        end = prompt_len + k
        new = seq[:, start:end]
        if cache is not None:
            cache.start = start
        context = model.attention_context(run_len, device, full_valid[:, :end] if padded else None,
                                          positions=positions[:, start:end])
        init = None if init_full is None else init_full[:, start:end]
        if continuous and k > 0:
            init = last_state
        model._check_no_hidden_hooks()
        decode = Decode(model, new, context, cache=cache, valid=full_valid[:, start:end] if padded else None,
                        rule=rule, select=select, init_state=init)
        frame = decode.run(model.program, RunFrame(0))
        logits, exit_step = decode.finish(frame)
        if decode.initial is not None:
            used_init[:, start:end] = decode.initial
        last_state = None if decode.final_x is None else decode.final_x[:, -1:]
        next_logits = logits[:, -1]
        if do_sample:
            token = sample_logits(next_logits, top_k=top_k, top_p=top_p, temperature=temperature,
                                  freq_penalty=freq_penalty, tokens=seq)
        else:
            token = next_logits.argmax(-1)
        if stop_ids is not None:
            token = torch.where(finished, stop_ids[0], token)
        exit_step = torch.where(finished, -1, exit_step)
        logits_out.append(next_logits)
        exit_out.append(exit_step)
        values_out.append(_values(decode.values, batch, model.cfg.n_steps, device))
        seq = torch.cat([seq, token[:, None].to(seq.dtype)], dim=1)
        bar.update(1)
        if stop_ids is not None:
            finished |= torch.isin(token, stop_ids)
            if bool(finished.all()):
                break
    bar.close()
    n_new = len(logits_out)
    full_mask = None
    if padded:
        full_mask = torch.ones(seq.shape, dtype=torch.bool, device=device)
        full_mask[:, :prompt_len] = mask
    return GenerationResult(
        tokens=seq, logits=torch.stack(logits_out, 1), exit_step=torch.stack(exit_out, 1), prompt_length=prompt_len,
        n_steps=model.cfg.n_steps, exit=rule, semantics="select" if select else "freeze", attention_mask=full_mask,
        init_state=used_init[:, : prompt_len + n_new - 1], exit_values=torch.stack(values_out, 1),
    )


def _values(values: list[torch.Tensor], batch: int, n_steps: int, device: torch.device) -> torch.Tensor:
    out = torch.full((batch, n_steps), float("nan"), device=device)
    for s, v in enumerate(values):
        out[:, s] = v.float()
    return out


def _progress(total: int, verbose: bool) -> Any:
    if verbose:
        import tqdm

        return tqdm.tqdm(total=total, desc="generate")
    return _NoBar()


class _NoBar:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------------- ragged replay
@exclusive
@torch.no_grad()
def replay(
    model: Any, result: GenerationResult, names_filter: Any = None, fwd_hooks: Sequence = ()
) -> tuple[Float[torch.Tensor, "batch run d_vocab"], Any]:
    """Replay a generation as one hooked forward over prompt + generation (every position but
    the last token) with each position at its own exit step: under freeze semantics a position
    stops after its exit step (later steps neither update it nor let later positions attend to
    it), under select semantics every step runs and each position reads out its exit step.

    Returns ``(logits, cache)``: logits ``[batch, run, d_vocab]`` (at the generated positions
    those that produced each token) and a ``LoopedActivationCache`` at the generation's depth.
    Under freeze semantics a position's activations after its exit step are computed but
    discarded: mask them with ``result.position_exit_steps()``.
    """
    from tl_loop.cache import LoopedActivationCache

    seq = result.tokens[:, :-1]
    run_len = seq.shape[1]
    exit_at = result.position_exit_steps()[:, :run_len]
    valid = None if result.attention_mask is None else result.attention_mask[:, :run_len]
    with model.steps(result.n_steps, force=True):
        cache_dict, caching, _ = model.get_caching_hooks(names_filter)
        with model.hooks(fwd_hooks=[*caching, *fwd_hooks]):
            model._check_no_hidden_hooks()
            context = model.attention_context(run_len, seq.device, valid)
            decode = Decode(model, seq, context, valid=valid, exit_at=exit_at, select=result.semantics == "select",
                            init_state=result.init_state[:, :run_len])
            frame = decode.run(model.program, RunFrame(0))
            logits, _ = decode.finish(frame)
        cache = LoopedActivationCache(cache_dict, model, n_steps=result.n_steps)
    return logits, cache
