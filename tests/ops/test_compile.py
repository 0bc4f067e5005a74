"""torch.compile of the whole model: equal to eager in every dtype. On an x86-64 CPU in fp32 each
tower reaches the graph as one opaque op running the eager path; elsewhere on CPU the norms reach
inductor as plain PyTorch ops (no custom-op boundary), while the Triton path keeps its custom ops.

Inductor compiles tiny models only (its C++ code generation costs seconds per graph here)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import vqfast
from conftest import use_triton
from vqfast.models.tower_op import _FUSED_SUMS

#: (relative tolerance of compiled vs a float64 reference beyond twice eager's error)
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    vqfast.set_backend(None)
    yield
    vqfast.set_backend(None)
    torch._dynamo.reset()


def _tiny(**kw):
    """Two blocks each way (so the folded upsample is in), attention in the decoder only: the
    smallest model with every kind of layer, to keep inductor's compile time down."""
    torch.manual_seed(0)
    config = dict(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, vq_embed_dim=4,
        norm_num_groups=8, num_vq_embeddings=64, layers_per_block=1, mid_block_add_attention=False,
    )
    config.update(kw)
    model = vqfast.VQModel(**config).eval()
    with torch.no_grad():  # a few codes far apart: bf16 rounding of the latents picks the same ones
        model.quantize.embedding.weight.normal_().mul_(10)
    return model


def _calls(spatial, ids_model, latent):
    """Every branch: encode, forward (encode, then the quantizing decode), the pass-through and
    the token-id decode, in one compiled function (one graph: a fraction of inductor's time for
    compiling them apart)."""

    def run(x, h, ids):
        return {
            "encode": spatial.encode(x).latents,
            "decode pass-through": spatial.decode(h, force_not_quantize=True).sample,
            "decode token ids": ids_model.decode(ids, force_not_quantize=True, shape=(1, latent, latent, 4)).sample,
            "forward": spatial(x).sample,
        }

    return run


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


#: The bf16 case is sized to hold 64-channel, 32-group SpatialNorms over 8x8 latents with
#: attention: at that size (and not at 32 channels over 4x4) the compiled decode came out all
#: NaN on a 2-core Xeon with AVX-512, where inductor's CPU kernels met a GCC 12 miscompilation
#: of PyTorch's bfloat16 32x32 transpose (see vqfast.ops.reference._group_norm).
SIZES = {
    torch.float32: dict(kw={}, image=16),
    torch.bfloat16: dict(
        kw=dict(block_out_channels=(64, 64), norm_num_groups=32, mid_block_add_attention=True), image=32
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_model_equals_eager(dtype):
    """Every call compiled by inductor against eager in the same dtype and a float64 copy of
    the same weights: compiled error <= 2 x eager error + the dtype's tolerance, and no NaN."""
    kw, image = SIZES[dtype]["kw"], SIZES[dtype]["image"]
    latent = image // 2
    spatial = _tiny(norm_type="spatial", num_vq_embeddings=4, **kw)
    ids_model = _tiny(lookup_from_codebook=True, **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, image, image, generator=g) * 2 - 1
    h = torch.randn(1, 4, latent, latent, generator=g)
    ids = torch.randint(0, 64, (1, latent, latent), generator=g)
    models = [m.to(dtype) for m in (spatial, ids_model)]
    x, h = x.to(dtype), h.to(dtype)
    wide = [copy.deepcopy(m).double() for m in models]  # the same (rounded) weights in float64
    with torch.no_grad():
        eager = _calls(*models, latent)(x, h, ids)
        ref = _calls(*wide, latent)(x.double(), h.double(), ids)
        compiled = torch.compile(_calls(*models, latent))(x, h, ids)
    for name, out in compiled.items():
        assert out.dtype == dtype and not out.isnan().any(), name
        assert _rel(out, ref[name]) <= 2 * _rel(eager[name], ref[name]) + ATOL[dtype], name


def _graph_ops(fn, *args):
    """The call targets of the FX graphs torch.compile hands its backend for fn(*args)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


def test_cpu_norms_reach_the_compiler_as_plain_ops():
    """On CPU in bf16 the compiler sees GroupNorm (per-channel var_mean, combined into groups),
    SpatialNorm and SiLU as PyTorch ops it can fuse; the codebook search stays one opaque custom
    op (its tile loop must not be unrolled)."""
    model = _tiny(norm_type="spatial").bfloat16()
    ops = _graph_ops(lambda h: model.decode(h).sample, torch.randn(1, 4, 4, 4).bfloat16())
    assert not [op for op in ops if "vqfast.group_norm" in op or "vqfast.spatial_norm" in op]
    assert sum("var_mean" in op for op in ops) >= 6 and any("silu" in op for op in ops)
    assert sum("vqfast.quantize" in op for op in ops) == 1


@pytest.mark.skipif(not _FUSED_SUMS, reason="the towers' opaque op is used on x86-64 CPUs with oneDNN only")
def test_fp32_cpu_towers_reach_the_compiler_as_one_eager_op():
    """fp32 on an x86-64 CPU, no gradient: each tower is one vqfast.eager_tower call running the
    eager path, with no graph break: a compiled tower equals eager bit for bit (the rest of the
    model, compiled by inductor, rounds its own way), and a copied model's graph runs the copy's
    own tower. With gradients recorded the towers' ops are traced."""
    model = _tiny(norm_type="spatial")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    ops = _graph_ops(lambda x: model(x).sample, x)
    assert sum("vqfast.eager_tower" in op for op in ops) == 2
    assert sum("conv2d" in op for op in ops) == 2  # quant_conv and post_quant_conv only
    with torch.no_grad():
        for tower, args in ((model.encoder, (x,)), (model.decoder, (torch.randn(2, 4, 4, 4),) * 2)):
            assert torch.equal(torch.compile(tower, fullgraph=True)(*args), tower(*args))
        assert _rel(torch.compile(model, fullgraph=True)(x).sample, model(x).sample) < 1e-5
        copied = copy.deepcopy(model)
        copied.encoder.conv_in.weight.mul_(2)
        assert torch.equal(torch.compile(copied.encoder, fullgraph=True)(x), copied.encoder(x))
        assert not torch.equal(copied.encoder(x), model.encoder(x))
    traced = []
    torch.compile(lambda x: model(x).sample, fullgraph=True,
                  backend=lambda gm, _: traced.extend(str(n.target) for n in gm.graph.nodes) or gm.forward)(x)
    assert not [op for op in traced if "eager_tower" in op] and sum("conv2d" in op for op in traced) > 10


def test_triton_path_keeps_its_custom_ops():
    use_triton()  # the kernels under the interpreter stand in for CUDA here (skipped where they cannot run)
    model = _tiny(norm_type="spatial")
    ops = _graph_ops(lambda h: model.decode(h, force_not_quantize=True).sample, torch.randn(1, 4, 2, 2))
    assert sum("vqfast.spatial_norm" in op for op in ops) >= 6
    assert not [op for op in ops if op.endswith("group_norm") and "vqfast" not in op]


def test_compiled_channels_last_norms_stay_accurate():
    """A channels_last GroupNorm / SpatialNorm compiled by inductor, on data where E[x^2] - E[x]^2
    cancels (mean 300, std 0.1): the three-way rule against PyTorch's own float32 NCHW kernel,
    the output channels_last; and the eager path (shifted statistics) as its canary."""
    from vqfast import functional as vf

    g = torch.Generator().manual_seed(3)
    x32 = (300 + 0.1 * torch.randn(2, 64, 9, 7, generator=g)).contiguous(memory_format=torch.channels_last)
    s32, t32 = (m.contiguous(memory_format=torch.channels_last) for m in torch.randn(2, 2, 64, 3, 7, generator=g))
    cases = {
        "group_norm": (lambda x, s, t: vf.group_norm(x, 32, activation="silu"),
                       lambda x, s, t: torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, eps=1e-6))),
        "spatial_norm": (lambda x, s, t: vf.spatial_norm(x, s, t, 32, None, None, activation="silu"),
                         lambda x, s, t: torch.nn.functional.silu(
                             torch.nn.functional.group_norm(x, 32, eps=1e-6) * s.repeat_interleave(3, 2) + t.repeat_interleave(3, 2))),
    }
    for name, (op, ref_fn) in cases.items():
        ref = ref_fn(x32.double(), s32.double(), t32.double())  # the rounded inputs, in float64
        eager = op(x32, s32, t32)
        with torch.no_grad():
            out = torch.compile(op)(x32, s32, t32)
        assert out.is_contiguous(memory_format=torch.channels_last), name
        assert (eager.double() - ref).abs().max().item() < 1e-4, name  # cancellation: off by O(1)
        torch_err = (ref_fn(x32.contiguous(), s32.contiguous(), t32.contiguous()).double() - ref).abs().max().item()
        assert (out.double() - ref).abs().max().item() <= 2 * torch_err + 1e-5 * ref.abs().max().item(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_group_norm_by_channels_matches_group_norm(dtype):
    """The compiled path's GroupNorm (per-channel var_mean combined into groups, back to channels
    by a product) against float64 F.group_norm by the three-way rule: channels_last and NCHW,
    three channels per group, (B, C, L) sequences, affine or not, a mean of 300 with std 0.1."""
    from vqfast.ops import reference

    atol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
    g = torch.Generator().manual_seed(4)
    for shape, groups, cl, mean, affine in [((2, 12, 5, 7), 4, True, 300.0, True), ((1, 12, 33, 31), 4, False, 3.0, False),
                                           ((2, 8, 37), 2, False, 0.0, True)]:
        x = (mean + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        wb = [torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype) for _ in range(2)] if affine else [None, None]
        out = reference._group_norm_by_channels(x, groups, *wb, 1e-6)
        ref = F.group_norm(x.double(), groups, *(t.double() if t is not None else None for t in wb), 1e-6)
        torch_err = (F.group_norm(x.contiguous(), groups, *wb, 1e-6).double() - ref).abs().max().item()
        assert out.dtype == dtype and out.shape == x.shape
        assert (out.double() - ref).abs().max().item() <= 2 * torch_err + atol * max(1.0, ref.abs().max().item()), shape
