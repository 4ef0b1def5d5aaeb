"""Strict state-dict mapping: every checkpoint tensor is used or explicitly ignored."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch

from tl_loop.errors import CheckpointError

logger = logging.getLogger("tl_loop")


class StrictTensors:
    """The checkpoint's tensors, handed out by name; :meth:`finish` reports what was left.

    >>> t = StrictTensors({"a": torch.zeros(2), "b": torch.zeros(3)})
    >>> t.take("a", shape=(2,)).shape
    torch.Size([2])
    >>> t.finish()
    Traceback (most recent call last):
    ...
    tl_loop.errors.CheckpointError: checkpoint has unexpected tensors: ['b']
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors  # not copied: a ``lazy.LazyTensors`` reads each tensor when taken
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self.wrong_dtype: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def take(self, name: str, shape: Iterable[int] | None = None) -> torch.Tensor:
        """The tensor ``name``; a missing tensor or wrong shape is recorded (reported by finish)."""
        if name not in self.tensors:
            self.missing.append(name)
            return torch.zeros(tuple(shape) if shape is not None else (0,))
        self.used.add(name)
        t = self.tensors[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            self.mismatched.append(f"{name}: expected {tuple(shape)}, found {tuple(t.shape)}")
        if not t.is_floating_point():  # every weight slot is floating: never cast ints, bools, complex
            self.wrong_dtype.append(f"{name}: {str(t.dtype).removeprefix('torch.')}")
            return torch.zeros(t.shape)
        return t

    def ignore(self, *names: str) -> None:
        """Mark tensors as known and deliberately unused (e.g. a duplicate tied head)."""
        self.used.update(n for n in names if n in self.tensors)

    def finish(self) -> None:
        problems = []
        if self.missing:
            problems.append(f"checkpoint is missing tensors: {sorted(self.missing)}")
        if self.mismatched:
            problems.append("shape mismatches: " + "; ".join(self.mismatched))
        if self.wrong_dtype:
            problems.append("tensors that must be floating point hold: " + "; ".join(self.wrong_dtype))
        unexpected = sorted(set(self.tensors) - self.used)
        if unexpected:
            problems.append(f"checkpoint has unexpected tensors: {unexpected}")
        if problems:
            raise CheckpointError("\n".join(problems))


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> None:
    """Copy ``state_dict`` (our names) into ``model``, checking keys and shapes; warn on NaN/inf.

    ``assign=True`` makes the tensors the model's parameters (no copy; the model may be on meta)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad_shapes = [
        f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            "converted weights do not fit the configured model (the config contradicts the weights):"
            + (f"\n  missing: {missing}" if missing else "")
            + (f"\n  unexpected: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {bad_shapes}" if bad_shapes else "")
        )
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not _all_finite(tensor):
            logger.warning("checkpoint tensor %s (%s) contains NaN or inf values", name, tuple(tensor.shape))
    model.load_state_dict(dict(state_dict), strict=True, assign=assign)


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``: the sum is finite unless one is (or the sum overflows, then
    checked element-wise); far cheaper than ``isfinite(tensor).all()`` on a large bf16 tensor."""
    if tensor.device.type == "meta":  # no values to check (a model loaded for its shapes)
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
