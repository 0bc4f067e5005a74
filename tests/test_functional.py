"""The eager ops: exact nearest-code search under a memory budget, quantize, the norms."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from vqfast import functional as vf
from vqfast import reference


def reference_indices(z_rows: torch.Tensor, codebook: torch.Tensor):
    """float64 squared distances, their argmin, and the rounding slack of the fp32 ranking."""
    z64, e64 = z_rows.double(), codebook.double()
    d = torch.cdist(z64, e64) ** 2 if z64.shape[0] else torch.empty(0, e64.shape[0], dtype=torch.float64)
    mu = e64.mean(0)
    # the size of the fp32 scores ||e - mu||^2 - 2 (z - mu).(e - mu); a few ulps of it is rounding
    scale = 2 * (z64 - mu).norm(dim=1) * (e64 - mu).norm(dim=1).max() + ((e64 - mu) ** 2).sum(1).max()
    return d, d.argmin(dim=1), 8 * 2**-24 * scale


def check_indices(idx, z_rows, codebook):
    """Every pick is within rounding of the float64 optimum, and it *is* the float64 argmin
    wherever the gap between the best and second-best code exceeds rounding."""
    d, best, slack = reference_indices(z_rows, codebook)
    idx = idx.reshape(-1)
    assert idx.dtype == torch.long
    if d.shape[0] == 0:
        return
    picked = d.gather(1, idx[:, None])[:, 0]
    assert (picked - d.min(dim=1).values <= slack).all()
    if codebook.shape[0] > 1:
        two = d.topk(2, dim=1, largest=False).values
        clear = two[:, 1] - two[:, 0] > slack
        assert torch.equal(idx[clear], best[clear])
        assert clear.any() or z_rows.shape[0] < 10  # the check is not vacuous


@pytest.mark.parametrize("K", [1, 7, 257, 1000])
@pytest.mark.parametrize("D", [1, 3, 4, 17, 64, 256])
@pytest.mark.parametrize("N", [0, 1, 37])
def test_nearest_code_equals_float64_argmin(K, D, N):
    g = torch.Generator().manual_seed(K * 1000 + D * 10 + N)
    codebook = torch.randn(K, D, generator=g)
    z = torch.randn(N, D, generator=g)
    idx = vf.nearest_code(z, codebook, dim=1)
    assert idx.shape == (N,)
    check_indices(idx, z, codebook)


def test_nearest_code_layouts_read_the_code_dimension_where_it_is():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(50, 4, generator=g)
    z = torch.randn(2, 4, 5, 7, generator=g)
    expected = vf.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, 4), codebook).view(2, 5, 7)
    assert torch.equal(vf.nearest_code(z, codebook, dim=1), expected)
    assert torch.equal(vf.nearest_code(z.contiguous(memory_format=torch.channels_last), codebook), expected)
    assert torch.equal(vf.nearest_code(z.permute(0, 2, 3, 1), codebook, dim=-1), expected)
    big = torch.full((3, 9, 5, 8), float("nan"))
    big[1:3, 2:6, :, 1:8] = z
    assert torch.equal(vf.nearest_code(big[1:3, 2:6, :, 1:8], codebook), expected)


def test_large_offsets_do_not_cost_exactness():
    """|z| >> spread of the codebook: cdist's ||z||^2 - 2 z.e + ||e||^2 cancels, ours does not."""
    g = torch.Generator().manual_seed(1)
    codebook = 300 + 0.1 * torch.randn(512, 4, generator=g)
    z = 300 + 0.1 * torch.randn(200, 4, generator=g)
    check_indices(vf.nearest_code(z, codebook), z, codebook)
    codebook = torch.randn(512, 3, generator=g) + 20
    z = torch.randn(200, 3, generator=g) + 20
    check_indices(vf.nearest_code(z, codebook), z, codebook)


def test_ties_go_to_the_lowest_index_across_chunks():
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(300, 8, generator=g)
    codebook[250] = codebook[3]
    codebook[299] = codebook[3]
    z = codebook[[3, 3, 250]] + 1e-3 * torch.randn(3, 8, generator=g)
    assert vf.nearest_code(z, codebook).tolist() == [3, 3, 3]


def test_nan_row_gets_index_zero_and_leaves_other_rows_alone():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(64, 4, generator=g)
    z = torch.randn(10, 4, generator=g)
    clean = vf.nearest_code(z, codebook)
    z[4, 2] = float("nan")
    idx = vf.nearest_code(z, codebook)
    assert idx[4] == 0 == torch.cdist(z[4:5].double(), codebook.double()).argmin()
    assert torch.equal(idx[:4], clean[:4]) and torch.equal(idx[5:], clean[5:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    g = torch.Generator().manual_seed(4)
    codebook = (torch.randn(300, 16, generator=g) * 100).to(dtype)  # fp16 values above 256
    z = (torch.randn(40, 16, generator=g) * 100).to(dtype)
    check_indices(vf.nearest_code(z, codebook), z, codebook)


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
        import resource, torch
        from vqfast.functional import nearest_code
        z = torch.randn(65536, 4); e = torch.randn(16384, 4)
        nearest_code(z[:8], e)  # warm up allocator and BLAS
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        idx = nearest_code(z, e)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024, idx.shape[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown, n = map(int, out.stdout.split())
    assert n == 65536
    assert grown < 64 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB (the matrix is 4096 MiB)"


def test_quantize_gathers_exactly_and_keeps_layout():
    g = torch.Generator().manual_seed(6)
    codebook = torch.randn(33, 5, generator=g)
    for z in (torch.randn(2, 5, 3, 7, generator=g), torch.randn(2, 5, 3, 7, generator=g).to(memory_format=torch.channels_last)):
        z_q, idx, loss = vf.quantize(z, codebook)
        gathered = codebook[idx].permute(0, 3, 1, 2)
        # z + (e - z), diffusers' straight-through form: e up to the rounding of that sum
        assert (z_q - gathered).abs().max() <= 2 * 2**-24 * (z.abs() + gathered.abs()).max()
        assert z_q.stride() == z.stride() and z_q.dtype == z.dtype
        ref = ((codebook[idx].permute(0, 3, 1, 2).double() - z.double()) ** 2).mean() * 1.25
        assert loss.ndim == 0 and abs(loss.item() - ref.item()) <= 1e-6 * ref.item()


def test_quantize_legacy_false_moves_beta():
    g = torch.Generator().manual_seed(7)
    codebook = torch.randn(9, 3, generator=g, requires_grad=True)
    z = torch.randn(4, 3, generator=g, requires_grad=True)
    _, _, loss = vf.quantize(z, codebook, beta=0.5, legacy=False, dim=1)
    loss.backward()
    idx = vf.nearest_code(z, codebook)
    diff = (codebook[idx] - z).detach()
    assert torch.allclose(z.grad, -0.5 * 2 * diff / diff.numel())
    assert torch.allclose(codebook.grad[idx[0]], sum(2 * diff[i] / diff.numel() for i in range(4) if idx[i] == idx[0]))


def test_quantize_gradients_are_diffusers_formula_in_float64():
    g = torch.Generator().manual_seed(8)
    codebook = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    z_q, idx, loss = vf.quantize(z, codebook)
    (z_q * 3).sum().add(loss).backward()
    e = codebook.detach()[idx].permute(0, 3, 1, 2)
    n = z.numel()
    assert torch.allclose(z.grad, 3 - 2 * (e - z.detach()) / n, rtol=1e-12, atol=1e-14)
    expected = torch.zeros_like(codebook).index_add_(
        0, idx.reshape(-1), (0.25 * 2 * (e - z.detach()) / n).permute(0, 2, 3, 1).reshape(-1, 3)
    )
    assert torch.allclose(codebook.grad, expected, rtol=1e-12, atol=1e-14)


def test_quantize_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"z.shape\[1\] must equal the codebook's D=4"):
        vf.quantize(torch.randn(2, 3, 4, 4), torch.randn(8, 4))
    with pytest.raises(ValueError, match="codebook must be 2-D"):
        vf.nearest_code(torch.randn(2, 4), torch.randn(8, 4, 1))
    with pytest.raises(TypeError, match="floating"):
        vf.nearest_code(torch.ones(2, 4, dtype=torch.long), torch.randn(8, 4))
    with pytest.raises(ValueError, match="K >= 1"):
        vf.nearest_code(torch.randn(2, 4), torch.randn(0, 4))


@pytest.mark.parametrize("h, H", [(4, 32), (4, 4), (3, 5), (5, 3), (7, 33)])
def test_spatial_norm_matches_upsample_then_norm(h, H):
    g = torch.Generator().manual_seed(h * H)
    f = torch.randn(2, 64, H, H + 2, generator=g)
    w = h + 1 if H % h == 0 and (H + 2) % (h + 1) else h  # mix an exact and a non-integer ratio
    scale, shift = torch.randn(2, 2, 64, h, w, generator=g)
    weight, bias = torch.randn(2, 64, generator=g)
    up = lambda t: F.interpolate(t, size=f.shape[-2:], mode="nearest")
    ref = F.group_norm(f, 32, weight, bias, 1e-6) * up(scale) + up(shift)
    assert torch.equal(vf.spatial_norm(f, scale, shift, 32, weight, bias), ref)
    assert torch.equal(vf.spatial_norm(f, scale, shift, 32, weight, bias, activation="silu"), F.silu(ref))


def test_group_norm_silu_and_activation_check():
    x = torch.randn(2, 12, 5, 3)
    assert torch.equal(vf.group_norm(x, 4, activation="silu"), F.silu(F.group_norm(x, 4, eps=1e-6)))
    with pytest.raises(ValueError, match="activation must be one of"):
        vf.group_norm(x, 4, activation="relu")
