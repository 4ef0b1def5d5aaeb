"""Reading the model's prediction out of every step of the loop.

* :func:`step_logits` -- the logits the model would give if it left the loop after step ``r``:
  the state at the end of step ``r`` goes through what follows the loop (the norm after the
  loop, the coda, ``ln_final``, the unembedding). For Huginn this is the reference run with
  ``num_steps=r+1``; for Ouro it is ``lm_head(norm(h_r))``, the reference's ``exit_at_step=r``.
* :func:`exit_probabilities` -- Ouro's per-step exit distribution from the exit-gate logits.
* :func:`threshold_exit_logits` -- Ouro's threshold exit: per token, the first step whose
  cumulative exit probability reaches ``threshold``.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float

from tl_loop.errors import InputError, UnsupportedError
from tl_loop.execution import HookFree
from tl_loop.program import RunFrame
from tl_loop.threads import exclusive


@exclusive
def read_out(
    model: Any,
    states: Float[torch.Tensor, "... pos d_model"],
    attention_mask: Bool[torch.Tensor, "batch pos"] | None = None,
) -> Float[torch.Tensor, "... pos d_vocab"]:
    """Logits for recurrent states taken at the end of a step (before any loop norm): the
    program's operations from ``LeaveLoop`` on, run on hook-free modules. ``attention_mask``:
    the padding of the pass the states come from (``states``' batch axis is its batch)."""
    lead = states.shape[:-2]
    if states.numel() == 0:  # no step to read out (n_steps=0): an empty step axis
        return states.new_zeros(*states.shape[:-1], model.cfg.d_vocab)
    x = states.reshape(-1, *states.shape[-2:])
    if attention_mask is not None:
        attention_mask = attention_mask.repeat(x.shape[0] // attention_mask.shape[0], 1)
    program = model.program
    frame = RunFrame(0, state=x)
    context = model.attention_context(x.shape[1], x.device, attention_mask)
    HookFree(model, context).run(program, frame, program.position("leave_loop"))
    return frame.x.reshape(*lead, *x.shape[1:-1], -1)


def step_end_hook_names(model: Any) -> list[str]:
    """The hook of the state at the end of every step (the last layer of the cycle's
    ``hook_resid_post``), at the model's current number of steps."""
    sched = model.schedule
    last = sched.layers_per_step - 1
    return [f"blocks.{sched.index(r, last)}.hook_resid_post" for r in range(sched.n_steps)]


@exclusive
def step_states(model: Any, tokens: Any, **forward_kwargs: Any) -> Float[torch.Tensor, "step batch pos d_model"]:
    """The recurrent state at the end of every step (before the loop norm), ``[n_steps, ...]``."""
    n_steps = forward_kwargs.pop("n_steps", None)
    ctx = model.steps(n_steps, forward_kwargs.pop("force", False)) if n_steps is not None else _null()
    with ctx:
        names = step_end_hook_names(model)
        _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None, return_cache_object=False, **forward_kwargs)
        if not names:
            tokens_t = model._validate_tokens(tokens)
            return model.W_E.new_zeros(0, *tokens_t.shape, model.cfg.d_model)
        return torch.stack([cache[n] for n in names])


@exclusive
@torch.no_grad()
def step_logits(model: Any, tokens: Any, **forward_kwargs: Any) -> Float[torch.Tensor, "step batch pos d_vocab"]:
    """Logits when leaving the loop after each step, ``[n_steps, batch, pos, d_vocab]``."""
    tokens, mask = model._input_tokens(
        tokens, forward_kwargs.pop("prepend_bos", None), forward_kwargs.pop("padding_side", None),
        forward_kwargs.pop("attention_mask", None),
    )
    states = step_states(model, tokens, attention_mask=mask, **forward_kwargs)
    return read_out(model, states, mask)


@exclusive
def exit_gate_logits(model: Any, tokens: Any, **forward_kwargs: Any) -> Float[torch.Tensor, "step batch pos"]:
    """The exit gate's logit after every step, ``[n_steps, batch, pos]``."""
    if not model.cfg.exit_gate:
        raise UnsupportedError("this model has no exit gate (cfg.exit_gate is False)")
    n_steps = forward_kwargs.pop("n_steps", None)
    ctx = model.steps(n_steps, forward_kwargs.pop("force", False)) if n_steps is not None else _null()
    with ctx:
        names = [f"loops.{r}.hook_exit_gate" for r in range(model.cfg.n_steps)]
        _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None, return_cache_object=False,
                                        **forward_kwargs)
        if not names:  # n_steps=0: an empty step axis
            return model.W_E.new_zeros(0, *model._validate_tokens(tokens).shape)
        return torch.stack([cache[n][..., 0] for n in names])


def exit_pdf(gate_logits: Float[torch.Tensor, "step ..."]) -> Float[torch.Tensor, "step ..."]:
    """Ouro's exit distribution: ``p_t = lambda_t prod_{s<t} (1 - lambda_s)``, the last step
    taking the remaining mass (computed in the logits' dtype, as the reference)."""
    if len(gate_logits) == 0:
        return gate_logits.clone()
    remaining = torch.ones_like(gate_logits[0])
    pdf = []
    for t, logit in enumerate(gate_logits):
        lam = torch.sigmoid(logit)
        if t < len(gate_logits) - 1:
            pdf.append(lam * remaining)
            remaining = remaining * (1.0 - lam)
        else:
            pdf.append(remaining)
    return torch.stack(pdf)


@exclusive
@torch.no_grad()
def exit_probabilities(model: Any, tokens: Any, **forward_kwargs: Any) -> Float[torch.Tensor, "step batch pos"]:
    """Per-step exit probabilities ``[n_steps, batch, pos]`` (sum to 1 over steps)."""
    return exit_pdf(exit_gate_logits(model, tokens, **forward_kwargs))


@exclusive
@torch.no_grad()
def threshold_exit_logits(
    model: Any, tokens: Any, threshold: float | None = None, **forward_kwargs: Any
) -> tuple[Float[torch.Tensor, "batch pos d_vocab"], torch.Tensor]:
    """Ouro's threshold exit: per token, logits of the first step whose cumulative exit
    probability is ``>= threshold`` (default ``cfg.extra["early_exit_threshold"]`` or 1.0), else
    the last step. Returns ``(logits, exit_step [batch, pos])``. Note that rounding can make
    tokens exit early even at threshold 1.0, exactly as in the reference."""
    if threshold is None:
        threshold = float(model.cfg.extra.get("early_exit_threshold", 1.0))
    gates = exit_gate_logits(model, tokens, **dict(forward_kwargs))
    if len(gates) == 0:
        raise InputError("a threshold exit needs at least one step (n_steps=0 runs no step to exit from)")
    logits = step_logits(model, tokens, **forward_kwargs)
    cum = torch.cumsum(exit_pdf(gates), dim=0)
    reached = cum >= threshold
    n = gates.shape[0]
    first = torch.where(reached.any(0), reached.float().argmax(0), torch.full_like(reached[0], n - 1, dtype=torch.long))
    index = first[None, ..., None].expand(1, *first.shape, logits.shape[-1])
    return logits.gather(0, index)[0], first


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
