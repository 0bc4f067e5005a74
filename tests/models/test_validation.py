"""Bad input is refused before any compute, naming the argument, the value and what was expected."""

import pytest
import torch
from conftest import make_pair

import vqfast


@pytest.fixture(scope="module")
def movq():
    return make_pair("movq")[1]


@pytest.fixture(scope="module")
def amused():
    return make_pair("amused")[1]


@pytest.mark.parametrize(
    "x, error, message",
    [
        (torch.randn(3, 32, 32), ValueError, r"x must be 4-D \(B, 3, H, W\), got shape \(3, 32, 32\)"),
        (torch.randn(1, 4, 32, 32), ValueError, r"x must have 3 channels \(dim 1\), got shape \(1, 4, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "x must be a floating tensor .* got torch.uint8"),
        (torch.randn(1, 3, 0, 32), ValueError, "H and W of at least 1"),
        ([[1.0]], TypeError, "x must be a torch.Tensor, got list"),
    ],
)
def test_encode_refuses(movq, x, error, message):
    with pytest.raises(error, match=message):
        movq.encode(x)
    with pytest.raises(error, match=message.replace("x must", "sample must")):
        movq(x)  # forward names its own argument


@pytest.mark.parametrize("force", [False, True])
def test_decode_latents_refused(movq, force):
    with pytest.raises(ValueError, match=r"h must have 4 channels \(dim 1\), got shape \(1, 3, 4, 4\)"):
        movq.decode(torch.randn(1, 3, 4, 4), force_not_quantize=force)
    with pytest.raises(ValueError, match="h must be 4-D"):
        movq.decode(torch.randn(4, 4, 4), force_not_quantize=force)
    with pytest.raises(TypeError, match="h must be a floating tensor"):
        movq.decode(torch.zeros(1, 4, 4, 4, dtype=torch.long), force_not_quantize=force)


def test_token_ids_refused(amused):
    K, D = amused.config.num_vq_embeddings, amused.config.latent_channels
    ids = torch.zeros(2, 3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"needs shape=\(B, H, W, {D}\), got shape=None"):
        amused.decode(ids, force_not_quantize=True)
    with pytest.raises(ValueError, match=r"B\*H\*W equal to the 30 token ids .* got shape=\(2, 3, 4, 64\)"):
        amused.decode(ids, force_not_quantize=True, shape=(2, 3, 4, D))
    with pytest.raises(ValueError, match=rf"shape must be \(B, H, W, {D}\)"):
        amused.decode(ids, force_not_quantize=True, shape=(2, 3, 5, 3))
    bad = ids.clone()
    bad[1, 2, 4] = K
    with pytest.raises(ValueError, match=rf"token ids in h must lie in \[0, {K}\), got values from 0 to {K}"):
        amused.decode(bad, force_not_quantize=True, shape=(2, 3, 5, D))
    bad[1, 2, 4] = -1
    with pytest.raises(ValueError, match=r"got values from -1 to 0"):
        amused.decode(bad, force_not_quantize=True, shape=(2, 3, 5, D))
    with pytest.raises(TypeError, match="integer token ids"):
        amused.decode(ids.float(), force_not_quantize=True, shape=(2, 3, 5, D))


def test_bad_input_is_refused_before_any_compute(movq, monkeypatch):
    calls = []
    monkeypatch.setattr(movq.encoder, "forward", lambda *a: calls.append(a))
    monkeypatch.setattr(movq.decoder, "forward", lambda *a: calls.append(a))
    with pytest.raises(ValueError):
        movq.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError):
        movq.decode(torch.randn(1, 5, 8, 8))
    assert calls == []


def test_quantizer_refuses_wrong_channels():
    q = vqfast.VectorQuantizer(16, 4, beta=0.25)
    with pytest.raises(ValueError, match=r"z must be \(B, 4, H, W\) for this codebook, got shape \(1, 3, 2, 2\)"):
        q(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="remap must be None"):
        vqfast.VectorQuantizer(16, 4, beta=0.25, remap="used.npy")


def test_spatial_model_needs_matching_latent_and_embed_dims():
    with pytest.raises(ValueError, match="vq_embed_dim must equal latent_channels \\(4\\), got 3"):
        vqfast.VQModel(norm_type="spatial", latent_channels=4, vq_embed_dim=3)
