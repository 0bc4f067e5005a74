"""Running ``vqfast encode`` / ``vqfast decode`` as several processes (torchrun).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with WORLD_SIZE > 1 each rank connects to the
run's key-value store (``torch.distributed.rendezvous("env://")``: torchrun's own store, or one
that rank 0 hosts under other launchers) and runs on ``cuda:LOCAL_RANK`` when it computes on CUDA.
The ranks exchange only small Python values (a batch size, counts, file headers), so they meet
through that store and open no process group: no gloo or NCCL communicator is built or torn down.
(A gloo group's teardown was seen to abort a rank with "terminate called without an active
exception" after all its work was done, failing a finished run.)

The work list is cut into batches in its global (name) order and rank r takes whole batches
r, r + N, r + 2N, ...: every batch holds the same images whatever the number of ranks, so N ranks
give byte-identical results to one process at the same batch size and thread count per process
(torchrun runs each rank with one intra-op thread). Each rank writes its own
outputs; rank 0 writes the merged result after a barrier. One run at a time per output: rank 0
holds a lock file (``flock``, which the kernel releases when the process dies, so a killed run
never blocks the next one) and a second run refuses to start. Across nodes the output folder must
be one shared filesystem, since rank 0 reads what every rank wrote. The ranks meet only at the
end, so a rank waits up to 24 hours for the slowest. A rank that fails says so in the store (its
error), and the others stop at their next exchange with "rank N failed: ..." (exit status 1),
their finished batches kept for a rerun; torchrun also ends them all at once. Without torchrun
(or with WORLD_SIZE=1) there is one rank and no store.
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch

from .main import RunFailed, UsageError, env_int

T = TypeVar("T")
#: How long a rank waits for the others at the end before torch.distributed gives up.
WAIT_FOR_OTHER_RANKS = timedelta(hours=24)
#: How long rank 0 waits, when it leaves, for the others to finish their last exchange with the
#: store it may host; a rank gets there right after the run's last exchange, so this is
#: milliseconds unless one failed.
WAIT_FOR_LEAVING = timedelta(seconds=60)
#: The longest a waiting rank sleeps between two looks at the store (it starts at a millisecond).
POLL = timedelta(seconds=1)
_PREFIX = "vqfast/"
_FAILED = _PREFIX + "failed"


class OtherRankFailed(RunFailed):
    """Another rank of the run failed, so this one stops too."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank in [0, world), the device it computes on, and the
    run's key-value store (None with one rank)."""

    rank: int
    world: int
    device: torch.device
    store: Any = None
    #: numbers the exchanges: every rank makes the same ones in the same order
    exchanges: Iterator[int] = field(default_factory=itertools.count, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(device: str) -> Ranks:
    """Connect to the run's store when WORLD_SIZE > 1; device: "cpu", "cuda" or "cuda:N"
    (under torchrun a CUDA device becomes cuda:LOCAL_RANK, one GPU per rank)."""
    dev = parse_device(device)
    world = env_int("WORLD_SIZE", 1, minimum=1)
    if world > 1:  # torch's rendezvous reads RANK itself; a bad value is named here first
        if env_int("RANK", 0) >= world:
            raise UsageError(f"the environment variable RANK must be below WORLD_SIZE={world}, "
                             f"got {os.environ['RANK']}")
        local_rank = env_int("LOCAL_RANK", 0)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world <= 1:
        return Ranks(0, 1, dev)
    from torch.distributed import rendezvous

    store, rank, world = next(rendezvous("env://", timeout=WAIT_FOR_OTHER_RANKS))
    return Ranks(rank, world, dev, store)


def stop(ranks: Ranks) -> None:
    """Leave the run. Rank 0 may host the store, so it leaves last: it waits (briefly) until every
    rank has made its last request."""
    if ranks.store is None:
        return
    if ranks.store.add(_PREFIX + "left", 1) == ranks.world:
        ranks.store.set(_PREFIX + "all-left", b"")
    if ranks.is_main:
        try:
            ranks.store.wait([_PREFIX + "all-left"], WAIT_FOR_LEAVING)
        except RuntimeError:  # a rank that failed never comes; its own error says why
            pass


def fail(ranks: Ranks, error: BaseException) -> None:
    """Tell the other ranks that this one failed with ``error`` (the first failure of a run is
    kept): they stop at their next exchange instead of waiting for this rank."""
    if ranks.store is None or isinstance(error, OtherRankFailed):
        return
    text = f"rank {ranks.rank} failed: {str(error) or type(error).__name__}"
    try:
        ranks.store.compare_set(_FAILED, b"", pickle.dumps(text))
    except RuntimeError:  # the store is gone (its host ended): the others find out on their own
        pass


def _wait(ranks: Ranks, keys: list[str]) -> None:
    """Wait until the store holds ``keys``, for up to WAIT_FOR_OTHER_RANKS; OtherRankFailed as soon
    as a rank has failed (see fail). It polls with ``check``: the store's own ``wait`` logs a
    warning each time it times out."""
    deadline, pause = time.monotonic() + WAIT_FOR_OTHER_RANKS.total_seconds(), 0.001
    while not ranks.store.check(keys):
        if ranks.store.check([_FAILED]):
            raise OtherRankFailed(f"{pickle.loads(ranks.store.get(_FAILED))}; this rank stopped too "
                                  "(its finished batches are kept: rerun to resume)")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the other ranks did not reach this point within {WAIT_FOR_OTHER_RANKS}")
        time.sleep(pause)
        pause = min(2 * pause, POLL.total_seconds())


def parse_device(device: str) -> torch.device:
    """--device as a torch.device: cpu, cuda or cuda:N (an existing GPU); ValueError otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's share of a list of batches (or of any work): every world-th entry from
    position rank."""
    return list(items[ranks.rank :: ranks.world])


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` cut into consecutive batches of ``size`` (the last may be shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def all_min(ranks: Ranks, value: int) -> int:
    """The smallest ``value`` over all ranks (on every rank); also a barrier."""
    return min(gather(ranks, value))


class Busy(Exception):
    """Another run holds the lock of this output."""


def _describe_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "a process that is starting"
    except OSError:
        return "another process"


def _acquire(path: Path) -> int:
    """An open descriptor holding an exclusive flock on ``path``; Busy when another process has it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(_describe_holder(path)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder removed it as we opened it: take the new one
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n".encode())
            return fd
        os.close(fd)


@contextmanager
def exclusive(path: Path, ranks: Ranks, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` (rank 0) while the block runs; ValueError on every rank, naming
    ``what`` and the process that holds it, when another run has it (or naming the folder when
    the lock cannot be created there)."""
    fd, problem = None, ""
    if ranks.is_main:
        try:
            fd = _acquire(path)
        except Busy as e:
            problem = (f"{what} is in use by another vqfast run ({e}); wait for it to end or choose another "
                       f"output (lock: {path}; a killed run does not hold it)")
        except OSError as e:  # a read-only or full folder: nothing else can be written there either
            problem = (f"{what}: cannot create files in {path.parent} ({e.strerror or e}); choose an output in "
                       "a folder this user can write to")
    try:
        problems = gather(ranks, problem)
        if problems[0]:
            raise ValueError(problems[0])
        yield
    finally:
        if fd is not None:
            Path(path).unlink(missing_ok=True)  # while still held: the next run creates a fresh file
            os.close(fd)


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (nothing to wait for with one rank)."""
    gather(ranks, None)


def gather(ranks: Ranks, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; also a barrier. The last
    rank to read them deletes them, so the store holds one exchange at a time."""
    if ranks.world == 1:
        return [value]
    key = f"{_PREFIX}{next(ranks.exchanges)}/"
    keys = [f"{key}{r}" for r in range(ranks.world)]
    ranks.store.set(keys[ranks.rank], pickle.dumps(value))
    _wait(ranks, keys)
    values = [pickle.loads(ranks.store.get(k)) for k in keys]
    if ranks.store.add(key + "read", 1) == ranks.world:
        for k in (*keys, key + "read"):
            ranks.store.delete_key(k)
    return values
