"""Exceptions raised by tl_loop. Each subclasses the built-in a user would expect to catch."""

from __future__ import annotations


class TlLoopError(Exception):
    """Base class of every tl_loop error."""


class InputError(TlLoopError, ValueError):
    """Bad tokens, step counts, initial states or other forward-pass arguments."""


class CheckpointError(TlLoopError, ValueError):
    """A checkpoint that cannot be loaded faithfully (unknown family, missing or extra
    tensors, shape mismatches, a config that contradicts the weights, unsafe formats)."""


class UnsupportedError(TlLoopError, NotImplementedError):
    """A valid request that this layout cannot answer exactly (instead of a wrong answer)."""


class ModelInUseError(TlLoopError, RuntimeError):
    """A model was called from a second thread while another thread was running it."""
