"""The F(2x2, 3x3) Winograd convolution of the CPU's eager fp32 path (vqfast.ops.winograd), and
where the layers use it: against a float64 reference by the three-way rule, across strips,
edges, batches and channel counts, with canaries."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_pair
from torch import nn

from vqfast.models import layers
from vqfast.models.workspace import Workspace
from vqfast.ops import winograd

CL = torch.channels_last


def case(B, C, O, H, W, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, H, W, generator=g) + offset).contiguous(memory_format=CL)
    w = torch.randn(O, C, 3, 3, generator=g) / (3 * C**0.5)
    b = torch.randn(O, generator=g)
    return x, w, b


def run(x, w, b, out=None, accumulate=False):
    B, _, H, W = x.shape
    O = w.shape[0]
    if out is None:
        out = torch.full((B, O, H, W), float("nan")).contiguous(memory_format=CL)
    return winograd.conv3x3(x, winograd.weights(w), winograd.bias_rows(b, O, x.device), out, accumulate)


def check(out, x, w, b, extra=None):
    """Three-way rule: |out - f64| <= 2 |F.conv2d fp32 - f64| + 1e-5 relative to the output's size."""
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    same = F.conv2d(x, w, b, padding=1).double()
    if extra is not None:
        ref, same = ref + extra.double(), same + extra.double()
    atol = 1e-5 * ref.abs().max()
    err = (out.double() - ref).abs().max()
    assert err <= 2 * (same - ref).abs().max() + atol, (err.item(), (same - ref).abs().max().item(), atol.item())


@pytest.mark.parametrize("B,C,O,H,W", [(1, 256, 256, 2, 2), (2, 256, 40, 6, 10), (3, 272, 33, 34, 8), (1, 256, 512, 16, 12)])
def test_matches_the_float64_convolution(B, C, O, H, W):
    x, w, b = case(B, C, O, H, W)
    out = run(x, w, b)
    assert out.is_contiguous(memory_format=CL)
    check(out, x, w, b)


@pytest.mark.parametrize("strip_rows", [1, 2, 3])
def test_strips_split_anywhere_give_the_same_values(monkeypatch, strip_rows):
    """Strips of 1, 2 and 3 tile rows over 7 tile rows: the first and last strips meet the zero
    padding rows, the middle ones only x; every split gives the convolution's values by the
    three-way rule. (Not bit for bit: a strip's products are a GEMM of n * S rows, and the BLAS
    may sum a row in another order for another row count, as it does on AVX2 CPUs.)"""
    x, w, b = case(2, 256, 24, 14, 6, seed=3)
    monkeypatch.setattr(winograd, "STRIP_BYTES", 16 * 3 * 256 * 4 * strip_rows)
    check(run(x, w, b), x, w, b)


def test_a_slice_of_the_batch_gives_its_rows_bit_for_bit():
    """Each image goes through the same strips alone: no dependence on the batch around it."""
    x, w, b = case(4, 256, 24, 10, 6, seed=11)
    torch.testing.assert_close(run(x[1:3], w, b), run(x, w, b)[1:3], rtol=0, atol=0)


def test_large_offsets():
    x, w, b = case(1, 256, 32, 8, 8, offset=300.0, seed=5)
    check(run(x, w, b), x, w, b)


def test_accumulate_adds_to_what_out_holds():
    x, w, b = case(2, 256, 48, 8, 6, seed=7)
    residual = torch.randn(2, 48, 8, 6).contiguous(memory_format=CL)
    out = run(x, w, b, residual.clone(), accumulate=True)
    check(out, x, w, b, extra=residual)


def test_no_nan_leaks_from_scratch_or_from_around_x(poisoned_allocations):
    """The scratch buffers start NaN (the poisoned torch.empty): the zero padding columns must be
    written, and every output too. x is a dense view inside a NaN-filled storage."""
    _, w, b = case(1, 256, 16, 6, 4, seed=9)
    storage = torch.full((6 * 4 * 256 + 512,), float("nan"))
    x = storage[256 : 256 + 6 * 4 * 256].view(1, 6, 4, 256).permute(0, 3, 1, 2)
    x.copy_(torch.randn(1, 256, 6, 4))
    assert winograd.fits(x, 128)
    out = run(x, w, b)
    assert not out.isnan().any()
    check(out, x, w, b)


def test_fits_only_wide_even_channels_last_fp32():
    x = torch.randn(1, 256, 8, 8).contiguous(memory_format=CL)
    assert winograd.fits(x, 128)
    assert not winograd.fits(x, 64)  # narrow output
    assert not winograd.fits(x.contiguous(), 128)  # NCHW
    assert not winograd.fits(x.double(), 128)
    assert not winograd.fits(x.bfloat16(), 128)
    assert not winograd.fits(x[:, :, :7], 128)  # odd H (and no longer dense)
    assert not winograd.fits(torch.randn(1, 256, 7, 8).contiguous(memory_format=CL), 128)
    assert not winograd.fits(torch.randn(1, 128, 8, 8).contiguous(memory_format=CL), 128)


def test_weights_are_the_transform_of_g():
    """u = G g G^T: the transform of a one-hot kernel is the outer product of G's columns."""
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 1, 2] = 1.0
    u = winograd.weights(w).view(4, 4)
    G = torch.tensor(winograd._G)
    torch.testing.assert_close(u, torch.outer(G[:, 1], G[:, 2]), rtol=0, atol=0)


class Calls:
    def __init__(self, monkeypatch):
        self.n = 0
        real = winograd.conv3x3

        def counted(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(winograd, "conv3x3", counted)


def test_layers_take_it_only_where_it_applies(monkeypatch):
    """conv(), conv_into() and conv_add() go through Winograd for a wide 3x3 convolution on the
    eager CPU channels_last fp32 path, and not with hooks, a gradient to record, NCHW, bf16,
    narrow inputs or other kernel shapes."""
    calls = Calls(monkeypatch)
    m = nn.Conv2d(256, 128, 3, padding=1)
    x = torch.randn(1, 256, 8, 8).contiguous(memory_format=CL)
    with torch.no_grad():
        ref = F.conv2d(x, m.weight, m.bias, padding=1)
        torch.testing.assert_close(layers.conv(m, x), ref, rtol=1e-5, atol=1e-5)
        residual = torch.randn(1, 128, 8, 8).contiguous(memory_format=CL)
        out = layers.conv_add(m, x, residual.clone(), overwrite=True)
        torch.testing.assert_close(out, ref + residual, rtol=1e-5, atol=1e-5)
        workspace = Workspace.for_owner(True, x)
        dead = workspace.take((1, 128, 8, 8), x, CL).fill_(float("nan"))  # a dead activation, NaN
        workspace.give(dead)
        into = layers.conv_into(m, x, workspace)  # in dead's memory, every element written
        assert into.data_ptr() == dead.data_ptr()
        torch.testing.assert_close(into, ref, rtol=1e-5, atol=1e-5)
        assert calls.n == 3
        narrow = x[:, :128].contiguous(memory_format=CL)
        for other, y in [
            (m, x.contiguous()), (nn.Conv2d(256, 128, 3, padding=1).bfloat16(), x.bfloat16()),
            (nn.Conv2d(128, 128, 3, padding=1), narrow), (nn.Conv2d(256, 64, 3, padding=1), x),
            (nn.Conv2d(256, 128, 3, padding=1, stride=2), x), (nn.Conv2d(256, 128, 3, padding=2, dilation=2), x),
            (nn.Conv2d(256, 128, 1), x), (nn.Conv2d(256, 128, 3, padding=1, padding_mode="reflect"), x),
        ]:
            layers.conv(other, y)
        handle = m.register_forward_hook(lambda *a: None)
        layers.conv(m, x)
        handle.remove()
    layers.conv(m, x)  # grad enabled, weights require grad
    assert calls.n == 3


@pytest.mark.parametrize("name", ["movq", "default"])
def test_a_wide_model_matches_diffusers(name, monkeypatch):
    """A 256-channel model (two levels, 16x16 images), where the resnets' 3x3 convolutions go
    through Winograd: encode, decode and forward within the three-way rule of diffusers against
    its float64 self."""
    calls = Calls(monkeypatch)
    changes = dict(block_out_channels=(256, 256), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)
    theirs, ours = make_pair(name, **changes)
    ref = copy.deepcopy(theirs).double()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for f in (lambda m, x: m.encode(x).latents, lambda m, x: m.decode(m.encode(x).latents, force_not_quantize=True).sample):
            a, b, r = f(ours, x), f(theirs, x), f(ref, x.double())
            atol = 1e-5 * r.abs().max()
            assert (a.double() - r).abs().max() <= 2 * (b.double() - r).abs().max() + atol
    assert calls.n > 0
