"""Derived weights (the folded upsample kernel, the centred codebook) are built once and
rebuilt whenever the weights change."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vqfast
from vqfast.models import layers
from vqfast.ops import derived, reference


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of the functions that build derived tensors."""
    calls = {"fold": 0, "centre": 0}

    def wrap(module, name, key):
        real = getattr(module, name)

        def counting(*args):
            calls[key] += 1
            return real(*args)

        monkeypatch.setattr(module, name, counting)

    wrap(layers, "upsample_conv_weights", "fold")
    wrap(reference, "centred_codebook", "centre")
    derived.clear()
    yield calls
    derived.clear()


def _upsample_reference(up: layers.Upsample2D, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(x.double(), scale_factor=2.0), up.conv.weight.double(), up.conv.bias.double(), padding=1)


def test_fold_is_built_once_and_follows_every_weight_change(counted):
    up = layers.Upsample2D(8).eval()
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        for _ in range(3):
            up(x)
        assert counted["fold"] == 1
        up.conv.weight.mul_(2)  # in place: bumps the version counter
        torch.testing.assert_close(up(x).double(), _upsample_reference(up, x), rtol=1e-5, atol=1e-5)
        other = layers.Upsample2D(8)
        up.load_state_dict(other.state_dict())
        torch.testing.assert_close(up(x).double(), _upsample_reference(up, x), rtol=1e-5, atol=1e-5)
        up.double()
        torch.testing.assert_close(up(x.double()), _upsample_reference(up, x), rtol=1e-12, atol=1e-12)
    assert counted["fold"] == 4


def test_fold_is_rebuilt_per_call_while_training(counted):
    up = layers.Upsample2D(4)
    x = torch.randn(1, 4, 3, 3)
    for _ in range(2):
        up(x).square().sum().backward()
    assert counted["fold"] == 2  # autograd needs the fold in its graph
    expected = torch.autograd.grad(_upsample_reference(up, x).square().sum(), up.conv.weight)[0]
    up.conv.weight.grad = None
    up(x).square().sum().backward()
    torch.testing.assert_close(up.conv.weight.grad.double(), expected.double(), rtol=1e-4, atol=1e-4)


def test_centred_codebook_is_built_once_per_codebook(counted, backend):
    q = vqfast.VectorQuantizer(64, 4, beta=0.25)
    z = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        first = q(z)[2][2]
        q(z)
        assert counted["centre"] == 1
        q.embedding.weight[first[0]] += 100  # move the chosen code far away
        assert q(z)[2][2][0] != first[0]
    assert counted["centre"] == 2


def test_a_new_codebook_at_a_freed_address_is_not_mistaken_for_the_old(counted):
    z = torch.randn(16, 4)
    memory = np.empty((32, 4), dtype=np.float32)  # every codebook's storage, by construction
    for seed in range(8):
        np.copyto(memory, torch.randn(32, 4, generator=torch.Generator().manual_seed(seed)).numpy())
        book = torch.from_numpy(memory)  # a new tensor and storage at the old one's address
        assert book.data_ptr() == memory.ctypes.data and book._version == 0
        expected = torch.cdist(z.double(), book.double()).argmin(dim=1)
        assert torch.equal(vqfast.functional.nearest_code(z, book), expected)
        del book
    assert counted["centre"] == 8
