"""The thread rule: one thread at a time runs a model.

A model's hooks, depth and views are shared mutable state. A call that reads them holds the
model's guard from its first read to its last, so it never mixes its own depth with another
call's; a call from a second thread meanwhile raises ``ModelInUseError``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tl_loop.errors import ModelInUseError

F = TypeVar("F", bound=Callable[..., Any])


class CallGuard:
    """A model's guard: re-entrant within a thread (a pass calls itself through ``steps()``),
    refusing a second thread instead of waiting for it; a fresh guard on copy or pickle."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __deepcopy__(self, memo: dict) -> "CallGuard":
        return CallGuard()

    def __reduce__(self) -> tuple:
        return (CallGuard, ())

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise ModelInUseError(
                "the model is in use by another thread: a HookedLoopedTransformer runs one call at a time "
                "(its hooks and depth are shared); give each thread its own copy (copy.deepcopy(model)) "
                "or serialise the calls with a lock"
            )
        try:
            yield
        finally:
            self._lock.release()


def exclusive(fn: F) -> F:
    """Run ``fn`` (a model method, or a function whose first argument is the model or a view
    of it) holding the model's guard for the whole call. Objects without a guard pass through."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        guard = getattr(model, "_guard", None)
        if not isinstance(guard, CallGuard):
            return fn(model, *args, **kwargs)
        with guard():
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
