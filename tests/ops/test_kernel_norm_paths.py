"""The norm kernels' layout-specialised paths (a contiguous NCHW slab per group; channels_last
runs of CG channels) against float64 by the three-way rule, and the launcher's guard: views
that the vector paths cannot read (misaligned, odd group width, sliced) take the strided path
and stay exact. Runs the kernels (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch
from conftest import use_triton
from test_norms import gn_ref, make, three_way

import vqfast
from vqfast import functional as vf
from vqfast.kernels import group_norm as kernel


def path(x, G):
    """The path the launcher takes for x and an output laid out like it."""
    x4 = x.unsqueeze(2) if x.ndim == 3 else x
    return kernel.layout_path(x4, torch.empty_like(x4), x4.shape[1] // G)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 8, 64, 72), (1, 8, 48, 48), (2, 16, 8, 16)])
def test_specialised_paths_three_way(triton_backend, dtype, layout, shape):
    """Several splits per group with an odd number of full tiles (64 x 72: a group's slab of
    18432 elements in programs of 3 tiles), pairs of tiles and a partial last one (48 x 48), and
    a partial tile alone (8 x 16); batch 1 and 2, with and without SiLU and affine."""
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[3])
    x = make(shape, dtype, g, mean=2.0, std=3.0, channels_last=layout == "channels_last")
    C, G = shape[1], shape[1] // 4
    assert path(x, G) == layout
    w, b = make((C,), dtype, g), make((C,), dtype, g)
    for silu, affine in ((True, True), (False, False)):
        wb = (w, b) if affine else (None, None)
        out = vf.group_norm(x, G, *wb, activation="silu" if silu else None)
        ref = gn_ref(x.double(), G, *(t.double() if t is not None else None for t in wb), silu)
        three_way(out, ref, gn_ref(x, G, *wb, silu))
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def test_large_mean_small_spread_on_the_vector_paths(triton_backend):
    """mean 300, std 0.1 through the per-slot Welford updates of both specialised paths."""
    g = torch.Generator().manual_seed(8)
    for cl in (False, True):
        x = make((1, 8, 64, 64), torch.float32, g, mean=300.0, std=0.1, channels_last=cl)
        assert path(x, 2) == ("channels_last" if cl else "nchw")
        three_way(vf.group_norm(x, 2), gn_ref(x.double(), 2, None, None, False), gn_ref(x, 2, None, None, False))


@pytest.mark.parametrize("case", ["misaligned", "odd_cg", "sliced", "odd_positions"])
def test_views_the_vector_paths_cannot_read_take_the_strided_path(triton_backend, case):
    g = torch.Generator().manual_seed(9)
    G = 2
    if case == "misaligned":  # contiguous, but 4 bytes past a 16-byte boundary
        flat = make((1 + 2 * 8 * 16 * 16,), torch.float32, g)
        x = flat[1:].view(2, 8, 16, 16)
        assert x.is_contiguous() and x.data_ptr() % 16
    elif case == "odd_cg":  # channels_last with C/G = 3
        x = make((2, 6, 16, 16), torch.float16, g, channels_last=True)
    elif case == "sliced":
        x = make((2, 10, 16, 20), torch.float32, g)[:, 1:9, :, 2:18]
    else:  # H * W * 2 bytes not a multiple of 16
        x = make((1, 8, 33, 31), torch.float16, g)
    assert path(x, G) == "strided"
    C = x.shape[1]
    w, b = make((C,), x.dtype, g), make((C,), x.dtype, g)
    out = vf.group_norm(x, G, w, b, activation="silu")
    three_way(out, gn_ref(x.double(), G, w.double(), b.double(), True), gn_ref(x, G, w, b, True))


#: The layouts of the SpatialNorm apply, NCHW in both axis orders of its tile whichever triton is
#: installed (the launcher picks one by version: GATHER_COLS_FIRST); channels_last has one.
LAYOUTS = [("nchw", False), ("nchw", True), ("channels_last", None)]
LAYOUT_IDS = ["nchw-rows_first", "nchw-cols_first", "channels_last"]


@pytest.fixture
def layout(request, monkeypatch):
    name, cols_first = request.param
    if cols_first is not None:
        monkeypatch.setattr(kernel, "GATHER_COLS_FIRST", cols_first)
    return name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS, indirect=True)
def test_spatial_norm_with_specialised_stats(triton_backend, layout, dtype):
    """SpatialNorm's statistics and apply take the layout's vector kernels (several rows per
    trip, a partial last trip, rows narrower than the tile)."""
    from test_norms import sn_ref

    g = torch.Generator().manual_seed(10)
    f = make((2, 64, 40, 24), dtype, g, channels_last=layout == "channels_last")
    assert path(f, 16) == layout
    assert kernel.spatial_config(layout, 2, 64, 16, 40, 24, f.element_size()) is not None
    scale, shift = make((2, 64, 5, 7), dtype, g), make((2, 64, 5, 7), dtype, g)
    out = vf.spatial_norm(f, scale, shift, 16, None, None, activation="silu")
    ref = sn_ref(f.double(), scale.double(), shift.double(), 16, None, None, True)
    three_way(out, ref, sn_ref(f, scale, shift, 16, None, None, True))


#: (h, H, w, W): upsampling by integer and fractional ratios, downsampling, one source row, rows
#: as wide as the tile (W a power of two) and narrower.
NEAREST_CASES = [(1, 8, 3, 8), (3, 8, 5, 12), (5, 12, 7, 16), (7, 33, 13, 36), (6, 31, 2, 40), (12, 5, 9, 4),
                 (9, 64, 4, 8), (17, 40, 8, 32), (9, 64, 5, 64)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS, indirect=True)
def test_spatial_apply_picks_pytorchs_nearest_source(triton_backend, layout):
    """The vector kernels compute each position's source row and column (no index table): with
    scale 0 the output is exactly the shift map gathered there, which must be F.interpolate's.
    The NCHW cases end with a partial trip and without one (EVEN_H)."""
    g = torch.Generator().manual_seed(11)
    even_h = set()
    for h, H, w, W in NEAREST_CASES:
        f = make((1, 4, H, W), torch.float32, g, channels_last=layout == "channels_last")
        cfg = kernel.spatial_config(layout, 1, 4, 2, H, W, 4)
        assert path(f, 2) == layout and cfg is not None
        even_h.add(cfg["const"].get("EVEN_H"))
        shift = make((1, 4, h, w), torch.float32, g)
        out = vf.spatial_norm(f, torch.zeros_like(shift), shift, 2, None, None)
        want = torch.nn.functional.interpolate(shift, size=(H, W), mode="nearest")
        assert torch.equal(out, want), (h, H, w, W)
    assert even_h == ({False, True} if layout == "nchw" else {None})


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_spatial_pairs_are_a_view_of_the_models_maps(layout, device):
    """The model's maps on the Triton path are the halves of float32 pairs in the layout the
    kernel gathers: the launcher then reads them in place; other maps are paired by a copy."""
    from vqfast.models.layers import SpatialNorm, spatial_maps

    norm = SpatialNorm(64, 4)
    zq = torch.randn(2, 4, 3, 5, device=device)
    like = torch.empty(2, 64, 6, 10, device=device)
    channels_last = layout == "channels_last"
    if channels_last:
        like = like.contiguous(memory_format=torch.channels_last)
    use_triton()
    try:
        scale, shift = spatial_maps(norm, zq, like)
    finally:
        vqfast.set_backend(None)
    pairs = kernel.spatial_pairs(scale, shift, channels_last)
    assert pairs.dtype == torch.int64 and pairs.data_ptr() == scale.data_ptr()
    halves = pairs.unsqueeze(-1).view(torch.float32)  # (..., 2)
    order = (0, 2, 3, 1) if channels_last else (0, 1, 2, 3)
    assert torch.equal(halves[..., 0], scale.permute(order)) and torch.equal(halves[..., 1], shift.permute(order))
    ref_scale, ref_shift = spatial_maps(norm, zq, like)  # the eager path's maps
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shift, ref_shift, rtol=1e-6, atol=1e-6)
    copied = kernel.spatial_pairs(ref_scale, ref_shift, channels_last)
    assert copied.data_ptr() != ref_scale.data_ptr() and torch.equal(copied, pairs)
