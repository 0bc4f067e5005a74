"""nearest_code and quantize on both paths (eager, and the Triton kernel under the interpreter
or on a GPU): exact against float64, every layout, hostile inputs, canaries, autograd, compile."""

import pytest
import torch
from conftest import use_triton

import vqfast
from vqfast import functional as vf


def reference(z_rows: torch.Tensor, codebook: torch.Tensor):
    """float64 squared distances, their argmin, and the rounding slack of the fp32 ranking."""
    z64, e64 = z_rows.double().cpu(), codebook.double().cpu()
    d = ((z64[:, None, :] - e64[None, :, :]) ** 2).sum(-1)
    mu = e64.mean(0)
    # the size of the fp32 scores ||e - mu||^2 - 2 (z - mu).(e - mu); a few ulps of it is rounding
    scale = 2 * (z64 - mu).norm(dim=1) * (e64 - mu).norm(dim=1).max() + ((e64 - mu) ** 2).sum(1).max()
    return d, 8 * 2**-24 * scale


def check_indices(idx, z_rows, codebook):
    """Every pick is within rounding of the float64 optimum, and it *is* the float64 argmin
    wherever the gap between the best and second-best code exceeds rounding."""
    d, slack = reference(z_rows, codebook)
    idx = idx.reshape(-1).cpu()
    assert idx.dtype == torch.long
    if d.shape[0] == 0:
        return
    picked = d.gather(1, idx[:, None])[:, 0]
    assert (picked - d.min(dim=1).values <= slack).all()
    if codebook.shape[0] > 1:
        two = d.topk(2, dim=1, largest=False).values
        clear = two[:, 1] - two[:, 0] > slack
        assert torch.equal(idx[clear], d.argmin(dim=1)[clear])
        assert clear.any() or z_rows.shape[0] < 10  # the check is not vacuous


def rows_of(z, dim=1):
    return z.movedim(dim, -1).reshape(-1, z.shape[dim])


def check_quantize(z, codebook, dim=1):
    z_q, idx, loss = vf.quantize(z, codebook, dim=dim)
    check_indices(idx, rows_of(z, dim), codebook)
    assert idx.shape == rows_of(z, dim).shape[:1] or idx.shape == z.movedim(dim, -1).shape[:-1]
    assert z_q.shape == z.shape and z_q.dtype == z.dtype and z_q.stride() == torch.empty_like(z).stride()
    assert torch.equal(z_q, codebook[idx].movedim(-1, dim).to(z.dtype))  # an exact gather
    if z.numel():
        ref = 1.25 * ((codebook.double()[idx].movedim(-1, dim) - z.double()) ** 2).mean()
        assert abs(loss.double().item() - ref.item()) <= max(1e-6 * ref.item(), 1e-30) or z.dtype != torch.float32
        assert loss.ndim == 0 and loss.dtype == z.dtype
    return z_q, idx, loss


@pytest.mark.parametrize("K", [1, 7, 257, 1000])
@pytest.mark.parametrize("D", [1, 3, 4, 17, 64, 256])
@pytest.mark.parametrize("N", [0, 1, 37])
def test_equals_float64_argmin(backend, K, D, N, device):
    g = torch.Generator().manual_seed(K * 1000 + D * 10 + N)
    codebook = torch.randn(K, D, generator=g).to(device)
    z = torch.randn(N, D, generator=g).to(device)
    assert torch.equal(vf.nearest_code(z, codebook), check_quantize(z, codebook)[1])


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice_in_nan", "rows_dim_last", "five_d"])
def test_layouts_are_read_through_strides(backend, layout, device):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(50, 4, generator=g).to(device)
    base = torch.randn(2, 4, 5, 7, generator=g).to(device)
    dim = 1
    if layout == "nchw":
        z = base
    elif layout == "channels_last":
        z = base.contiguous(memory_format=torch.channels_last)
    elif layout == "slice_in_nan":
        storage = torch.full((3, 9, 6, 8), float("nan"), device=device)
        storage[1:3, 2:6, 1:6, 1:8] = base
        z = storage[1:3, 2:6, 1:6, 1:8]
    elif layout == "rows_dim_last":
        z, dim = base.permute(0, 2, 3, 1), -1
    else:  # five dims whose rows cannot be merged into three by any view
        z = torch.randn(2, 3, 4, 5, 6, generator=g).to(device).permute(4, 0, 2, 1, 3)[:, :, :, :, ::2]
        codebook = torch.randn(50, 3, generator=g).to(device)
        dim = 3
    z_q, idx, _ = check_quantize(z, codebook, dim)
    assert not z_q.isnan().any()
    assert torch.equal(vf.nearest_code(z, codebook, dim=dim), idx)


def test_duplicate_codes_in_different_tiles_go_to_the_lowest_index(backend, device):
    g = torch.Generator().manual_seed(2)
    for D in (8, 32):
        codebook = torch.randn(300, D, generator=g)
        codebook[150] = codebook[3]
        codebook[299] = codebook[3]
        z = codebook[[3, 150, 299, 7]] + 1e-3 * torch.randn(4, D, generator=g)
        assert vf.nearest_code(z.to(device), codebook.to(device)).tolist() == [3, 3, 3, 7]


@pytest.mark.parametrize("offset", ["plus20", "mean300"])
def test_large_offsets_keep_exactness(backend, offset, device):
    g = torch.Generator().manual_seed(1)
    for D in (3, 64):
        if offset == "plus20":
            codebook, z = torch.randn(512, D, generator=g) + 20, torch.randn(200, D, generator=g) + 20
        else:
            codebook, z = 300 + 0.1 * torch.randn(512, D, generator=g), 300 + 0.1 * torch.randn(200, D, generator=g)
        check_quantize(z.to(device), codebook.to(device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_inputs(backend, dtype, device):
    g = torch.Generator().manual_seed(4)
    for D in (4, 64):
        codebook = (torch.randn(300, D, generator=g) * 100).to(dtype).to(device)  # fp16 values above 256
        z = (torch.randn(40, D, generator=g) * 100).to(dtype).to(device)
        z_q, idx, loss = check_quantize(z, codebook)
        ref = 1.25 * ((codebook.double()[idx] - z.double()) ** 2).mean()
        assert abs(loss.double().item() - ref.item()) <= 1e-2 * ref.item()


def test_nan_row_gets_index_zero_and_leaves_other_rows_alone(backend, device):
    g = torch.Generator().manual_seed(3)
    for D in (4, 32):
        codebook = torch.randn(100, D, generator=g).to(device)
        z = torch.randn(10, D, generator=g).to(device)
        clean = vf.nearest_code(z, codebook)
        z[4, 2] = float("nan")
        idx = vf.nearest_code(z, codebook)
        d64 = ((z.double()[4] - codebook.double()) ** 2).sum(-1)
        assert idx[4] == 0 == torch.argmin(d64)
        assert torch.equal(idx[:4], clean[:4]) and torch.equal(idx[5:], clean[5:])


def test_canaries(backend, poisoned_allocations, device):
    """Every buffer the op allocates starts as a sentinel, inputs sit in NaN-filled storage:
    no sentinel may survive in an output and no NaN may leak in."""
    g = torch.Generator().manual_seed(9)
    for D, K in ((4, 300), (40, 70)):
        storage = torch.full((3, D + 2, 6, 9), float("nan"))
        storage[:2, 1 : D + 1, 1:6, 1:8] = torch.randn(2, D, 5, 7, generator=g)
        z = storage.to(device)[:2, 1 : D + 1, 1:6, 1:8]
        book_storage = torch.full((K + 1, D + 3), float("nan"))
        book_storage[1:, 2 : D + 2] = torch.randn(K, D, generator=g)
        codebook = book_storage.to(device)[1:, 2 : D + 2]
        z_q, idx, loss = vf.quantize(z, codebook)
        assert not z_q.isnan().any() and not loss.isnan()
        assert idx.min() >= 0 and idx.max() < K
        check_indices(idx, rows_of(z), codebook)


@pytest.mark.parametrize("legacy", [True, False])
def test_gradients_follow_diffusers_formula(backend, legacy, device):
    g = torch.Generator().manual_seed(8)
    for D in (3, 20):
        codebook = torch.randn(6, D, generator=g).to(device).requires_grad_()
        z = torch.randn(2, D, 3, 2, generator=g).to(device).requires_grad_()
        z_q, idx, loss = vf.quantize(z, codebook, beta=0.5, legacy=legacy)
        (z_q * 3).sum().add(loss * 2).backward()
        e = codebook.detach()[idx].movedim(-1, 1)
        n, zw, cw = z.numel(), (1.0 if legacy else 0.5), (0.5 if legacy else 1.0)
        diff = e - z.detach()
        assert torch.allclose(z.grad, 3 - 2 * zw * 2 * diff / n, rtol=1e-5, atol=1e-7)
        rows = (2 * cw * 2 * diff / n).movedim(1, -1).reshape(-1, D)
        expected = torch.zeros_like(codebook).index_add_(0, idx.reshape(-1), rows)
        assert torch.allclose(codebook.grad, expected, rtol=1e-5, atol=1e-7)


def test_gradcheck_float64(backend, device):
    """The straight-through output has no numerical derivative, but each stop-gradient half of
    the loss does: the first with respect to z alone, the second with respect to the codebook."""
    g = torch.Generator().manual_seed(8)
    codebook = torch.randn(6, 3, generator=g, dtype=torch.float64).to(device)
    z = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64).to(device)
    first = lambda z_: vf.quantize(z_, codebook, beta=0.0, legacy=True)[2]
    second = lambda e_: vf.quantize(z, e_, beta=0.0, legacy=False)[2]
    assert torch.autograd.gradcheck(first, (z.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(second, (codebook.clone().requires_grad_(),))


def test_opcheck(backend, device):
    use_triton = backend == "triton"
    g = torch.Generator().manual_seed(10)
    for D in (4, 32):
        z = torch.randn(2, D, 3, 5, generator=g).to(device)
        codebook = torch.randn(40, D, generator=g).to(device)
        torch.library.opcheck(torch.ops.vqfast.nearest_code.default, (z, codebook, 1, use_triton))
        args = (z.clone().requires_grad_(), codebook.clone().requires_grad_(), 1, 1.0, 0.25, use_triton)
        torch.library.opcheck(torch.ops.vqfast.quantize.default, args)
        cl = z.contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(torch.ops.vqfast.quantize.default, (cl, codebook, 1, 1.0, 0.25, use_triton))


# Inductor runs once, on the kernel path: its C++ code generation takes ~20 s on this CPU.
@pytest.mark.parametrize("path, compiler", [("eager", "aot_eager"), ("triton", "aot_eager"), ("triton", "inductor")])
def test_torch_compile_fullgraph(path, compiler, device):
    if path == "triton":
        use_triton()  # skipped where the kernels cannot run
    vqfast.set_backend(path)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend=compiler)
    def step(z, codebook):
        z_q, idx, loss = vf.quantize(z, codebook)
        return (z_q * 2).sum() + loss, idx

    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 4, 3, 5, generator=g).to(device).requires_grad_()
    codebook = torch.randn(30, 4, generator=g).to(device).requires_grad_()
    out, idx = step(z, codebook)
    out.backward()
    assert torch.equal(idx, vf.nearest_code(z, codebook))
    assert torch.allclose(z.grad, 2 - 2 * (codebook.detach()[idx].movedim(-1, 1) - z.detach()) / z.numel())
    assert codebook.grad is not None
    vqfast.set_backend(None)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"z.shape\[1\] must equal the codebook's D=4"):
        vf.quantize(torch.randn(2, 3, 4, 4), torch.randn(8, 4))
    with pytest.raises(ValueError, match="codebook must be 2-D"):
        vf.nearest_code(torch.randn(2, 4), torch.randn(8, 4, 1))
    with pytest.raises(TypeError, match="floating"):
        vf.nearest_code(torch.ones(2, 4, dtype=torch.long), torch.randn(8, 4))
    with pytest.raises(ValueError, match="K >= 1"):
        vf.nearest_code(torch.randn(2, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        vf.nearest_code(torch.randn(2, 4), torch.randn(8, 4), dim=3)


def test_model_on_the_triton_path_matches_eager(device):
    torch.manual_seed(0)
    model = vqfast.VQModel(block_out_channels=(32,), norm_num_groups=8, num_vq_embeddings=40).eval().to(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    use_triton()  # skipped where the kernels cannot run
    try:
        with torch.no_grad():
            vqfast.set_backend("eager")
            ref = model(x)
            vqfast.set_backend("triton")
            out = model(x)
    finally:
        vqfast.set_backend(None)
    # the norms run their kernels too now: equal to rounding, not bitwise
    assert ((out.sample - ref.sample).abs().max() / ref.sample.abs().max()).item() <= 1e-5
    assert torch.allclose(out.commit_loss, ref.commit_loss, rtol=1e-6)


def test_nan_in_the_codebook_gives_every_row_index_zero(backend, device):
    """A NaN code makes the codebook mean, so every centred code, NaN: every distance of the
    ranking is NaN and torch.argmin's first NaN is index 0, for every row."""
    g = torch.Generator().manual_seed(5)
    for D in (4, 32):
        codebook = torch.randn(100, D, generator=g)
        codebook[70, 1] = float("nan")
        z = torch.randn(9, D, generator=g)
        assert vf.nearest_code(z.to(device), codebook.to(device)).tolist() == [0] * 9


def test_split_pieces_keep_22_bits_and_fp16_range():
    """The tensor-core path's operands: x 2^s = hi + lo to 2^-22 of the largest entry, the largest
    scaled entry in [2^13, 2^14) (inside fp16), powers of two only, non-finite entries in hi with
    a lo of 0, no host sync needed (the scale is a tensor)."""
    pytest.importorskip("triton", reason="the kernels' launcher needs triton")
    from vqfast.kernels.codebook import split_pieces

    g = torch.Generator().manual_seed(5)
    for x in (torch.randn(300, 64, generator=g) * 1e-3, torch.randn(300, 64, generator=g) * 3e4,
              300 + 0.1 * torch.randn(300, 64, generator=g), torch.zeros(3, 64)):
        pieces, scale = split_pieces(x)
        assert pieces.dtype == torch.float16 and pieces.shape == (2, *x.shape) and scale.ndim == 0
        assert torch.frexp(scale).mantissa.item() == 0.5  # a power of two
        top = (x.abs().max() * scale).item()
        assert top == 0 or 2**13 <= top < 2**14
        back = pieces[0].double() + pieces[1].double()
        err = (back - x.double() * scale.double()).abs().max().item()
        assert err <= 2**-22 * max(top, 1e-30) + 2**-25, err
    x = torch.tensor([[1.0, float("nan"), float("inf"), -2.0]])
    pieces, scale = split_pieces(x)
    assert scale.item() == 2.0**12  # from the finite entries: |x| <= 2 -> [2^13, 2^14)
    assert pieces[0, 0, 1].isnan() and pieces[0, 0, 2] == float("inf") and (pieces[1, 0, 1:3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tensor_core_path_takes_8_lt_d_le_64_in_16_and_32_bit(dtype):
    pytest.importorskip("triton", reason="the kernels' launcher needs triton")
    from vqfast.kernels import codebook as kernel

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    paths = {D: kernel.launch_config(D, 8192, acc)["PATH"] for D in (4, 8, 9, 17, 64, 65, 256)}
    if dtype == torch.float64:
        assert paths == {4: 0, 8: 0, 9: 2, 17: 2, 64: 2, 65: 2, 256: 2}
    else:
        assert paths[4] == paths[8] == 0 and paths[9] == paths[17] == paths[64] == 3
        assert paths[65] == paths[256] != 3  # fp32 tl.dot on FMAs (PATH 2 under the interpreter)


def test_tensor_core_path_ties_and_winning_tile_edges(backend, device):
    """The walk keeps each row's minimum and its tile; the rescan finds the code inside it:
    winners at a tile's first and last code, in the partial last tile, and an exact duplicate
    inside one tile and across tiles all come out as the float64 argmin, lowest index first."""
    g = torch.Generator().manual_seed(6)
    K, D = 300, 64
    codebook = torch.randn(K, D, generator=g)
    codebook[130] = codebook[129]  # a duplicate in 129's 128-code tile (128 .. 255)
    codebook[260] = codebook[129]  # and one in the partial last tile
    targets = [0, 127, 128, 129, 255, 256, 299]
    z = codebook[targets] + 1e-3 * torch.randn(len(targets), D, generator=g)
    idx = vf.nearest_code(z.to(device), codebook.to(device)).cpu()
    check_indices(idx, z, codebook)
    assert idx.tolist() == targets
