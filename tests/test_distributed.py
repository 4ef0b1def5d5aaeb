"""Experiments split over 2 CPU processes (gloo), gathered on rank 0: the same as one process.

The workers are started by ``torch.multiprocessing`` with the environment ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so
``distributed.init`` follows the same path as under ``torchrun``.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_model
from tl_loop import distributed
from tl_loop.distributed import shard_bounds

WORLD = 2


def _prompts() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 61, (1, n), generator=gen) for n in (3, 5, 4, 6, 2, 7, 5)]  # 7: uneven split


def _experiment(model, tokens: torch.Tensor) -> dict:
    """A per-prompt experiment: final logits and the residual norm at every effective layer."""
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    norms = torch.stack([cache[f"blocks.{i}.hook_resid_post"][0, -1].norm() for i in range(model.cfg.n_layers)])
    return {"logits": logits[0, -1], "resid_norms": norms, "n_tokens": tokens.shape[-1]}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = distributed.init(backend="gloo")
    assert device.type == "cpu" and distributed.world_size() == WORLD and distributed.rank() == rank
    model = make_model("huginn_like")
    prompts = _prompts()
    results = distributed.map_prompts(lambda p: _experiment(model, p), prompts)
    mine = distributed.gather([len(distributed.shard(prompts))])
    if distributed.is_main():
        torch.save({"results": results, "shard_sizes": mine}, out)
    else:
        assert results is None and mine is None
    distributed.finish()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "gathered.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    gathered = torch.load(out)
    assert gathered["shard_sizes"] == [4, 3]
    model = make_model("huginn_like")
    single = distributed.map_prompts(lambda p: _experiment(model, p), _prompts())  # no group: one process
    assert len(gathered["results"]) == len(single) == 7
    for got, want in zip(gathered["results"], single):
        assert got["n_tokens"] == want["n_tokens"]
        assert torch.equal(got["logits"], want["logits"]) and torch.equal(got["resid_norms"], want["resid_norms"])


@pytest.mark.parametrize("n_items", [0, 1, 5, 16, 17])
@pytest.mark.parametrize("n_ranks", [1, 2, 3, 8])
def test_shards_cover_every_item_once_in_order(n_items, n_ranks):
    bounds = [shard_bounds(n_items, n_ranks, r) for r in range(n_ranks)]
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n_items))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_without_a_process_group_everything_runs_here():
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.map_prompts(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
