"""Running ``vqfast encode`` / ``vqfast decode`` as several processes (torchrun).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with WORLD_SIZE > 1 the command joins a process
group (NCCL when it runs on CUDA, gloo on CPU), takes ``items[rank::world]`` of the sorted work list
and runs on ``cuda:LOCAL_RANK``. Each rank writes its own outputs; rank 0 writes the merged result
after a barrier. Across nodes the output folder must be one shared filesystem, since rank 0 reads
what every rank wrote. The ranks meet only at the end, so the group waits up to 24 hours for the
slowest rank (torchrun ends them all at once if one fails). Without torchrun (or with
WORLD_SIZE=1) there is one rank and no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")
#: How long a rank waits for the others at the end before torch.distributed gives up.
WAIT_FOR_OTHER_RANKS = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank in [0, world), the device it computes on, and whether
    it started a torch.distributed process group (and so must end it)."""

    rank: int
    world: int
    device: torch.device
    joined: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(device: str) -> Ranks:
    """Join torchrun's process group when WORLD_SIZE > 1; device: "cpu", "cuda" or "cuda:N"
    (under torchrun a CUDA device becomes cuda:LOCAL_RANK, one GPU per rank)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world <= 1:
        return Ranks(0, 1, dev, joined=False)
    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:
        # The ranks only meet at the end, so the first to finish waits for the slowest, which on a
        # large or resumed (unevenly split) dataset can take far longer than the default timeout.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=WAIT_FOR_OTHER_RANKS)
    return Ranks(dist.get_rank(), dist.get_world_size(), dev, joined)


def stop(ranks: Ranks) -> None:
    """Leave the process group that ``start`` joined."""
    if ranks.joined:
        import torch.distributed as dist

        dist.destroy_process_group()


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's share of a sorted list: every world-th item from position rank."""
    return list(items[ranks.rank :: ranks.world])


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (nothing to wait for with one rank)."""
    if ranks.world > 1:
        import torch.distributed as dist

        if ranks.device.type == "cuda":
            dist.barrier(device_ids=[ranks.device.index])
        else:
            dist.barrier()


def gather(ranks: Ranks, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; also a barrier."""
    if ranks.world == 1:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values
