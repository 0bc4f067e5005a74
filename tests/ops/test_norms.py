"""group_norm and spatial_norm on both paths (eager, and the Triton kernels under the interpreter
or on a GPU): the three-way rule against float64, layouts, hostile data, canaries, autograd."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import vqfast
from vqfast import functional as vf

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def three_way(out, ref64, same_dtype):
    """flash-attention's rule: |ours - f64| <= 2 |torch in the same dtype - f64| + atol(dtype)."""
    ours = (out.double() - ref64).abs().max().item()
    torch_err = (same_dtype.double() - ref64).abs().max().item()
    assert ours <= 2 * torch_err + ATOL[out.dtype] * max(1.0, ref64.abs().max().item()), (ours, torch_err)


def gn_ref(x, groups, w, b, silu):
    y = F.group_norm(x, groups, w, b, 1e-6)
    return F.silu(y) if silu else y


def sn_ref(f, scale, shift, groups, w, b, silu):
    up = lambda t: F.interpolate(t, size=f.shape[-2:], mode="nearest")
    y = F.group_norm(f, groups, w, b, 1e-6) * up(scale) + up(shift)
    return F.silu(y) if silu else y


def make(shape, dtype, g, mean=0.0, std=1.0, channels_last=False):
    t = (mean + std * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@pytest.mark.parametrize("cg", [1, 3, 4, 6])
@pytest.mark.parametrize("shape", [(1, 33, 31), (3, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_three_way(backend, cg, shape, dtype, channels_last):
    B, H, W = shape
    G = 4
    C = cg * G
    g = torch.Generator().manual_seed(cg * 100 + H)
    x = make((B, C, H, W), dtype, g, mean=1.0, std=3.0, channels_last=channels_last)
    w, b = make((C,), dtype, g), make((C,), dtype, g)
    for silu in (False, True):
        out = vf.group_norm(x, G, w, b, activation="silu" if silu else None)
        assert out.dtype == dtype and out.shape == x.shape
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        three_way(out, gn_ref(x.double(), G, w.double(), b.double(), silu), gn_ref(x, G, w, b, silu))


def test_group_norm_without_affine_and_on_sequences(backend):
    g = torch.Generator().manual_seed(1)
    x = make((2, 12, 37), torch.float32, g)  # the attention blocks' (B, C, H*W)
    three_way(vf.group_norm(x, 3), gn_ref(x.double(), 3, None, None, False), gn_ref(x, 3, None, None, False))
    y = make((2, 12, 5, 4), torch.float32, g)
    w = make((12,), torch.float32, g)
    three_way(vf.group_norm(y, 3, w, None), gn_ref(y.double(), 3, w.double(), None, False), gn_ref(y, 3, w, None, False))


@pytest.mark.parametrize("channels_last", [False, True])
def test_constant_input_gives_the_bias(backend, channels_last, device):
    x = torch.full((2, 8, 5, 3), 7.25, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    b = torch.arange(8.0, device=device)
    out = vf.group_norm(x, 2, torch.ones(8, device=device), b)
    assert torch.equal(out, b.view(1, 8, 1, 1).expand_as(out))


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_small_spread(backend, channels_last):
    """mean 300, std 0.1: E[x^2] - E[x]^2 would cancel to nothing in fp32. Three images, one
    offset by 5: each image's statistics are its own."""
    g = torch.Generator().manual_seed(2)
    x = make((3, 8, 33, 31), torch.float32, g, mean=300.0, std=0.1, channels_last=channels_last)
    x[1] += 5.0
    w, b = make((8,), torch.float32, g), make((8,), torch.float32, g)
    out = vf.group_norm(x, 2, w, b, activation="silu")
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    three_way(out, gn_ref(x.double(), 2, w.double(), b.double(), True), gn_ref(x, 2, w, b, True))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 4e-6), (torch.float64, 1e-11)])
def test_eager_channels_last_norms_take_shifted_statistics(dtype, tolerance):
    """The eager path's channels_last GroupNorm subtracts each group's sampled mean before its
    statistics and scales the difference: at mean 300, std 0.1 its fp32 error is ~1e-6 where
    PyTorch's kernels (either layout) are off by ~3e-4. The float64 references are NCHW: the
    channels_last kernel cancels even in float64 (2e-8 here). Three images of different means; with
    and without the affine; the SpatialNorm's GroupNorm too."""
    vqfast.set_backend("eager")
    try:
        g = torch.Generator().manual_seed(5)
        x = make((3, 12, 33, 31), dtype, g, mean=300.0, std=0.1, channels_last=True)
        x[1] -= 7.0
        w, b = make((12,), dtype, g), make((12,), dtype, g)
        for weight, bias in ((None, None), (w, b)):
            out = vf.group_norm(x, 3, weight, bias, activation="silu")
            ref = gn_ref(x.double().contiguous(), 3, *(None if t is None else t.double() for t in (weight, bias)), True)
            assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
            assert (out.double() - ref).abs().max().item() <= tolerance
        scale, shift = make((3, 12, 11, 31), dtype, g), make((3, 12, 11, 31), dtype, g)
        out = vf.spatial_norm(x, scale, shift, 3, w, b, activation="silu")
        ref = sn_ref(x.double().contiguous(), scale.double(), shift.double(), 3, w.double(), b.double(), True)
        assert (out.double() - ref).abs().max().item() <= 4 * tolerance
    finally:
        vqfast.set_backend(None)


def test_eager_channels_last_statistics_do_not_depend_on_the_thread_count():
    """The shifted statistics are summed on one thread: batch_norm_update_stats splits a
    channels_last input's sums across threads, and on 2 or 3 threads this input's statistics
    came out otherwise rounded than on 1 (a token in a near tie could then change between one
    process and two)."""
    from vqfast.ops import reference

    x = (torch.randn(2, 128, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.5 + 3).contiguous(
        memory_format=torch.channels_last)
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(reference._shifted_statistics(x.clone(), 32, 1e-6))
            assert torch.get_num_threads() == n  # restored
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("ratio", ["h=H/8", "3->5", "5->3", "7x6->33x31"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_norm_three_way(backend, ratio, dtype, channels_last):
    (h, w), (H, W) = {"h=H/8": ((4, 3), (32, 24)), "3->5": ((3, 3), (5, 5)), "5->3": ((5, 5), (3, 3)),
                      "7x6->33x31": ((7, 6), (33, 31))}[ratio]
    g = torch.Generator().manual_seed(H * W)
    C = 64  # SpatialNorm always has 32 groups: 2 channels each
    f = make((1, C, H, W), dtype, g, mean=0.5, std=2.0, channels_last=channels_last)
    scale, shift = make((1, C, h, w), dtype, g), make((1, C, h, w), dtype, g)
    wt, bs = make((C,), dtype, g), make((C,), dtype, g)
    for silu in (False, True):
        out = vf.spatial_norm(f, scale, shift, 32, wt, bs, activation="silu" if silu else None)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        ref = sn_ref(f.double(), scale.double(), shift.double(), 32, wt.double(), bs.double(), silu)
        three_way(out, ref, sn_ref(f, scale, shift, 32, wt, bs, silu))


def test_canaries(backend, poisoned_allocations, device):
    """Every buffer the op allocates starts as a sentinel, inputs sit in NaN-filled storage:
    no sentinel may survive in an output and no NaN may leak in."""
    g = torch.Generator().manual_seed(3)
    storage = torch.full((3, 70, 12, 12), float("nan"), dtype=torch.float64)
    storage[1:, 3:67, 1:11, 2:11] = torch.randn(2, 64, 10, 9, generator=g, dtype=torch.float64)
    f = storage.float().to(device)[1:, 3:67, 1:11, 2:11]
    maps = torch.full((2, 2, 66, 6, 5), float("nan"))
    maps[:, :, 1:65, 1:6, 1:4] = torch.randn(2, 2, 64, 5, 3, generator=g)
    scale, shift = maps.to(device)[:, :, 1:65, 1:6, 1:4]
    out = vf.spatial_norm(f, scale, shift, 32, None, None, activation="silu")
    assert not out.isnan().any()
    ref = sn_ref(f.double(), scale.double(), shift.double(), 32, None, None, True)
    assert (out.double() - ref).abs().max() < 1e-5
    out = vf.group_norm(f, 8, activation="silu")
    assert not out.isnan().any()


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_float64(backend, channels_last, device):
    """Backward recomputes the forward through eager ops and differentiates it: gradcheck in
    float64 on the eager path; the kernel path (fp32 inside) must give the very same gradients.
    channels_last: the eager path's shifted statistics carry their gradients too."""
    g = torch.Generator().manual_seed(4)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64).to(device).contiguous(memory_format=layout)
    w, b = torch.randn(2, 6, generator=g, dtype=torch.float64).to(device)
    f = torch.randn(1, 32, 5, 4, generator=g, dtype=torch.float64).to(device).contiguous(memory_format=layout)
    scale, shift = torch.randn(2, 1, 32, 3, 2, generator=g, dtype=torch.float64).to(device)
    gn = lambda *a: vf.group_norm(a[0], 3, a[1], a[2], activation="silu")
    sn = lambda *a: vf.spatial_norm(a[0], a[1], a[2], 32, None, None, activation="silu")
    for fn, inputs in ((gn, (x, w, b)), (sn, (f, scale, shift))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        if backend == "eager":
            assert torch.autograd.gradcheck(fn, leaves)
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        vqfast.set_backend("eager")
        expected = torch.autograd.grad(fn(*leaves), leaves, torch.ones_like(out))
        vqfast.set_backend(backend)
        assert all(torch.equal(a, e) for a, e in zip(grads, expected))
        with torch.no_grad():  # the values do not depend on whether a gradient is recorded
            assert torch.equal(fn(*leaves), out)


def test_opcheck(backend, device):
    use_triton = backend == "triton"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 5, 3, generator=g).to(device).requires_grad_()
    w, b = torch.randn(2, 8, generator=g).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.vqfast.group_norm.default, (x, 4, w, b, 1e-6, True, use_triton))
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.vqfast.group_norm.default, (cl, 4, None, None, 1e-6, False, use_triton))
    f = torch.randn(1, 32, 6, 4, generator=g).to(device).requires_grad_()
    scale, shift = torch.randn(2, 1, 32, 3, 2, generator=g).to(device)
    torch.library.opcheck(torch.ops.vqfast.spatial_norm.default, (f, scale, shift, 32, None, None, 1e-6, True, use_triton))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_groups=5 must divide the 8 channels of x"):
        vf.group_norm(torch.randn(1, 8, 2, 2), 5)
    with pytest.raises(ValueError, match="activation must be one of"):
        vf.group_norm(torch.randn(1, 8, 2, 2), 4, activation="gelu")
    with pytest.raises(ValueError, match=r"scale, shift \(B, C, h, w\) of one shape"):
        vf.spatial_norm(torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2), torch.randn(1, 32, 2, 3), 32, None, None)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_compiled_decode_has_no_graph_break(backend, grad, device):
    """torch.compile(model.decode, fullgraph=True) of a MoVQ-like model (SpatialNorm, attention):
    with gradients recorded every op of the tower is traced (on an x86-64 CPU in fp32 without
    them, the tower is one opaque op, see vqfast.models.tower_op)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = vqfast.VQModel(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, vq_embed_dim=4,
        norm_type="spatial", num_vq_embeddings=64,
    ).eval().to(device)
    h = torch.randn(1, 4, 4, 4, device=device)
    decode = torch.compile(model.decode, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(grad):
        out, ref = decode(h).sample, model.decode(h).sample
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_every_norm_of_the_model_goes_through_the_fused_ops(monkeypatch):
    """ResNet norm1/norm2, both conv_norm_out, the attention norms: each GroupNorm and SpatialNorm
    module runs once per forward, through vqfast's ops (which the dispatcher routes)."""
    from conftest import CONFIGS

    from vqfast.ops import reference
    from vqfast.models.layers import SpatialNorm

    calls = {"group_norm": 0, "spatial_norm": 0}
    for name in calls:
        real = getattr(reference, name)

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)

        monkeypatch.setattr(reference, name, counted)
    model = vqfast.VQModel(**CONFIGS["movq"]).eval()
    vqfast.set_backend("eager")
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    vqfast.set_backend(None)
    spatial = sum(isinstance(m, SpatialNorm) for m in model.modules())
    groups = sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) - spatial  # one inside each SpatialNorm
    assert spatial > 10 and calls == {"group_norm": groups, "spatial_norm": spatial}


@pytest.mark.parametrize("hw", [(2048, 3), (3, 2048)])
def test_tall_and_wide_images(backend, hw):
    """H and W up to 2048: the position -> (row, column) arithmetic and the nearest maps."""
    g = torch.Generator().manual_seed(6)
    f = make((1, 32, *hw), torch.float32, g)
    scale, shift = make((1, 32, hw[0] // 8 or 1, hw[1] // 8 or 1), torch.float32, g), make(
        (1, 32, hw[0] // 8 or 1, hw[1] // 8 or 1), torch.float32, g)
    out = vf.spatial_norm(f, scale, shift, 32, None, None)
    ref = sn_ref(f.double(), scale.double(), shift.double(), 32, None, None, False)
    three_way(out, ref, sn_ref(f, scale, shift, 32, None, None, False))
