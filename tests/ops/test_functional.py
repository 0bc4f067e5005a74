"""The eager reference: the codebook search's scratch budget, and the norm ops.

Exactness of nearest_code and quantize on both paths is in test_codebook.py."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from vqfast import functional as vf
from vqfast.ops import reference


def test_chunking_changes_nothing():
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(1000, 4, generator=g)
    z = torch.randn(999, 4, generator=g)
    whole = reference.nearest_code(z, codebook, 1, scratch_bytes=1 << 40)
    assert torch.equal(reference.nearest_code(z, codebook, 1, scratch_bytes=1), whole)  # one row at a time
    assert torch.equal(reference.nearest_code(z, codebook, 1, scratch_bytes=4000 * 7), whole)


def test_full_size_search_never_holds_the_distance_matrix():
    """MoVQ's K=16384, D=4 with N=65536: the N x K float32 distances would be 4 GiB."""
    code = textwrap.dedent(
        """
        import torch
        from vqfast.ops.reference import nearest_code

        def peak_kib():  # VmHWM starts afresh at exec, unlike ru_maxrss (inherited from the parent)
            line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
            return int(line.split()[1])

        z = torch.randn(65536, 4); e = torch.randn(16384, 4)
        nearest_code(z[:8], e, 1)  # warm up allocator and BLAS
        before = peak_kib()
        idx = nearest_code(z, e, 1)
        searched = peak_kib()
        full = torch.cdist(z[:16384], e)  # a quarter of the matrix: proves the probe sees it
        print((searched - before) * 1024, (peak_kib() - searched) * 1024, idx.shape[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown, probe, n = map(int, out.stdout.split())
    assert n == 65536
    assert probe > 2**30 - 2**27, f"the probe missed a 1 GiB allocation ({probe / 2**20:.0f} MiB)"
    assert grown < 64 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize("h, H", [(4, 32), (4, 4), (3, 5), (5, 3), (7, 33)])
def test_spatial_norm_matches_upsample_then_norm(h, H):
    g = torch.Generator().manual_seed(h * H)
    f = torch.randn(2, 64, H, H + 2, generator=g)
    w = h + 1 if H % h == 0 and (H + 2) % (h + 1) else h  # mix an exact and a non-integer ratio
    scale, shift = torch.randn(2, 2, 64, h, w, generator=g)
    weight, bias = torch.randn(2, 64, generator=g)
    up = lambda t: F.interpolate(t, size=f.shape[-2:], mode="nearest")
    ref = F.group_norm(f, 32, weight, bias, 1e-6) * up(scale) + up(shift)
    # Not bit-equal: the norm's affine is folded into the maps. A wrong nearest pick is off by O(1).
    close = dict(rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(vf.spatial_norm(f, scale, shift, 32, weight, bias), ref, **close)
    torch.testing.assert_close(vf.spatial_norm(f, scale, shift, 32, weight, bias, activation="silu"), F.silu(ref), **close)


def test_group_norm_silu_and_activation_check():
    x = torch.randn(2, 12, 5, 3)
    assert torch.equal(vf.group_norm(x, 4, activation="silu"), F.silu(F.group_norm(x, 4, eps=1e-6)))
    with pytest.raises(ValueError, match="activation must be one of"):
        vf.group_norm(x, 4, activation="relu")


def test_two_level_search_equals_one_argmin(monkeypatch):
    """K a multiple of reference.BLOCK takes the two-level minimum (block minima, then inside
    the winning block); it must pick exactly what one torch.argmin over the same scores picks:
    ties to the lowest index (duplicate codes in one block and in different blocks), NaN rows
    to index 0, rows split across tiles."""
    g = torch.Generator().manual_seed(21)
    B = reference.BLOCK
    K = 4 * B
    codebook = torch.randn(K, 4, generator=g)
    codebook[B + 3] = codebook[2]  # a duplicate in another block: index 2 must win
    codebook[3 * B + 9] = codebook[3 * B + 7]  # one in the same block: 3B+7 must win
    z = torch.randn(999, 4, generator=g) * 1.5
    z[:20] = codebook[2]
    z[20:40] = codebook[3 * B + 7]
    z[40, 1] = float("nan")
    z[41:50] += 300  # far from every code
    blocked = reference.nearest_code(z, codebook, 1, scratch_bytes=K * 4 * 7)  # 7-row tiles
    monkeypatch.setattr(reference, "BLOCK", K + 1)  # K no longer a multiple: one argmin per row
    single = reference.nearest_code(z, codebook, 1, scratch_bytes=K * 4 * 7)
    assert torch.equal(blocked, single)
    assert (blocked[:20] == 2).all() and (blocked[20:40] == 3 * B + 7).all() and blocked[40] == 0
    exact = torch.cdist(z[41:].double(), codebook.double()).argmin(dim=1)
    assert torch.equal(blocked[41:], exact)
    codebook[5, 0] = float("nan")  # a NaN code: every score NaN, every row index 0
    assert (reference.nearest_code(z, codebook, 1) == 0).all()
