"""The CPU thread policy of the eager forward (vqfast/models/threads.py), on a fake clock: the
share a forward got decides the next forwards' thread count; never above the caller's, always
restored, and out of the way where a fixed count matters."""

import pytest
import torch

from vqfast.models import threads as th


class Clock:
    """Wall and CPU time that advance only when a forward 'runs': share is CPU / (wall x threads)."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.seen: list[int] = []

    def forward(self, share: float):
        n = torch.get_num_threads()
        self.seen.append(n)
        self.wall += 1.0
        self.cpu += share * n


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def run(policy, clock, shares):
    for share in shares:
        with policy():
            clock.forward(share)
        assert torch.get_num_threads() == 2  # the caller's count, restored


def test_competition_lowers_the_count_and_a_retry_restores_it(two_threads):
    clock = Clock()
    policy = th.FairThreads(wall=lambda: clock.wall, cpu=lambda: clock.cpu)
    run(policy, clock, [0.99] * 3)
    assert clock.seen == [2, 2, 2]  # alone: the full count
    run(policy, clock, [0.6] + [1.0] * th.RETRY)
    # one busy forward, then the reduced count until the RETRY-th call probes the full one again
    assert clock.seen[3:] == [2] + [1] * (th.RETRY - 1) + [2]
    run(policy, clock, [0.99, 0.99])
    assert clock.seen[-2:] == [2, 2]  # the probe found the CPU free again


def test_it_stands_aside_where_a_fixed_count_matters(two_threads):
    clock = Clock()
    policy = th.FairThreads(wall=lambda: clock.wall, cpu=lambda: clock.cpu)
    run(policy, clock, [0.3])
    torch.use_deterministic_algorithms(True)
    try:
        run(policy, clock, [0.3, 0.3])  # bit-identical reruns need one count
    finally:
        torch.use_deterministic_algorithms(False)
    assert clock.seen == [2, 2, 2]
    policy = th.FairThreads(wall=lambda: clock.wall, cpu=lambda: clock.cpu)
    run(policy, clock, [0.3])  # competition seen: the next forward gets 1 thread
    with policy():
        with policy():  # a forward in flight (another Python thread): this one changes nothing
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1 and policy._reduced == 1
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    with policy():
        clock.forward(1.0)
    assert clock.seen[-1] == 1


def test_the_model_runs_its_cpu_forwards_under_the_policy(monkeypatch):
    """encode and decode enter the process's policy once each on CPU."""
    import vqfast

    entered = []
    real = th.FAIR_THREADS.__call__

    class Counting:
        def __call__(self):
            entered.append(1)
            return real()

    import vqfast.models.model as model_module

    monkeypatch.setattr(model_module, "FAIR_THREADS", Counting())
    model = vqfast.VQModel(block_out_channels=(32,), norm_num_groups=8, latent_channels=4).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    assert len(entered) == 2
