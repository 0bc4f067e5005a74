"""diffusers pipelines with vqfast's model in their VQ slot: construct, run, save, reload, run.

Every pipeline is built offline from tiny random components (1 inference step, images of a few
pixels), so each round trip takes about a second on CPU.
"""

import json
import logging

import diffusers
import numpy as np
import pytest
import torch
from conftest import randomize

import vqfast
from vqfast.diffusers import VQModel as PipelineVQModel
from vqfast.diffusers import from_vqfast

# --------------------------------------------------------------------- tiny components

MOVQ = dict(
    block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], in_channels=3, out_channels=3,
    latent_channels=4, vq_embed_dim=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
    num_vq_embeddings=12,
)
LDM_VQ = dict(
    block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=3, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=32,
)
AMUSED_VQ = dict(
    block_out_channels=[8], down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
    latent_channels=8, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=8, sample_size=8,
    mid_block_add_attention=False, lookup_from_codebook=True,
)


def _vq_pair(config):
    """(diffusers' VQModel, vqfast.diffusers.VQModel) with the same random weights."""
    theirs = randomize(diffusers.VQModel(**config)).eval()
    ours = PipelineVQModel(**config).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _kandinsky_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=1, encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None,
    )


def _ddim():
    return diffusers.DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                   set_alpha_to_one=False, steps_offset=1)


def _ldm_unet(in_channels):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        block_out_channels=(32, 32), layers_per_block=1, sample_size=8, in_channels=in_channels, out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )


def _amused_transformer():
    torch.manual_seed(0)
    return diffusers.UVit2DModel(
        hidden_size=8, use_bias=False, hidden_dropout=0.0, cond_embed_dim=8, micro_cond_encode_dim=2,
        micro_cond_embed_dim=10, encoder_hidden_size=8, vocab_size=32, codebook_size=8, in_channels=8,
        block_out_channels=8, num_res_blocks=1, downsample=True, upsample=True, block_num_heads=1,
        num_hidden_layers=1, num_attention_heads=1, attention_dropout=0.0, intermediate_size=8,
        layer_norm_eps=1e-06, ln_elementwise_affine=True,
    )


def _g():
    return torch.Generator().manual_seed(0)


_EMBEDS = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
_IMAGE = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))

#: name -> (pipeline class, its VQ slot, VQ config, other components, call arguments)
PIPELINES = {
    "kandinsky": (
        diffusers.KandinskyV22Pipeline, "movq", MOVQ, lambda: dict(unet=_kandinsky_unet(), scheduler=_ddim()),
        lambda: dict(image_embeds=_EMBEDS[:1], negative_image_embeds=_EMBEDS[1:], height=16, width=16,
                     num_inference_steps=1, generator=_g(), output_type="np"),
    ),
    "kandinsky_img2img": (
        diffusers.KandinskyV22Img2ImgPipeline, "movq", MOVQ, lambda: dict(unet=_kandinsky_unet(), scheduler=_ddim()),
        lambda: dict(image=_IMAGE, image_embeds=_EMBEDS[:1], negative_image_embeds=_EMBEDS[1:], height=16,
                     width=16, num_inference_steps=2, strength=0.5, generator=_g(), output_type="np"),
    ),
    "ldm_super_resolution": (
        diffusers.LDMSuperResolutionPipeline, "vqvae", LDM_VQ, lambda: dict(unet=_ldm_unet(6), scheduler=_ddim()),
        lambda: dict(image=_IMAGE[:, :, :8, :8], num_inference_steps=1, generator=_g(), output_type="np"),
    ),
    "ldm": (
        diffusers.LDMPipeline, "vqvae", LDM_VQ, lambda: dict(unet=_ldm_unet(3), scheduler=_ddim()),
        lambda: dict(batch_size=1, num_inference_steps=1, generator=_g(), output_type="np"),
    ),
    "amused": (
        diffusers.AmusedPipeline, "vqvae", AMUSED_VQ,
        lambda: dict(transformer=_amused_transformer(), scheduler=diffusers.AmusedScheduler(mask_token_id=31),
                     text_encoder=None, tokenizer=None),
        # prompt embeddings given directly: no tokenizer or text encoder (nothing to download)
        lambda: dict(prompt_embeds=_EMBEDS[:1, :8], encoder_hidden_states=_EMBEDS[:1, :8].reshape(1, 1, 8).repeat(1, 3, 1),
                     guidance_scale=1.0, height=4, width=4, num_inference_steps=1, generator=_g(), output_type="np"),
    ),
}


def _build(name, vq):
    cls, slot, _, others, _ = PIPELINES[name]
    pipe = cls(**others(), **{slot: vq})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, name):
    with torch.no_grad():
        return pipe(**PIPELINES[name][4]()).images


# --------------------------------------------------------------------- the round trip


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_construct_run_save_reload_run(tmp_path, name):
    cls, slot, config, _, _ = PIPELINES[name]
    theirs, ours = _vq_pair(config)
    reference = _run(_build(name, theirs), name)
    pipe = _build(name, ours)
    images = _run(pipe, name)
    assert images.shape == reference.shape and np.isfinite(images).all()
    # vqfast's VQ vs diffusers' inside the same pipeline. On CPU vqfast's convolutions run
    # channels_last, which rounds differently (latents within 1e-6 relative); img2img's
    # denoising steps amplify that to 1.1e-4 of the [0, 1] pixel range.
    assert np.abs(images - reference).max() <= 2e-4

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index[slot] == ["vqfast.diffusers", "VQModel"]
    assert (tmp_path / slot / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = cls.from_pretrained(tmp_path, **({"text_encoder": None, "tokenizer": None} if name == "amused" else {}))
    reloaded.set_progress_bar_config(disable=True)
    vq = getattr(reloaded, slot)
    assert type(vq) is PipelineVQModel and not vq.training
    for key, value in ours.state_dict().items():
        assert torch.equal(vq.state_dict()[key], value), key
    # the other components reload as diffusers reloads them (the unet's output moves by ~1e-5)
    assert np.abs(_run(reloaded, name) - images).max() <= 1e-4
    # the saved VQ folder is an ordinary diffusers VQModel folder
    plain = diffusers.VQModel.from_pretrained(tmp_path / slot)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_model_passed_to_from_pretrained_and_assigned(tmp_path):
    theirs, ours = _vq_pair(MOVQ)
    pipe = _build("kandinsky", theirs)
    pipe.save_pretrained(tmp_path)  # a pipeline folder written with diffusers' own VQModel
    movq = PipelineVQModel.from_pretrained(tmp_path, subfolder="movq")
    loaded = diffusers.KandinskyV22Pipeline.from_pretrained(tmp_path, movq=movq)
    assert loaded.movq is movq
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(_run(loaded, "kandinsky") - _run(_build("kandinsky", ours), "kandinsky")).max() <= 1e-4
    # assignment records the class in the pipeline's config, both ways
    loaded.movq = theirs
    assert loaded.config.movq == ("diffusers", "VQModel")
    loaded.movq = movq
    assert loaded.config.movq == ("vqfast.diffusers", "VQModel")
    # a diffusers DiffusionPipeline.from_pretrained with the bridged model in the folder's index
    loaded.save_pretrained(tmp_path / "again")
    generic = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "again")
    assert type(generic) is diffusers.KandinskyV22Pipeline and type(generic.movq) is PipelineVQModel


def test_plain_vqfast_model_is_refused_by_pipelines_and_bridged_by_from_vqfast(tmp_path):
    theirs, _ = _vq_pair(MOVQ)
    _build("kandinsky", theirs).save_pretrained(tmp_path)
    plain = vqfast.VQModel.from_pretrained(tmp_path, subfolder="movq")
    plain.enable_gradient_checkpointing()
    plain.enable_slicing(max_memory="1GiB")
    with pytest.raises(ValueError, match="ModelMixin"):  # diffusers' own check: why vqfast.diffusers exists
        diffusers.KandinskyV22Pipeline.from_pretrained(tmp_path, movq=plain)
    bridged = from_vqfast(plain)
    assert isinstance(bridged, diffusers.ModelMixin) and isinstance(bridged, vqfast.VQModel)
    assert all(a is b for a, b in zip(bridged.parameters(), plain.parameters()))  # shared, not copied
    assert dict(bridged.config) == dict(plain.config) and from_vqfast(bridged) is bridged
    assert bridged.is_gradient_checkpointing and bridged.use_slicing and bridged.slicing_max_memory == 2**30
    with pytest.raises(TypeError, match="from_vqfast expects a vqfast.VQModel, got diffusers"):
        from_vqfast(theirs)


def test_bridged_model_keeps_diffusers_model_api():
    _, ours = _vq_pair(MOVQ)
    assert ours.num_parameters() == sum(p.numel() for p in ours.parameters())
    assert ours.config is ours._internal_dict and ours.dtype == torch.float32
    assert ours.to(torch.float64).dtype == torch.float64  # ModelMixin.to, with its checks
    with torch.no_grad():
        assert ours(torch.randn(1, 3, 16, 16, dtype=torch.float64)).sample.dtype == torch.float64
    # fused ops read weights outside diffusers' per-module casting hooks: refused, not wrong
    with pytest.raises(NotImplementedError, match="torch_dtype"):
        ours.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)


# --------------------------------------------------------------------- vqfast.patch on a pipeline


def test_patch_takes_a_pipeline_which_still_saves_and_reloads(tmp_path):
    theirs, _ = _vq_pair(LDM_VQ)
    pipe = _build("ldm", theirs)
    before = _run(pipe, "ldm")
    assert vqfast.patch(pipe) is pipe
    patched = [m for m in theirs.modules() if "forward" in vars(m)]
    assert len(patched) >= 5
    assert np.abs(_run(pipe, "ldm") - before).max() <= 1e-4
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vqvae"] == ["diffusers", "VQModel"]
    reloaded = diffusers.LDMPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert not [m for m in reloaded.vqvae.modules() if "forward" in vars(m)]  # reloads as diffusers' own
    assert np.abs(_run(reloaded, "ldm") - before).max() <= 1e-4
    assert vqfast.unpatch(pipe) is pipe
    assert not [m for m in theirs.modules() if "forward" in vars(m)]


def test_patch_refuses_a_pipeline_without_a_vq_model():
    pipe = diffusers.DDPMPipeline(unet=_ldm_unet(3), scheduler=diffusers.DDPMScheduler())
    with pytest.raises(TypeError, match=r"patch found no VQModel among the components of DDPMPipeline: \['scheduler', 'unet'\]"):
        vqfast.patch(pipe)
    # a pipeline holding vqfast's model has nothing to patch, and that is fine
    _, ours = _vq_pair(LDM_VQ)
    pipe = _build("ldm", ours)
    assert vqfast.patch(pipe) is pipe and not [m for m in ours.modules() if "forward" in vars(m)]


def test_loading_logs_only_diffusers_type_note(tmp_path, caplog):
    """diffusers' from_pretrained notes that the slot's annotation names its own VQModel; that one
    log line is all (the README says so)."""
    _, ours = _vq_pair(LDM_VQ)
    _build("ldm", ours).save_pretrained(tmp_path)
    diffusers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            diffusers.LDMPipeline.from_pretrained(tmp_path)
    finally:
        diffusers.utils.logging.disable_propagation()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(w.startswith("Expected types for vqvae") for w in warnings), warnings
