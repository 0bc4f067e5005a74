"""GroupNorm+SiLU and SpatialNorm: vqfast against the eager code they replace, same device.

- CPU: the SpatialNorm calls of a Kandinsky 2.2 MoVQ decode at 256x256, summed (shapes recorded
  from the real decoder): diffusers' SpatialNorm against vqfast's (1x1 convs at the latent
  resolution, broadcast instead of upsampled maps).
- GPU: kernel cases at the decoder's real shapes (128-512 channels, 64x64 to 512x512, batch 1 and
  8, fp16 and bf16), with the achieved GB/s (two reads and one write of the activation), against
  the eager ops and torch.compile of them.
"""

import pytest
import torch
import torch.nn.functional as F
from cases import DEV, real_config

import vqfast
from vqfast import functional as vf
from vqfast.models.layers import SpatialNorm


def movq_spatial_calls(side: int = 256):
    """(f shape, zq shape) of every SpatialNorm call in a MoVQ decode at side x side."""
    config = real_config("movq")
    calls = []
    model = vqfast.VQModel(**config).eval()
    original = SpatialNorm.forward

    def record(self, f, zq, activation=None):
        calls.append((tuple(f.shape), tuple(zq.shape)))
        return original(self, f, zq, activation)

    SpatialNorm.forward = record
    try:
        with torch.no_grad():
            model.decode(torch.randn(1, 4, side // 8, side // 8))
    finally:
        SpatialNorm.forward = original
    return calls


@pytest.mark.skipif(DEV != "cpu", reason="the CPU case; GPUs run the kernel cases below")
@pytest.mark.parametrize("impl", ["vqfast", "diffusers"])
def test_movq_spatial_norms_summed(benchmark, impl):
    calls = movq_spatial_calls()
    g = torch.Generator().manual_seed(0)
    if impl == "diffusers":
        from diffusers.models.attention_processor import SpatialNorm as Theirs
    else:
        Theirs = SpatialNorm
    mods = [Theirs(f[1], zq[1]).eval() for f, zq in calls]
    inputs = [(torch.randn(f, generator=g), torch.randn(zq, generator=g)) for f, zq in calls]
    benchmark.group = f"SpatialNorm: the {len(calls)} calls of a MoVQ decode at 256x256, fp32 cpu"
    benchmark.extra_info.update(device=DEV, calls=len(calls))

    def run():
        with torch.no_grad():
            for m, (f, zq) in zip(mods, inputs):
                m(f, zq)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


# (batch, channels, side): MoVQ decoder layers (512 ch at 64-128 px, 256 at 256, 128 at 512).
GPU_CASES = [(b, c, s, dt) for b, c, s in ((1, 512, 128), (1, 128, 512), (8, 256, 256), (8, 512, 64))
             for dt in ("float16", "bfloat16")]


def _eager(kind):
    def group(x, w, b, *_):
        return F.silu(F.group_norm(x, 32, w, b, 1e-6))

    def spatial(x, w, b, zq_scale, zq_shift):
        up = lambda t: F.interpolate(t, size=x.shape[-2:], mode="nearest")
        return F.silu(F.group_norm(x, 32, w, b, 1e-6) * up(zq_scale) + up(zq_shift))

    return group if kind == "group" else spatial


@pytest.mark.skipif(DEV != "cuda", reason="kernel cases need a GPU")
@pytest.mark.parametrize("impl", ["vqfast", "eager", "compiled"])
@pytest.mark.parametrize("kind", ["group", "spatial"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"b{c[0]}-c{c[1]}-{c[2]}px-{c[3]}")
def test_norm_kernels(benchmark, case, kind, impl):
    B, C, S, dt = case
    dtype = getattr(torch, dt)
    x = torch.randn(B, C, S, S, device=DEV, dtype=dtype)
    w, b = torch.randn(2, C, device=DEV, dtype=dtype)
    scale, shift = torch.randn(2, B, C, S // 8, S // 8, device=DEV, dtype=dtype)
    if impl == "vqfast":
        fn = (lambda *a: vf.group_norm(a[0], 32, a[1], a[2], activation="silu")) if kind == "group" else (
            lambda *a: vf.spatial_norm(a[0], a[3], a[4], 32, a[1], a[2], activation="silu"))
    else:
        fn = _eager(kind)
        if impl == "compiled":
            fn = torch.compile(fn)
    args = (x, w, b, scale, shift)
    fn(*args)
    torch.cuda.synchronize()
    moved = 3 * x.numel() * x.element_size()  # two reads and one write
    benchmark.group = f"{kind} norm+SiLU {B}x{C}x{S}x{S} {dt} {torch.cuda.get_device_name()}"
    benchmark.extra_info.update(device=DEV, gpu=torch.cuda.get_device_name(), bytes=moved)

    def run():
        fn(*args)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)
    benchmark.extra_info["GB/s"] = moved / benchmark.stats.stats.median / 1e9
