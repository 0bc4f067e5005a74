"""The eager CPU path writes over the towers' own activations, never over a caller's tensor.

A new full-size tensor costs its page faults on first touch, so the towers hand their own
activations to the next op to write into (``overwrite``, ``into``): ResnetBlock2D sums conv2
into its input, the norms shift their input in place, later ops write into earlier ones' dead
tensors (Workspace, test_workspace), Downsample2D makes no padded copy. Every such write must
give the same values as a new tensor would, and only where the caller gave the tensor up."""

import copy

import pytest
import torch
from conftest import images, make_pair, randomize, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from vqfast import functional as vf
from vqfast.models.blocks import _Block
from vqfast.models.layers import _X86_ONEDNN, Downsample2D, ResnetBlock2D, _downsample_unpadded

CL = torch.channels_last


class NewTensors(TorchDispatchMode):
    """The distinct storages of the tensors that ops return inside it, by shape (kept alive, so
    a freed storage cannot come back under a new tensor)."""

    def __init__(self):
        super().__init__()
        self.kept = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.kept += [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        return out

    def storages(self, shape, besides: torch.Tensor):
        """Storages of tensors shaped ``shape`` other than that of ``besides``."""
        found = {t.untyped_storage().data_ptr() for t in self.kept if t.shape == shape}
        return found - {besides.untyped_storage().data_ptr()}


def block(in_channels: int, out_channels: int, spatial: bool) -> ResnetBlock2D:
    b = ResnetBlock2D(in_channels, out_channels, 8, 1e-6, "silu", zq_channels=4 if spatial else None)
    return randomize(b).eval()


@pytest.mark.parametrize("spatial", [False, True], ids=["group_norm", "spatial_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_resnet_block_overwrite_gives_the_same_values_and_only_then_writes_its_input(spatial, dtype, layout):
    b = block(32, 32, spatial).to(dtype)  # SpatialNorm has 32 groups
    x = (3 + images(2, 12, channels=32)).to(dtype).contiguous(memory_format=layout)
    zq = images(2, 3, seed=2, channels=4).to(dtype) if spatial else None
    before = x.clone()
    with torch.no_grad():
        out = b(x, zq)
        assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()  # a plain call: x untouched
        given_up = b(x.clone(memory_format=torch.preserve_format), zq, overwrite=True)
    assert torch.equal(given_up, out)
    assert given_up.is_contiguous(memory_format=layout)


@pytest.mark.skipif(not _X86_ONEDNN, reason="oneDNN's in-place convolution-plus-sum is used on x86-64 CPUs with AVX2 or more only")
def test_resnet_block_sums_into_its_input_on_the_eager_cpu_path():
    """fp32 channels_last: conv2 adds the residual into x (oneDNN's in-place sum) and norm2
    shifts conv1's output in place, so the block makes two full-size tensors (norm1's output and
    conv1's), where it made four. With a 1x1 shortcut the shortcut runs first, norm1 then works
    in x's memory and the sum goes into the shortcut's output: conv1's and the shortcut's are
    the two, and nothing of x's shape is made."""
    for channels_in in (16, 8):
        b = block(channels_in, 16, spatial=False)
        x = (3 + images(2, 12, channels=channels_in)).contiguous(memory_format=CL)
        with torch.no_grad():
            ref = b(x)
            with NewTensors() as new:
                out = b(x, overwrite=True)
        assert torch.equal(out, ref)
        assert len(new.storages((2, 16, 12, 12), besides=x)) == 2
        if channels_in == 16:
            assert out.data_ptr() == x.data_ptr()
        else:
            assert not new.storages(x.shape, besides=x)


def test_overwrite_is_ignored_where_autograd_records():
    b = block(16, 16, spatial=False)
    x = (3 + images(2, 12, channels=16)).contiguous(memory_format=CL).requires_grad_()
    before = x.detach().clone()
    out = b(x, overwrite=True)
    assert torch.equal(x.detach(), before)
    grads = torch.autograd.grad(out.square().sum(), [x, *b.parameters()])
    ref_grads = torch.autograd.grad(b(x).square().sum(), [x, *b.parameters()])
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_ops_write_into_what_they_are_given(dtype):
    """vf.group_norm / vf.spatial_norm with ``into`` (x itself, or a spare tensor like x): the
    same values; on the eager path a channels_last fp32 result lies in the given memory (no new
    full-size tensor), and a spare leaves x alone."""
    g = torch.Generator().manual_seed(0)
    x = (300 + 0.1 * torch.randn(2, 32, 16, 16, generator=g)).to(dtype).contiguous(memory_format=CL)
    w, bias = 1 + 0.2 * torch.randn(32, generator=g), 0.1 * torch.randn(32, generator=g)
    scale, shift = torch.randn(2, 32, 4, 4, generator=g), torch.randn(2, 32, 4, 4, generator=g)
    calls = {
        "group_norm": lambda t, into: vf.group_norm(t, 8, w.to(dtype), bias.to(dtype), 1e-6, "silu", into=into),
        "spatial_norm": lambda t, into: vf.spatial_norm(t, scale, shift, 8, w.to(dtype), bias.to(dtype), 1e-6, "silu", into=into),
    }
    for name, call in calls.items():
        ref = call(x, None)
        given = x.clone(memory_format=torch.preserve_format)
        out = call(given, given)
        assert torch.equal(out, ref), name
        assert (out.data_ptr() == given.data_ptr()) == (dtype == torch.float32), name
        spare, before = torch.full_like(x, float("nan")), x.clone()
        out = call(x, spare)
        assert torch.equal(out, ref) and torch.equal(x, before), name
        assert (out.data_ptr() == spare.data_ptr()) == (dtype == torch.float32), name


def test_into_must_be_like_x():
    x = images(1, 8, channels=16).contiguous(memory_format=CL)
    for wrong in (torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 9).contiguous(memory_format=CL),
                  x.double()):
        with pytest.raises(ValueError, match="into must be x or a tensor of x's shape, strides, dtype and device"):
            vf.group_norm(x, 8, into=wrong)
        with pytest.raises(ValueError, match="into must be f or a tensor of f's shape"):
            vf.spatial_norm(x, x[:, :, :2, :2], x[:, :, :2, :2], 8, None, None, into=wrong)
    spare = torch.empty_like(x).as_strided(x.shape, (7,) + x.stride()[1:])  # batch 1: dim 0's stride says nothing
    assert torch.equal(vf.group_norm(x, 8, into=spare), vf.group_norm(x, 8))


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_model_never_writes_the_callers_tensors(layout):
    """The towers write over their own activations only: the images and latents a caller passes
    (already channels_last, so that the tower's layout change returns the caller's own tensor)
    come back unchanged, and every output is what a fresh model gives."""
    _, ours = make_pair("movq")
    x = images(2, 16).contiguous(memory_format=layout)
    with torch.no_grad():
        latents = ours.encode(x).latents.contiguous(memory_format=layout)
        inputs = (x.clone(), latents.clone())
        out = ours(x).sample
        decoded = ours.decode(latents).sample
        fresh = copy.deepcopy(ours)
        assert torch.equal(fresh(x).sample, out) and torch.equal(fresh.decode(latents).sample, decoded)
    assert torch.equal(x, inputs[0]) and torch.equal(latents, inputs[1])


def test_what_hooks_keep_is_never_written_over():
    """A forward hook may keep any module's output (feature extraction): with hooks on every
    module, what each keeps after a whole forward pass equals what diffusers' model keeps (the
    convolutions' hooks run too). A hook anywhere in a tower turns its writes over off."""
    theirs, ours = make_pair("movq")
    x = images(2, 16)
    kept = {}
    for tag, model in (("theirs", theirs), ("ours", ours)):
        kept[tag] = {}
        for name, module in model.named_modules():
            if name.startswith(("encoder.", "decoder.")) and name.count(".") > 1:
                module.register_forward_hook(lambda m, args, out, name=name, d=kept[tag]: d.__setitem__(name, out))
        with torch.no_grad():
            model(x)
    common = kept["theirs"].keys() & kept["ours"].keys()
    assert "encoder.down_blocks.0.resnets.0.conv1" in common and "decoder.up_blocks.3.resnets.0" in common
    worst = max(rel_err(kept["ours"][n], kept["theirs"][n]) for n in common)
    assert worst < 1e-4, worst


def test_hooked_sees_every_kind_of_hook():
    """The test nn.Module.__call__ makes before running hooks: the module's own forward and
    backward hooks and the global ones."""
    from vqfast.models.layers import hooked

    m = torch.nn.Conv2d(2, 2, 1)
    assert not hooked(m)
    for register in (m.register_forward_hook, m.register_forward_pre_hook, m.register_full_backward_hook,
                     torch.nn.modules.module.register_module_forward_hook,
                     torch.nn.modules.module.register_module_forward_pre_hook):
        handle = register(lambda *args: None)
        assert hooked(m), register
        handle.remove()
        assert not hooked(m), register


@pytest.mark.parametrize("size", [(3, 3), (4, 4), (7, 10), (12, 9), (16, 16), (33, 6)])
def test_downsample_without_the_padded_copy(size):
    """_downsample_unpadded gives conv(pad(x)): the zero row and column reach only the last
    output row and column, for even sizes; odd ones need no edge (fp32, both layouts of weight)."""
    d = randomize(Downsample2D(16)).eval()
    x = (3 + torch.randn(2, 16, *size, generator=torch.Generator().manual_seed(1))).contiguous(memory_format=CL)
    with torch.no_grad():
        ref = d.conv(torch.nn.functional.pad(x, (0, 1, 0, 1)))
        out = _downsample_unpadded(d.conv, x)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=CL)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d(x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_downsample_reads_no_memory_it_did_not_write(dtype):
    """After NaN-filled tensors are freed (so a read of memory nobody wrote finds NaN), the
    downsample is still right: in bf16 oneDNN's stride-2 convolution with a one-column output
    reads such memory, so only fp32 takes the unpadded path."""
    d = randomize(Downsample2D(64)).to(dtype).eval()
    x = (3 + torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(1))).to(dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        ref = d.conv(torch.nn.functional.pad(x, (0, 1, 0, 1)))
        for _ in range(5):
            junk = [torch.full((n,), float("nan"), dtype=dtype) for n in (4096, 65536, 100_000, 200_000)]
            del junk
            out = d(x)
            assert not out.isnan().any()
            torch.testing.assert_close(out, ref, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-5)


def test_downsample_with_hooks_sees_the_padded_input():
    d = randomize(Downsample2D(8)).eval()
    seen = []
    d.conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        d(images(1, 8, channels=8).contiguous(memory_format=CL))
    assert seen == [torch.Size([1, 8, 9, 9])]


@pytest.mark.skipif(not _X86_ONEDNN, reason="oneDNN's in-place convolution-plus-sum is used on x86-64 CPUs with AVX2 or more only")
@pytest.mark.parametrize("spatial", [False, True], ids=["group_norm", "spatial_norm"])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_blocks_later_resnets_write_into_the_earlier_ones_dead_tensors(spatial, batch):
    """A three-resnet block given its input (fp32 channels_last, no gradient): the same output as
    a plain call, and two full-size tensors made in all, by the first resnet (norm1's and
    conv1's outputs): the later ones' norm1 and conv1 write into them once dead (Workspace). (At
    batch 1 the ops' tensors disagree on the size-1 batch dimension's stride, which says
    nothing.) Under autograd the block keeps no workspace and its gradients are those of a plain
    call."""
    blk = randomize(_Block(32, 32, 3, 8, "silu", attention=False, zq_channels=4 if spatial else None,
                           resample=None)).eval()
    x = (3 + images(batch, 12, channels=32)).contiguous(memory_format=CL)
    zq = images(batch, 3, seed=2, channels=4) if spatial else None
    with torch.no_grad():
        ref = blk(x, zq)
        given = x.clone(memory_format=torch.preserve_format)
        with NewTensors() as new:
            out = blk(given, zq, overwrite=True)
    assert torch.equal(out, ref)
    assert len(new.storages(x.shape, besides=given)) == 2
    leaf = x.clone().requires_grad_()
    out = blk(leaf.clone(memory_format=torch.preserve_format), zq, overwrite=True)
    grads = torch.autograd.grad(out.square().sum(), [leaf, *blk.parameters()])
    ref_grads = torch.autograd.grad(blk(leaf, zq).square().sum(), [leaf, *blk.parameters()])
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
