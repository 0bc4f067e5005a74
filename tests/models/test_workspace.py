"""Workspace: a tower's dead activations lent to its later ops, and huge pages for the new ones.

What must hold: a lent tensor has the shape, strides, dtype and device asked for; a storage is
lent to one taker at a time and taken back only from whoever it was lent to; the workspace never
holds more than the tower's own tensors would (smaller dead storages are freed before a new
one is made); and the towers, using it, make their top-resolution activations once and hand
back outputs with storages of their own."""

import os
import sys

import pytest
import torch
from conftest import images, make_pair
from test_overwrite import NewTensors

from vqfast.models.layers import _X86_ONEDNN
from vqfast.models.workspace import OWN_MAPPING_BYTES, Workspace, advise_huge_pages

CL = torch.channels_last


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("memory_format", [CL, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_a_dead_storage_takes_a_smaller_tensor_laid_out_as_asked(memory_format):
    ws = Workspace()
    big = ws.take((2, 8, 6, 5), torch.empty(0), CL)
    assert big.shape == (2, 8, 6, 5) and big.is_contiguous(memory_format=CL) and big.dtype == torch.float32
    ws.give(big)
    small = ws.take((1, 4, 6, 5), torch.empty(0), memory_format)
    assert ptr(small) == ptr(big) and small.is_contiguous(memory_format=memory_format)
    small.copy_(torch.arange(120.0).view(1, 4, 6, 5))  # writes through to the storage, densely
    assert torch.equal(small, torch.arange(120.0).view(1, 4, 6, 5))
    again = ws.take((1, 4, 6, 5), torch.empty(0), memory_format)
    assert ptr(again) != ptr(big)  # lent once at a time


def test_take_like_lays_out_as_x_or_gives_nothing():
    ws = Workspace()
    for x in (torch.empty(2, 4, 3, 5), torch.empty(2, 4, 3, 5).contiguous(memory_format=CL), torch.empty(1, 4, 1, 1)):
        t = ws.take_like(x)
        assert t.shape == x.shape and t.stride() == x.stride()
    assert ws.take_like(torch.empty(2, 4, 3, 10)[..., ::2]) is None  # dense in neither layout


def test_the_smallest_dead_storage_that_fits_is_lent():
    ws = Workspace()
    sizes = [(1, 4, 8, 8), (1, 2, 8, 8), (1, 8, 8, 8)]
    lent = [ws.take(s, torch.empty(0), CL) for s in sizes]
    for t in lent:
        ws.give(t)
    assert ptr(ws.take((1, 3, 8, 8), torch.empty(0), CL)) == ptr(lent[0])
    assert ptr(ws.take((1, 1, 8, 8), torch.empty(0), CL)) == ptr(lent[1])


def test_a_miss_frees_the_smaller_dead_storages_first():
    """Nothing holds a 64-element tensor: the two dead 16-element storages are freed, then a new
    one made, so the workspace never holds what its tower would not."""
    ws = Workspace()
    lent = [ws.take((1, 16), torch.empty(0), torch.contiguous_format) for _ in range(2)]
    small = [t.untyped_storage()._weak_ref() for t in lent]
    ws.give(lent.pop())
    ws.give(lent.pop())
    big = ws.take((1, 64), torch.empty(0), torch.contiguous_format)
    assert big.numel() == 64
    assert all(torch.UntypedStorage._expired(ref) for ref in small)


def test_only_lent_storages_are_taken_back():
    """A tensor the workspace did not lend (the caller's own, or a new one an op made because it
    could not write into what it was lent) is never kept: the workspace holds no more than it lent."""
    ws = Workspace()
    foreign = torch.empty(1, 4, 8, 8)
    ws.give(foreign)
    assert ptr(ws.take((1, 4, 8, 8), foreign, CL)) != ptr(foreign)
    lent = ws.take((1, 4, 8, 8), foreign, CL)
    ws.give(lent)
    ws.give(lent)  # twice: kept once
    assert ptr(ws.take((1, 4, 8, 8), foreign, CL)) == ptr(lent)
    assert ptr(ws.take((1, 4, 8, 8), foreign, CL)) != ptr(lent)


def test_a_workspace_only_where_the_tower_owns_its_activations_on_the_cpu():
    x = torch.empty(1, 4, 8, 8)
    with torch.no_grad():
        assert Workspace.for_owner(True, x) is not None
        assert Workspace.for_owner(False, x) is None
        assert Workspace.for_owner(True, x.to("meta")) is None
    with torch.enable_grad():  # (what autograd saves must not be written over)
        assert Workspace.for_owner(True, x) is None


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.exists("/sys/kernel/mm/transparent_hugepage")),
                    reason="huge-page advice needs Linux with transparent huge pages")
def test_new_tensors_of_32_mib_or_more_are_advised_onto_huge_pages():
    """The kernel marks the advised range (VmFlags ``hg`` in /proc/self/smaps), whatever pages
    it then finds; smaller tensors (glibc's heap, shared with others) are left alone."""
    big = torch.empty(OWN_MAPPING_BYTES // 4, dtype=torch.float32)
    assert advise_huge_pages(big)
    assert "hg" in _vm_flags(big.data_ptr() + OWN_MAPPING_BYTES // 2)
    assert torch.equal(big.zero_(), torch.zeros_like(big))
    assert not advise_huge_pages(torch.empty(OWN_MAPPING_BYTES // 8, dtype=torch.float32))


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not _X86_ONEDNN, reason="oneDNN's in-place convolution-plus-sum is used on x86-64 CPUs with AVX2 or more only")
def test_the_encoder_makes_its_top_resolution_activations_once(monkeypatch):
    """fp32 channels_last, no gradient: the encoder makes three tensors of its top resolution
    (conv_in's output, the first norm1's and conv1's) and none of the lower ones' sizes, which
    take dead top-resolution storages; the output is the encoder's without a workspace (to
    rounding: PyTorch runs its smallest convolutions outside oneDNN, summing in another order),
    and has a storage of its own, not a lent one."""
    _, ours = make_pair("movq")
    x = images(1, 64).contiguous(memory_format=CL)
    top = 32 * 64 * 64 * 4  # block_out_channels[0] at 64x64, fp32
    with torch.no_grad():
        ours.encoder(x)  # builds the channels_last weights (vqfast.ops.derived) once
        with NewTensors() as new:
            out = ours.encoder(x)
        sizes = sorted({t.untyped_storage().nbytes() for t in new.kept if t.device.type == "cpu"
                        and t.untyped_storage().nbytes() >= top // 4 and ptr(t) != ptr(x)}, reverse=True)
        made = {ptr(t) for t in new.kept if t.untyped_storage().nbytes() >= top // 4 and ptr(t) != ptr(x)}
        monkeypatch.setattr(Workspace, "for_owner", staticmethod(lambda own, x: None))
        without = ours.encoder(x)
    assert sizes == [top] and len(made) == 3, (sizes, len(made))
    torch.testing.assert_close(out, without, rtol=1e-5, atol=1e-5)
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()
