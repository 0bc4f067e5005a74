"""channels_last end to end, and no host syncs on the model's paths."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_pair, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from vqfast import reference

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


@pytest.mark.parametrize("name", ["movq", "amused"])
def test_channels_last_model_stays_channels_last(backend, name):
    _, ours = make_pair(name)
    x = images(2, 32)
    with torch.no_grad():
        ref = ours(x).sample
        cl_model = copy.deepcopy(ours).to(memory_format=CL)
        with OpRecorder() as rec:
            out = cl_model(x.to(memory_format=CL)).sample
    assert rel_err(out, ref) < 1e-5
    assert out.is_contiguous(memory_format=CL)
    # Every activation an op makes (views aside) is channels_last: no layout copies. The one
    # exception is the quantizer's z_q, made contiguous as diffusers makes it (latent-sized).
    copies = [
        (str(func), tuple(t.shape))
        for func, outs in rec.ops
        if not func._schema.name.startswith(("aten::view", "aten::transpose", "aten::_unsafe_view"))
        for t in outs
        if t.shape[0] == 2 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1 and not t.is_contiguous(memory_format=CL)
    ]
    latent = ours.quantize.vq_embed_dim
    assert all(func == "aten.clone.default" and shape[1] == latent for func, shape in copies), copies


def test_channels_last_group_norm_does_not_cancel():
    """PyTorch's CPU GroupNorm for channels_last takes E[x^2] - E[x]^2; ours must not."""
    x = (3 + 0.01 * torch.randn(1, 64, 32, 32, generator=torch.Generator().manual_seed(0))).to(memory_format=CL)
    ref = F.group_norm(x.double(), 16, eps=1e-6)
    out = reference.group_norm(x, 16, None, None, 1e-6, silu=False)
    assert (out.double() - ref).abs().max() < 1e-3  # fp32 rounding of a group with std 0.01


@pytest.mark.parametrize("call", ["encode", "decode", "forward", "decode_ids"])
def test_no_host_syncs(backend, call):
    """No .item() / nonzero / bool(tensor) on the model's paths: each would stall a GPU stream.
    A token-id decode makes exactly one, to refuse ids outside the codebook by name."""
    name = "amused" if call == "decode_ids" else "movq"
    _, ours = make_pair(name)
    x = images(1, 32)
    with torch.no_grad():
        latents = ours.encode(x).latents
        ids = ours.quantize(latents)[2][2].view(1, *latents.shape[-2:])
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
