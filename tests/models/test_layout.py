"""channels_last end to end, and no host syncs on the model's paths."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_ours, make_pair, rel_err, use_triton
from torch.utils._python_dispatch import TorchDispatchMode

import vqfast
from vqfast.ops import reference

CL = torch.channels_last


class OpRecorder(TorchDispatchMode):
    """Records every aten op run inside it, with its 4-D outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((func, [t for t in outs if isinstance(t, torch.Tensor) and t.ndim == 4]))
        return out


@pytest.fixture
def use_backend():
    def use(name):
        use_triton() if name == "triton" else vqfast.set_backend(name)

    yield use
    vqfast.set_backend(None)


# The Triton path (interpreted on CPU) runs a movq decode only: SpatialNorm, GroupNorm and the
# codebook kernel are all in it (test_norms checks each kernel in both layouts), and an
# interpreted encoder costs a minute more. An interpreted norm takes about 1.5 s a call, so its
# model has one resnet per encoder block (two per decoder block: the Workspace hand-over
# still runs) and a 1024-entry codebook (the two Triton cases took 48 s and 42 s here, against 83 s
# and 66 s with the full test config).
INTERPRETED = dict(layers_per_block=1, num_vq_embeddings=1024, block_out_channels=(32, 32, 32, 32))

@pytest.mark.parametrize("backend, name", [("eager", "movq"), ("eager", "amused"), ("triton", "movq")])
def test_channels_last_model_stays_channels_last(use_backend, device, backend, name):
    if backend == "triton":
        use_backend(backend)  # skipped here where the kernels cannot run
    ours = make_ours(name, **(INTERPRETED if backend == "triton" else {})).to(device)
    x = images(2, 32 if name == "amused" else 16).to(device)  # latents of 2x2 at least: 1x1 has no layout
    vqfast.set_backend("eager")
    with torch.no_grad():
        latents = ours.encode(x).latents
        ref = ours.decode(latents).sample if backend == "triton" else ours(x).sample
        cl_model = copy.deepcopy(ours).to(memory_format=CL)
        use_backend(backend)
        with OpRecorder() as rec:
            if backend == "triton":
                out = cl_model.decode(latents.contiguous(memory_format=CL)).sample
            else:
                out = cl_model(x.to(memory_format=CL)).sample
    assert rel_err(out, ref) < 1e-5
    assert out.is_contiguous(memory_format=CL)
    # Every activation an op makes (views aside) is channels_last: no layout copies. The one
    # exception is the quantizer's latent-sized work (its eager search runs on (N, D) rows, and
    # z_q is made contiguous as diffusers makes it). A write into a slice of a channels_last
    # tensor (Downsample2D assembling its output) is no layout copy either.
    copies = [
        (str(func), tuple(t.shape))
        for func, outs in rec.ops
        # views: SpatialNorm's maps (halves of pairs), the GroupNorm shift's sampling grid
        if not func._schema.name.startswith(("aten::view", "aten::transpose", "aten::_unsafe_view", "aten::permute",
                                             "aten::select", "aten::slice"))
        for t in outs
        if t.shape[0] == 2 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1 and not t.is_contiguous(memory_format=CL)
        and not (t._is_view() and t._base.is_contiguous(memory_format=CL))
    ]
    latent_size = latents.numel()
    assert all(math.prod(shape) == latent_size for _, shape in copies), copies


def test_cpu_eager_runs_channels_last_inside_and_returns_the_input_layout(use_backend):
    """On the CPU's eager path an NCHW call runs its convolutions channels_last (oneDNN's fast
    layout) and hands back NCHW images and latents; ``exact`` keeps diffusers' NCHW convolutions."""
    pytest.importorskip("diffusers", reason="the reference is diffusers' model (a test dependency)")
    use_backend("eager")
    theirs, ours = make_pair("movq")
    x = images(2, 16)
    with torch.no_grad():
        with OpRecorder() as rec:
            latents = ours.encode(x).latents
            out = ours.decode(latents).sample
        ref = theirs.decode(theirs.encode(x).latents).sample
        ours.exact = True
        with OpRecorder() as exact_rec:
            ours.decode(latents)
    assert latents.is_contiguous() and out.is_contiguous() and rel_err(out, ref) < 1e-5
    # (the latent-sized 1x1 quant_conv and post_quant_conv run outside the towers, in NCHW)
    convs = [t for func, outs in rec.ops if "convolution" in str(func) for t in outs if t.shape[1] > 4]
    assert convs and all(t.is_contiguous(memory_format=CL) for t in convs)
    exact_convs = [t for func, outs in exact_rec.ops if "convolution" in str(func) for t in outs if t.shape[1] > 4]
    assert exact_convs and not any(t.is_contiguous(memory_format=CL) and not t.is_contiguous() for t in exact_convs[:3])


def test_channels_last_group_norm_does_not_cancel():
    """PyTorch's CPU GroupNorm for channels_last takes E[x^2] - E[x]^2; ours (shifted by each
    group's sampled mean first) must not cancel, at mean 3 or 300."""
    for mean, std, size in ((3, 0.01, 32), (300, 0.1, 33), (300, 0.1, 200)):  # 200: a sampled grid
        g = torch.Generator().manual_seed(0)
        x = (mean + std * torch.randn(1, 64, size, size, generator=g)).to(memory_format=CL)
        ref = F.group_norm(x.double(), 16, eps=1e-6)
        out = reference.group_norm(x, 16, None, None, 1e-6, silu=False)
        assert out.is_contiguous(memory_format=CL)
        assert (out.double() - ref).abs().max() < 1e-4  # the NCHW kernel: 3.6e-4 at mean 300


@pytest.mark.parametrize(
    "backend, call",
    [("eager", "encode"), ("eager", "decode"), ("eager", "forward"), ("eager", "decode_ids"), ("triton", "decode")],
)
def test_no_host_syncs(use_backend, device, backend, call):
    """No .item() / nonzero / bool(tensor) on the model's paths: each would stall a GPU stream.
    A token-id decode makes exactly one, to refuse ids outside the codebook by name. (A decode
    runs all three kernels on the Triton path.)"""
    use_backend(backend)  # skipped here where the kernels cannot run
    name = "amused" if call == "decode_ids" else "movq"
    ours = make_ours(name, **(INTERPRETED if backend == "triton" else {})).to(device)
    x = images(1, 16).to(device)
    vqfast.set_backend("eager")  # the inputs (an interpreted encoder would cost a minute)
    with torch.no_grad():
        latents = ours.encode(x).latents
        ids = ours.quantize(latents)[2][2].view(1, *latents.shape[-2:])
    use_backend(backend)
    with torch.no_grad():
        run = {
            "encode": lambda: ours.encode(x),
            "decode": lambda: ours.decode(latents),
            "forward": lambda: ours(x),
            "decode_ids": lambda: ours.decode(
                ids, force_not_quantize=True, shape=(1, *latents.shape[-2:], latents.shape[1])
            ),
        }[call]
        with OpRecorder() as rec:
            run()
    syncs = [str(func) for func, _ in rec.ops if func._schema.name in ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")]
    assert len(syncs) == (1 if call == "decode_ids" else 0), syncs
