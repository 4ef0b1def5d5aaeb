"""Hook-bearing views for the loop itself: one ``LoopStep`` per step of the recurrence.

Hook points of step ``r`` (``loops.{r}.…``), in firing order::

    hook_state_in     [batch, pos, d_model]   recurrent state entering the step
    inner.{c}.*       HRM low-level cycles (see ``InnerCycle``)
    hook_injected     [batch, pos, d_model]   state after input injection (first core input)
    ln_state.*        norm between steps (only for r < n_steps - 1, where the family has one)
    hook_state_out    [batch, pos, d_model]   state leaving the step
    hook_exit_gate    [batch, pos, 1]         exit-gate logit (Ouro)
"""

from __future__ import annotations

import torch.nn as nn

from tl_loop.components.base import LoopHookPoint, set_present
from tl_loop.components.norm import HookedNorm, NormWeights
from tl_loop.config import LoopedConfig


class InnerCycle(nn.Module):
    """One run of the HRM low-level stack inside a step: ``z_L = L(z_L + z_H)``."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.hook_state_in = LoopHookPoint()  # [batch, pos, d_model] z_L before the cycle
        self.hook_injected = LoopHookPoint()  # [batch, pos, d_model] z_L + z_H
        if cfg.inner_norm:
            self.ln_state = HookedNorm(None, cfg.norm_type, cfg.eps)
        self.hook_state_out = LoopHookPoint()  # [batch, pos, d_model]


class LoopStep(nn.Module):
    """The loop-level hook points of step ``step``. The norm between steps exists only while the
    step is not the last one (``set_last``): it is hidden, hooks and all, at the last step."""

    def __init__(self, cfg: LoopedConfig, step: int, loop_norm: NormWeights | None) -> None:
        super().__init__()
        self.step = step
        self.hook_state_in = LoopHookPoint()  # [batch, pos, d_model]
        if cfg.inner_cycles:
            self.inner = nn.ModuleList(InnerCycle(cfg) for _ in range(cfg.inner_cycles))
        if cfg.injection != "none":
            self.hook_injected = LoopHookPoint()  # [batch, pos, d_model]
        if cfg.norm_between_steps:
            self.ln_state = HookedNorm(loop_norm, cfg.norm_type, cfg.eps)
        self.hook_state_out = LoopHookPoint()  # [batch, pos, d_model]
        if cfg.exit_gate:
            self.hook_exit_gate = LoopHookPoint()  # [batch, pos, 1]

    def set_last(self, is_last: bool) -> None:
        """Whether this step is the loop's last (no norm between steps follows it)."""
        set_present(self, "ln_state", not is_last)
