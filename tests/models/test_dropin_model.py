"""The model's diffusers surface: BaseOutput-like outputs, config attributes and register_to_config,
gradient checkpointing, and encode/decode in slices."""

import copy
import pickle
import warnings

import pytest
import torch
from conftest import CONFIGS, images, randomize

import vqfast

SMALL = dict(block_out_channels=(8, 16), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3)
#: the three architectures at a few channels: every kind of block, small enough for quick tests
TINY = {
    "movq": {**CONFIGS["movq"], "block_out_channels": (32, 32), "norm_num_groups": 8, "layers_per_block": 1,
             "down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
             "up_block_types": ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")},  # SpatialNorm has 32 groups
    "amused": {**CONFIGS["amused"], "block_out_channels": (8, 8, 16, 16, 16), "num_vq_embeddings": 256},
    "ldm_f4": {**CONFIGS["ldm_f4"], "block_out_channels": (8, 16, 16), "norm_num_groups": 8},
}


# ------------------------------------------------------------------ outputs


def test_outputs_are_ordered_dicts_like_base_output():
    model = vqfast.VQModel(**SMALL).eval()
    with torch.no_grad():
        out = model(images(2, 16))
        enc = model.encode(images(2, 16))
        as_tuple = model(images(2, 16), return_dict=False)
    assert isinstance(out, dict) and list(out.keys()) == ["sample", "commit_loss"]
    assert list(out.values()) == [out.sample, out.commit_loss] and dict(out.items())["sample"] is out.sample
    assert out[0] is out["sample"] is out.sample and out[1:] == (out.commit_loss,) and len(out) == 2
    assert all(torch.equal(a, b) for a, b in zip(out.to_tuple(), as_tuple, strict=True))  # return_dict=False's order
    assert list(enc) == ["latents"] and enc.to_tuple() == (enc.latents,)
    partial = vqfast.DecoderOutput(sample=out.sample)  # None fields are neither keys nor tuple items
    assert list(partial) == ["sample"] and partial.to_tuple() == (out.sample,) and partial.commit_loss is None
    partial.commit_loss = out.commit_loss  # setting a field sets the key too
    assert list(partial) == ["sample", "commit_loss"]
    for refused in (lambda: partial.pop("sample"), lambda: partial.update(a=1), lambda: partial.__delitem__("sample")):
        with pytest.raises(TypeError, match="DecoderOutput keeps its fields"):
            refused()
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert type(clone) is vqfast.DecoderOutput and torch.equal(clone.sample, out.sample)
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 2 and torch.utils._pytree.tree_unflatten(leaves, spec).keys() == out.keys()


# ------------------------------------------------------------------ config


def test_config_attributes_and_register_to_config(tmp_path):
    model = vqfast.VQModel(**SMALL)
    model.dummy_attribute = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.dummy_attribute == 5 and callable(model.save_pretrained) and model.encoder is not None
    with pytest.warns(FutureWarning, match=r"Accessing config attribute `latent_channels` directly .* model.config.latent_channels"):
        assert model.latent_channels == 3
    with pytest.raises(AttributeError) as err:
        model.does_not_exist
    assert str(err.value) == "'VQModel' object has no attribute 'does_not_exist'"
    model.register_to_config(test_attribute=5)
    assert model.config.test_attribute == 5
    with pytest.warns(FutureWarning):
        assert getattr(model, "test_attribute") == 5
    model.save_pretrained(tmp_path)
    assert '"test_attribute": 5' in (tmp_path / "config.json").read_text()


def test_from_config_overrides_like_diffusers():
    base = vqfast.VQModel(**SMALL)
    model = vqfast.VQModel.from_config(base.config, num_vq_embeddings=64)
    assert model.config.num_vq_embeddings == 64 and model.config.block_out_channels == base.config.block_out_channels
    with pytest.warns(UserWarning, match=r"ignores config keys it does not know: \['not_an_argument'\]"):
        model, unused = vqfast.VQModel.from_config(base.config, return_unused_kwargs=True, not_an_argument=1)
    assert unused == {"not_an_argument": 1}
    with pytest.raises(TypeError, match="config must be a dict .* got list"):
        vqfast.VQModel.from_config([1, 2])


# ------------------------------------------------------------------ gradient checkpointing


def test_gradient_checkpointing_switches_and_gives_the_plain_gradients():
    plain = randomize(vqfast.VQModel(**TINY["movq"]))
    twin = copy.deepcopy(plain)
    assert vqfast.VQModel._supports_gradient_checkpointing and not plain.is_gradient_checkpointing
    calls = []

    def counting_checkpoint(block, *args):
        calls.append(type(block).__name__)
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    twin.enable_gradient_checkpointing(counting_checkpoint)
    assert twin.is_gradient_checkpointing and twin.encoder.gradient_checkpointing and twin.decoder.gradient_checkpointing
    x = images(1, 16)
    grads = []
    for model in (plain, twin):
        model.train()
        out = model(x)
        (torch.mean((out.sample - x) ** 2) + out.commit_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    n_blocks = len(TINY["movq"]["block_out_channels"])
    assert calls.count("_Block") == 2 * n_blocks and calls.count("MidBlock") == 2  # every block of both towers
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name  # the same ops recomputed: the same gradients
    twin.disable_gradient_checkpointing()
    assert not twin.is_gradient_checkpointing
    calls.clear()
    with torch.no_grad():  # nothing is checkpointed without autograd either
        vqfast.VQModel(**SMALL).eval().decode(torch.randn(1, 3, 4, 4))
    twin(x)
    assert calls == []


# ------------------------------------------------------------------ slicing


@pytest.fixture
def one_thread():
    """One intra-op thread: the result does not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def three_way(sliced: torch.Tensor, whole: torch.Tensor, exact: torch.Tensor) -> None:
    """|sliced - f64| <= 2 |whole - f64| + 1e-5 relative: a slice is as close to the float64 result
    as the whole batch is. (Not bit for bit: the convolutions and the codebook search's products
    of a 2-image slice are other shapes than the whole batch's, and oneDNN and the BLAS may sum a
    row in another order for another shape: they do on some CPUs.)"""
    err, ref_err = (sliced.double() - exact).abs().max(), (whole.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-5 * exact.abs().max(), (err.item(), ref_err.item())


@pytest.mark.parametrize("name", ["movq", "amused", "ldm_f4"])
def test_slicing_gives_the_whole_batchs_values(name, one_thread):
    model = vqfast.VQModel(**TINY[name]).eval()
    exact = copy.deepcopy(model).double()
    x = images(5, 32)
    with torch.no_grad():
        whole_enc = model.encode(x).latents
        whole = model.decode(whole_enc)
        passthrough = not model.config.lookup_from_codebook
        whole_nq = model.decode(whole_enc, force_not_quantize=True) if passthrough else None
        model.enable_slicing()  # two images per slice: 5 images run as slices of 3 and 2
        assert model.use_slicing and model.slicing_max_memory is None
        three_way(model.encode(x).latents, whole_enc, exact.encode(x.double()).latents)
        sliced = model.decode(whole_enc)
        exact_dec = exact.decode(whole_enc.double())
        three_way(sliced.sample, whole.sample, exact_dec.sample)
        three_way(sliced.commit_loss, whole.commit_loss, exact_dec.commit_loss)
        three_way(model(x).sample, whole.sample, exact(x.double()).sample)
        if passthrough:
            three_way(model.decode(whole_enc, force_not_quantize=True).sample, whole_nq.sample,
                      exact.decode(whole_enc.double(), force_not_quantize=True).sample)
        else:  # token ids
            ids = model.quantize(whole_enc)[2][2]
            shape = (5, whole_enc.shape[2], whole_enc.shape[3], whole_enc.shape[1])
            model.disable_slicing()
            ref = model.decode(ids, force_not_quantize=True, shape=shape).sample
            model.enable_slicing()
            three_way(model.decode(ids, force_not_quantize=True, shape=shape).sample, ref,
                      exact.decode(ids, force_not_quantize=True, shape=shape).sample)
        model.disable_slicing()
        assert not model.use_slicing


def test_slice_size_follows_the_memory_budget(monkeypatch, one_thread):
    model = vqfast.VQModel(**SMALL).eval()
    per_image = model.activation_bytes("decode", 16, 16)
    assert per_image == 8 * 16 * 16 * 16 * 4  # eight float32 tensors of the widest full-size activation
    sizes = []
    real = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda h, zq=None: sizes.append(h.shape[0]) or real(h, zq))
    z = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        ref = model.decode(z).sample
        model.enable_slicing(max_memory=3 * per_image)
        out = model.decode(z).sample
        model.enable_slicing(max_memory="1KiB")  # less than one image: two at a time
        model.decode(z)
        model.decode(z[:3])  # never a slice of one image: [2, 1] would be; one slice of 3 instead
        model.enable_slicing(max_memory=4 * per_image)
        model.decode(z[:7])  # balanced: [4, 3]
    assert sizes == [8, 3, 3, 2, 2, 2, 2, 2, 3, 4, 3] and torch.equal(out, ref)
    with pytest.raises(ValueError, match="max_memory must be a number of bytes or a string such as '10GB'.*got 'lots'"):
        model.enable_slicing(max_memory="lots")
    with pytest.raises(ValueError, match="kind must be 'encode' or 'decode', got 'forward'"):
        model.activation_bytes("forward", 16, 16)


def test_slicing_keeps_gradients_and_channels_last():
    model = vqfast.VQModel(**SMALL)
    x = images(3, 16).requires_grad_()
    model(x).sample.sum().backward()
    ref = x.grad.clone()
    x.grad = None
    model.enable_slicing()
    out = model(x).sample
    out.sum().backward()
    assert torch.allclose(x.grad, ref, rtol=1e-5, atol=1e-6)
    cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = cl.decode(torch.randn(3, 3, 8, 8).to(memory_format=torch.channels_last)).sample
    assert y.is_contiguous(memory_format=torch.channels_last) == cl.decode(
        torch.randn(1, 3, 8, 8).to(memory_format=torch.channels_last)).sample.is_contiguous(memory_format=torch.channels_last)
