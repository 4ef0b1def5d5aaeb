"""The unrolled schedule: which physical block runs as effective layer ``i``.

This module is the one place that knows the order in which a looped model executes its blocks.
The model's forward pass, the hook names, the attribution replay and every analysis read it.

>>> from tl_loop.config import LoopedConfig
>>> cfg = LoopedConfig(n_prelude_layers=1, n_core_layers=2, n_coda_layers=1, n_steps=3)
>>> s = Schedule.from_config(cfg)
>>> [layer.label for layer in s][:4]
['prelude.0', 'core.0.0', 'core.0.1', 'core.1.0']
>>> s.index(step=2, layer_in_cycle=1), s.locate(6)
(6, (2, 1))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float

from tl_loop.config import LoopedConfig

Stage = Literal["prelude", "inner", "core", "coda"]


@dataclass(frozen=True)
class EffectiveLayer:
    """One entry of the schedule."""

    index: int  # effective layer index (``blocks.{index}``)
    stage: Stage  # prelude / inner (HRM low-level stack) / core (recurrent block) / coda
    layer_in_stack: int  # position within its physical stack
    step: int | None = None  # loop step (None for prelude / coda)
    layer_in_cycle: int | None = None  # position within one step (None for prelude / coda)
    inner_cycle: int | None = None  # HRM inner cycle within the step

    @property
    def physical(self) -> str:
        """Name of the physical block whose weights run here, e.g. ``"core.1"``."""
        return f"{self.stage}.{self.layer_in_stack}"

    @property
    def label(self) -> str:
        """Short label: ``prelude.0``, ``core.{step}.{j}``, ``inner.{step}.{cycle}.{j}``, ``coda.0``."""
        if self.stage == "core":
            return f"core.{self.step}.{self.layer_in_stack}"
        if self.stage == "inner":
            return f"inner.{self.step}.{self.inner_cycle}.{self.layer_in_stack}"
        return self.physical

    @property
    def in_loop(self) -> bool:
        return self.step is not None


class Schedule(Sequence[EffectiveLayer]):
    """The effective layers of a looped model at a fixed number of steps."""

    def __init__(self, layers: list[EffectiveLayer], n_steps: int, layers_per_step: int) -> None:
        self.layers = layers
        self.n_steps = n_steps
        self.layers_per_step = layers_per_step
        self._first_loop = next((x.index for x in layers if x.in_loop), len(layers))

    @classmethod
    def from_config(cls, cfg: LoopedConfig, n_steps: int | None = None) -> "Schedule":
        n_steps = cfg.n_steps if n_steps is None else n_steps
        layers: list[EffectiveLayer] = []

        def add(stage: Stage, j: int, **kw: int | None) -> None:
            layers.append(EffectiveLayer(len(layers), stage, j, **kw))  # type: ignore[arg-type]

        for j in range(cfg.n_prelude_layers):
            add("prelude", j)
        for step in range(n_steps):
            pos = 0
            for c in range(cfg.inner_cycles):
                for j in range(cfg.n_inner_layers):
                    add("inner", j, step=step, layer_in_cycle=pos, inner_cycle=c)
                    pos += 1
            for j in range(cfg.n_core_layers):
                add("core", j, step=step, layer_in_cycle=pos)
                pos += 1
        for j in range(cfg.n_coda_layers):
            add("coda", j)
        return cls(layers, n_steps, cfg.layers_per_step)

    # ---- Sequence protocol ----
    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):  # type: ignore[override]
        return self.layers[i]

    def __iter__(self) -> Iterator[EffectiveLayer]:
        return iter(self.layers)

    def __repr__(self) -> str:
        return f"Schedule(n_layers={len(self)}, n_steps={self.n_steps}, layers_per_step={self.layers_per_step})"

    # ---- index helpers ----
    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} out of range: the model runs {self.n_steps} steps")

    def index(self, step: int, layer_in_cycle: int) -> int:
        """Effective index of layer ``layer_in_cycle`` of the cycle at ``step``."""
        self._check_step(step)
        if not 0 <= layer_in_cycle < self.layers_per_step:
            raise IndexError(
                f"layer_in_cycle {layer_in_cycle} out of range: a step has {self.layers_per_step} layers"
            )
        return self._first_loop + step * self.layers_per_step + layer_in_cycle

    def locate(self, index: int) -> tuple[int, int]:
        """``(step, layer_in_cycle)`` of a loop layer; inverse of :meth:`index`."""
        layer = self.layers[index]
        if layer.step is None or layer.layer_in_cycle is None:
            raise ValueError(f"effective layer {index} ({layer.label}) is not inside the loop")
        return layer.step, layer.layer_in_cycle

    def loop_indices(self, layer_in_cycle: int, steps: Sequence[int] | range | None = None) -> list[int]:
        """Effective indices of one layer of the cycle at each of ``steps`` (default: all)."""
        steps = range(self.n_steps) if steps is None else steps
        return [self.index(step, layer_in_cycle) for step in steps]

    def step_indices(self, step: int) -> list[int]:
        """Effective indices of every layer run during ``step``."""
        self._check_step(step)
        start = self._first_loop + step * self.layers_per_step
        return list(range(start, start + self.layers_per_step))

    def stage_indices(self, stage: Stage) -> list[int]:
        return [x.index for x in self.layers if x.stage == stage]

    # ---- reshaping cached activations ----
    def stack_activation(
        self, cache: Mapping[str, torch.Tensor], name: str, steps: Sequence[int] | range | None = None
    ) -> Float[torch.Tensor, "step layer_in_cycle ..."]:
        """Stack ``blocks.{i}.{name}`` of every loop layer as ``[step, layer_in_cycle, ...]``.

        ``name`` is a TransformerLens short name (``"resid_post"``, ``"pattern"``) or the part of
        the hook name after ``blocks.{i}.`` (``"attn.hook_z"``).
        """
        from tl_loop.hook_names import block_hook

        steps = range(self.n_steps) if steps is None else steps
        rows = [
            torch.stack([cache[block_hook(self.index(r, j), name)] for j in range(self.layers_per_step)])
            for r in steps
        ]
        return torch.stack(rows)
