"""Experiments over many prompts across processes and GPUs (``torch.distributed``, ``torchrun``).

Each rank takes one contiguous slice of the prompts, runs the experiment on it and rank 0
gathers the results in the original order, so the gathered list is what one process computes
(the same function on the same prompts: per-prompt results do not depend on the split).

    # sweep.py -- torchrun --nproc_per_node=8 sweep.py
    from tl_loop import HookedLoopedTransformer, distributed

    device = distributed.init()                   # reads torchrun's env; picks this rank's GPU
    model = HookedLoopedTransformer.from_pretrained("tomg-group-umd/huginn-0125", device=device,
                                                    dtype="stored")
    results = distributed.map_prompts(lambda p: experiment(model, p), prompts)
    if distributed.is_main():
        torch.save(results, "results.pt")       # every prompt's result, in prompt order

Several machines: the same script under ``torchrun --nnodes=N --nproc_per_node=G
--node_rank=K --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT sweep.py`` on each node; ranks span
the nodes (``WORLD_SIZE = N * G``), each takes ``1/WORLD_SIZE`` of the prompts, results travel
to global rank 0. The backend is ``nccl`` where CUDA is available, else ``gloo`` (CPU).
Without ``torch.distributed`` initialised everything runs in this process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def active() -> bool:
    """Whether a process group is running (else: one process)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): where gathered results are."""
    return rank() == 0


def init(backend: str | None = None) -> torch.device:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` in the environment) and return this rank's device: ``cuda:LOCAL_RANK`` with
    the ``nccl`` backend (the default where CUDA is available), else the CPU (``gloo``).
    Without those variables: a single process, nothing to join; returns the device."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not active():
        dist.init_process_group(backend)
    return device


def finish() -> None:
    """Leave the process group (call once at the end of a ``torchrun`` script)."""
    if active():
        dist.destroy_process_group()


def shard_bounds(n_items: int, n_ranks: int, which: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``which``'s slice: contiguous, sizes differing by at most one.

    >>> [shard_bounds(10, 4, r) for r in range(4)]
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    base, extra = divmod(n_items, n_ranks)
    start = which * base + min(which, extra)
    return start, start + base + (1 if which < extra else 0)


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's slice of ``items``."""
    start, end = shard_bounds(len(items), world_size(), rank())
    return items[start:end]


def _to_cpu(value: Any) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to the CPU, so any rank can unpickle them."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def gather(local: list[R]) -> list[R] | None:
    """Every rank's ``local`` list concatenated in rank order on rank 0 (None on the others)."""
    if not active():
        return list(local)
    local = _to_cpu(local)
    parts: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(local, parts, dst=0)
    if parts is None:
        return None
    return [item for part in parts for item in part]


def map_prompts(fn: Callable[[T], R], items: Sequence[T]) -> list[R] | None:
    """``[fn(x) for x in items]`` split over the ranks; the full list on rank 0, None elsewhere.

    ``fn`` runs once per item on the rank that owns it (results: tensors, numbers, or tuples /
    lists / dicts of them; tensors come back on the CPU).
    """
    return gather([fn(x) for x in shard(items)])
