"""Process-group plumbing for ``torchrun``: who am I, and the one device I train on.

``torchrun --nproc-per-node 8 --no-python hwslim train ...`` sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`setup` joins the group (NCCL on CUDA, gloo on CPU) and pins
the process to its GPU. A plain ``hwslim train`` is a world of one and needs no group.
A caller that has already joined a group (a test spawning gloo workers) is respected.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str | None = None) -> World:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
    """
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        from hwslim.core.errors import HwslimError

        raise HwslimError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    size = dist.get_world_size() if dist.is_initialized() else 1
    local = int(os.environ.get("LOCAL_RANK", rank if size > 1 else 0))
    if want.startswith("cuda"):
        if ":" in want and size == 1:
            dev = torch.device(want)
        else:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return World(rank, size, local, dev, owns)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def teardown(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(world: World, obj):
    """Rank 0's ``obj`` on every rank (a plain Python object)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
