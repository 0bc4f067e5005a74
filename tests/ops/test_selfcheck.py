"""Kernels that check themselves (vqfast/ops/selfcheck.py): a deliberately broken kernel is
caught on its first call, warned about once, and its op runs eagerly from then on with the right
results; a sound kernel is checked once; VQFAST_SELFCHECK=0 turns the check off. And every
launch runs under its input's device guard. Kernels interpreted on CPU, compiled on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from vqfast import functional as vf
from vqfast.kernels import codebook as search_kernel
from vqfast.kernels import group_norm as norm_kernel
from vqfast.ops import custom_ops, selfcheck


@pytest.fixture(autouse=True)
def fresh_verdicts(triton_backend, monkeypatch):
    monkeypatch.delenv(selfcheck.ENV_VAR, raising=False)
    selfcheck.forget()
    yield
    selfcheck.forget()


def broken_norm(monkeypatch, how):
    real = norm_kernel.norm
    calls = []

    def norm(y, x, *args):
        calls.append(1)
        if how == "raises":
            raise RuntimeError("PTX assembly failed (a deliberately broken kernel)")
        out = real(y, x, *args)
        return out.mul_(1.001) if how == "wrong" else out

    monkeypatch.setattr(norm_kernel, "norm", norm)
    return calls


@pytest.mark.parametrize("how", ["wrong", "raises"])
def test_a_broken_norm_kernel_warns_once_and_the_op_runs_eagerly(monkeypatch, device, how):
    calls = broken_norm(monkeypatch, how)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 5, generator=g).to(device)
    ref = F.silu(F.group_norm(x.double(), 4, eps=1e-6))
    with pytest.warns(selfcheck.SelfCheckWarning, match=r"Triton group_norm kernel \(float32, contiguous, .*silu.*\) "
                      r"(is off the float64 reference|raised RuntimeError: PTX).* runs group_norm eagerly.*report"):
        first = vf.group_norm(x, 4, activation="silu")
    second = vf.group_norm(x, 4, activation="silu")  # no second warning (an error here under pytest's filter)
    assert calls == [1]  # the kernel is not launched again in this process for that case
    for out in (first, second):
        assert (out.double() - ref).abs().max() < 1e-5  # the eager path's answer


def test_a_broken_search_kernel_is_caught_by_its_indices(monkeypatch, device):
    real = search_kernel.nearest_code

    def nearest_code(z, codebook, dim, write_zq, centred, book_pieces=None):
        indices, z_q, sse = real(z, codebook, dim, write_zq, centred, book_pieces)
        return (indices + 1) % codebook.shape[0], z_q, sse  # every index one off

    monkeypatch.setattr(search_kernel, "nearest_code", nearest_code)
    g = torch.Generator().manual_seed(1)
    book, z = torch.randn(40, 4, generator=g).to(device), torch.randn(2, 4, 3, 5, generator=g).to(device)
    want = torch.cdist(z.movedim(1, -1).reshape(-1, 4).double(), book.double()).argmin(1).view(2, 3, 5)
    with pytest.warns(selfcheck.SelfCheckWarning, match=r"nearest_code kernel \(z float32, codebook float32, D=4, .*picked code"):
        assert torch.equal(vf.nearest_code(z, book, dim=1), want)
    assert torch.equal(vf.nearest_code(z, book, dim=1), want)


def test_sound_kernels_are_checked_once_and_pass(monkeypatch, device):
    checks = []
    real = selfcheck.norm_problem
    monkeypatch.setattr(selfcheck, "norm_problem", lambda *a: checks.append(1) or real(*a))
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(2, 8, 6, 5, generator=g).to(device, dtype)
        for _ in range(3):
            vf.group_norm(x, 4, activation="silu")
    assert checks == [1, 1]  # one specialisation per dtype
    assert all(selfcheck._verdicts.values()) and len(selfcheck._verdicts) == 2
    book, z = torch.randn(40, 64, generator=g).to(device), torch.randn(3, 64, 2, 2, generator=g).to(device)
    z[0] = float("nan")  # a NaN row is no failure (it gets index 0, as torch.argmin gives)
    vf.quantize(z, book, dim=1)
    assert all(selfcheck._verdicts.values())


def test_selfcheck_off(monkeypatch, device):
    monkeypatch.setenv(selfcheck.ENV_VAR, "0")
    broken_norm(monkeypatch, "wrong")
    x = torch.randn(2, 8, 6, 5).to(device)
    ref = F.group_norm(x, 4, eps=1e-6)
    out = vf.group_norm(x, 4)  # unchecked: the broken kernel's output, no warning
    assert not torch.allclose(out, ref, atol=1e-4) and not selfcheck._verdicts
    broken_norm(monkeypatch, "raises")
    with pytest.raises(RuntimeError, match="deliberately broken"):
        vf.group_norm(x, 4)


def test_every_launch_runs_under_its_inputs_device_guard(monkeypatch, device):
    """A tensor on cuda:1 must launch on cuda:1's stream. Without a second GPU this checks that
    each launch enters the guard of its input's device; on hardware it is unproven."""
    import contextlib

    seen = []
    monkeypatch.setattr(custom_ops, "device_guard", lambda t: seen.append(t.device) or contextlib.nullcontext())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 4, 4, generator=g).to(device)
    book = torch.randn(16, 8, generator=g).to(device)
    vf.group_norm(x, 4)
    vf.spatial_norm(x, torch.randn(1, 8, 2, 2).to(device), torch.randn(1, 8, 2, 2).to(device), 4, None, None)
    vf.nearest_code(x, book, dim=1)
    vf.quantize(x, book, dim=1)
    assert seen == [x.device] * 4
