"""CPU threads that the machine actually gives: the eager model on a CPU shared with other work.

The CPU path runs a thousand or so short parallel regions per forward (the Winograd strips'
transforms and GEMMs, the norms), and each ends in a barrier. When another process holds a core,
one of our threads is descheduled for a time slice (milliseconds) in many regions, and the others
wait for it: on a 2-core AMD EPYC (Zen 3, AVX2) beside one busy process, LDM-f4's encode took
4.73 s on 2 threads and 3.23 s on 1, when diffusers took 4.89 s (alone: 1.77 s on 2 threads).

So a forward on n > 1 threads measures what it got: CPU time over wall time, per thread. A
forward that got less than MIN_SHARE of its n threads' time has met competition, and the next
forwards run on round(n x share) threads (at least 1), for RETRY - 1 calls; then one runs on n
again to see whether the competition has gone. Never more threads than the caller set
(torch.get_num_threads()), and that count is restored after every call.

It stands aside (the caller's thread count throughout) on 1 thread, under torch.use_deterministic_algorithms(True) (a different thread count may sum in another
order: bit-identical reruns need a fixed count), and while another forward is in flight in the
process (its CPU time would count as ours).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

import torch

#: Below this share of its threads' wall time, a forward met competition (alone: 0.98-0.99 at
#: 2 threads; beside one busy process: 0.60).
MIN_SHARE = 0.75
#: Every RETRY-th call runs on the caller's full count again.
RETRY = 8


class FairThreads:
    """A context manager around one CPU forward: ``with FAIR_THREADS(): ...``."""

    def __init__(self, wall: Callable[[], float] = time.perf_counter, cpu: Callable[[], float] = time.process_time):
        self._wall, self._cpu = wall, cpu
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since_probe = 0  # reduced calls since the last one on the full count
        self._reduced: int | None = None  # the count competition left us, None when none was seen

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        full = torch.get_num_threads()
        with self._lock:
            alone = self._in_flight == 0
            self._in_flight += 1
        if full == 1 or not alone or torch.are_deterministic_algorithms_enabled():
            try:
                yield
            finally:
                with self._lock:
                    self._in_flight -= 1
            return
        probe = self._reduced is None or self._since_probe >= RETRY - 1
        threads = full if probe else min(self._reduced, full)
        self._since_probe = 0 if probe else self._since_probe + 1
        if threads != full:
            torch.set_num_threads(threads)
        wall, cpu = self._wall(), self._cpu()
        try:
            yield
        finally:
            if threads != full:
                torch.set_num_threads(full)
            else:
                share = (self._cpu() - cpu) / max(self._wall() - wall, 1e-9) / full
                self._reduced = None if share >= MIN_SHARE else max(1, round(full * share))
            with self._lock:
                self._in_flight -= 1


#: The process's one instance: competition for the CPU is a property of the process.
FAIR_THREADS = FairThreads()
