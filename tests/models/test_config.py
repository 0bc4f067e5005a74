"""Constructor, defaults and config: the same surface as diffusers.VQModel."""

import inspect
import json
import warnings

import diffusers
import pytest
import torch

import vqfast


def test_constructor_matches_diffusers_names_and_defaults():
    ours = inspect.signature(vqfast.VQModel.__init__).parameters
    theirs = inspect.signature(diffusers.VQModel.__init__).parameters
    assert list(ours) == list(theirs)
    for name in theirs:
        assert ours[name].default == theirs[name].default, name


def test_config_reads_every_argument():
    args = dict(
        in_channels=4, out_channels=2, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
        layers_per_block=2, act_fn="gelu", latent_channels=4, sample_size=64, num_vq_embeddings=17,
        norm_num_groups=8, vq_embed_dim=4, scaling_factor=0.5, norm_type="spatial",
        mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True,
    )
    model = vqfast.VQModel(**args)
    for name, value in args.items():
        assert getattr(model.config, name) == value
        assert model.config[name] == value
    assert set(model.config) == set(args)
    assert vqfast.VQModel().config.vq_embed_dim is None


def test_config_is_read_only():
    model = vqfast.VQModel()
    with pytest.raises(TypeError, match="read-only"):
        model.config["in_channels"] = 4
    with pytest.raises(TypeError, match="read-only"):
        model.config.in_channels = 4


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(down_block_types=("DownBlock2D",)), ["'DownBlock2D'", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        (dict(up_block_types=("UpBlock2D",)), ["'UpBlock2D'", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        (dict(norm_type="layer"), ["'layer'", "group", "spatial"]),
        (dict(act_fn="tanh"), ["'tanh'", "silu", "gelu"]),
    ],
)
def test_unknown_choice_raises_value_error_naming_value_and_allowed(kwargs, named):
    with pytest.raises(ValueError) as err:
        vqfast.VQModel(**kwargs)
    for text in named:
        assert text in str(err.value)


def test_block_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="up_block_types must have one entry per block_out_channels"):
        vqfast.VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2)


def test_activation_names_are_case_insensitive_like_diffusers():
    model = vqfast.VQModel(act_fn="SiLU")
    assert isinstance(model.encoder.down_blocks[0].resnets[0].nonlinearity, torch.nn.SiLU)


def test_from_config_accepts_diffusers_bookkeeping_and_warns_on_unknown_keys():
    config = dict(vqfast.VQModel().config, _class_name="VQModel", _diffusers_version="0.30.0", _name_or_path="x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vqfast.VQModel.from_config(config).config.num_vq_embeddings == 256
    with pytest.warns(UserWarning, match="new_option"):
        vqfast.VQModel.from_config(dict(config, new_option=1))


def test_dtype_and_device_properties():
    model = vqfast.VQModel().to(torch.float64)
    assert model.dtype == torch.float64
    assert model.device == torch.device("cpu")


def test_model_copies_and_pickles():
    import copy
    import pickle

    from conftest import CONFIGS

    model = vqfast.VQModel(**CONFIGS["ldm_f4"])
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.copy(model)):
        assert clone.config == model.config and type(clone.config) is type(model.config)
        for (k, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
            assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "change, key, expected",
    [
        (dict(num_vq_embeddings=0), "num_vq_embeddings", "a positive integer"),
        (dict(latent_channels="4"), "latent_channels", "a positive integer"),
        (dict(layers_per_block=1.5), "layers_per_block", "a positive integer"),
        (dict(block_out_channels=[]), "block_out_channels", "a non-empty list of positive integers"),
        (dict(block_out_channels=[32, 0], down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2), "block_out_channels", "a non-empty list of positive"),
        (dict(block_out_channels=[48]), "block_out_channels", "divisible by norm_num_groups=32"),
        (dict(norm_type="spatial", block_out_channels=[16], norm_num_groups=8), "block_out_channels",
         "divisible by 32 with norm_type='spatial'"),
        (dict(down_block_types=["CrossAttnDownBlock2D"]), "down_block_types", "unknown: ['CrossAttnDownBlock2D']"),
        (dict(up_block_types=["UpDecoderBlock2D"] * 2), "up_block_types", "one entry per block_out_channels (1"),
        (dict(act_fn=3), "act_fn", "one of"),
        (dict(force_upcast=1), "force_upcast", "true or false"),
        (dict(vq_embed_dim=0), "vq_embed_dim", "a positive integer or null"),
        (dict(scaling_factor=float("nan")), "scaling_factor", "a finite number"),
        (dict(sample_size="32"), "sample_size", "a positive integer (or a list of two)"),
    ],
)
def test_bad_config_values_are_refused_by_key_value_and_file(tmp_path, change, key, expected):
    with pytest.raises(ValueError, match=rf"'{key}' is .*; expected .*") as err:
        vqfast.VQModel.from_config(dict(vqfast.VQModel().config, **change))
    assert expected in str(err.value)
    folder = tmp_path / "model"
    vqfast.VQModel().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError) as err:
        vqfast.VQModel.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value) and f"'{key}'" in str(err.value) and expected in str(err.value)


def test_real_checkpoint_configs_validate():
    from importlib import resources

    for file in (resources.files("vqfast") / "configs").iterdir():
        if file.name.endswith(".json"):
            with torch.device("meta"):
                vqfast.VQModel.from_config(json.loads(file.read_text()))
