"""Split a greedy step's candidates across torchrun processes and gather their scores.

Under ``torchrun`` (torch.distributed initialized, world size > 1) each process scores
every world_size-th candidate and the scores are all-gathered, so every process keeps
the same path and makes the same decisions as one process would; only rank 0 writes.
Without a process group these are no-ops.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch.distributed as dist


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    return _world()[0] == 0


def sharded(score_candidates: Callable) -> Callable:
    """Wrap ``score_candidates(current, candidates)`` to split candidates across ranks."""

    def run(current, candidates: Sequence, **kw) -> list:
        rank, world = _world()
        if world == 1:
            return score_candidates(current, candidates, **kw)
        mine = list(range(rank, len(candidates), world))
        local = score_candidates(current, [candidates[i] for i in mine]) if mine else []  # (no pruning per rank)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, list(zip(mine, local)))
        scores: list = [None] * len(candidates)
        for part in gathered:
            for i, s in part:
                scores[i] = s
        return scores

    return run


def from_writer(fn: Callable) -> Callable:
    """Wrap ``fn`` so only rank 0 runs it and every rank gets its answer (a measurement: each
    rank timing on its own would give each its own decisions)."""

    def run(*args, **kw):
        rank, world = _world()
        if world == 1:
            return fn(*args, **kw)
        out = [fn(*args, **kw) if rank == 0 else None]
        dist.broadcast_object_list(out, src=0)
        return out[0]

    return run
