"""from_pretrained / save_pretrained take what diffusers' take: dtype, low_cpu_mem_usage,
device_map, output_loading_info, sharded checkpoints (both ways), _keep_in_fp32_modules."""

import json

import diffusers
import pytest
import torch
from conftest import images, make_pair, rel_err

import vqfast
from vqfast.models import checkpoint

SMALL = dict(block_out_channels=(8, 16), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.fixture
def saved(tmp_path):
    model = vqfast.VQModel(**SMALL)
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


# ------------------------------------------------------------------ dtype, memory, device


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_low_cpu_mem_usage_both_ways_load_the_same_weights(saved, low_cpu_mem_usage, monkeypatch):
    model, folder = saved
    inits = []
    real = torch.nn.init.kaiming_uniform_

    def spy(tensor, *args, **kwargs):
        inits.append(tensor.device)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    loaded = vqfast.VQModel.from_pretrained(folder, low_cpu_mem_usage=low_cpu_mem_usage, torch_dtype=torch.bfloat16)
    assert _same_weights(loaded, model.to(torch.bfloat16)) and loaded.dtype == torch.bfloat16
    assert all(p.device.type == "cpu" for p in loaded.parameters()) and not loaded.training
    # True builds on the meta device (no random init of real memory); False initialises for real
    assert {d.type for d in inits} == ({"meta"} if low_cpu_mem_usage else {"cpu"})


def test_dtype_is_an_alias_of_torch_dtype(saved):
    _, folder = saved
    assert vqfast.VQModel.from_pretrained(folder, dtype=torch.float16).dtype == torch.float16
    assert vqfast.VQModel.from_pretrained(folder, dtype=torch.float16, torch_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match=r"torch_dtype=torch.float16 and its alias dtype=torch.bfloat16 disagree"):
        vqfast.VQModel.from_pretrained(folder, torch_dtype=torch.float16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="torch_dtype must be a floating torch.dtype such as torch.float16, got 'half'"):
        vqfast.VQModel.from_pretrained(folder, dtype="half")


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu"), {"": "cpu"}, "auto"])
def test_device_map_on_one_device(saved, device_map):
    model, folder = saved
    loaded = vqfast.VQModel.from_pretrained(folder, device_map=device_map)
    expected = "cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in loaded.parameters()} == {expected}
    assert _same_weights(loaded.cpu(), model)


def test_device_map_that_splits_or_is_malformed_is_refused(saved):
    _, folder = saved
    with pytest.raises(ValueError, match=r"device_map must put the whole model on one device .*\['decoder', 'encoder'\]"):
        vqfast.VQModel.from_pretrained(folder, device_map={"encoder": "cpu", "decoder": "cpu"})
    with pytest.raises(ValueError, match=r"'balanced' and 'sequential' split a model .* got 'balanced'"):
        vqfast.VQModel.from_pretrained(folder, device_map="balanced")
    with pytest.raises(ValueError, match="device_map must be a device, a CUDA index >= 0.*got -1"):
        vqfast.VQModel.from_pretrained(folder, device_map=-1)
    with pytest.raises(ValueError, match=r"device_map='cpu' needs low_cpu_mem_usage=True \(the default\), got False"):
        vqfast.VQModel.from_pretrained(folder, device_map="cpu", low_cpu_mem_usage=False)


def test_output_loading_info_and_pipeline_arguments(saved):
    model, folder = saved
    loaded, info = vqfast.VQModel.from_pretrained(folder, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    # what diffusers' pipelines pass to every model they load, at their defaults
    again = vqfast.VQModel.from_pretrained(
        folder, max_memory=None, offload_folder=None, offload_state_dict=False, use_flashpack=False,
        disable_mmap=True, quantization_config=None, ignore_mismatched_sizes=False, use_safetensors=True,
    )
    assert _same_weights(again, model) and _same_weights(loaded, model)
    with pytest.raises(ValueError, match=r"max_memory=\{0: '1GB'\} is not supported by vqfast .* leave it at None"):
        vqfast.VQModel.from_pretrained(folder, max_memory={0: "1GB"})
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True is not supported"):
        vqfast.VQModel.from_pretrained(folder, ignore_mismatched_sizes=True)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['low_cpu_mem'\]"):
        vqfast.VQModel.from_pretrained(folder, low_cpu_mem=True)


def test_keep_in_fp32_modules_of_a_subclass(saved):
    model, folder = saved

    class KeepsQuantizer(vqfast.VQModel):
        _keep_in_fp32_modules = ["quantize", "post_quant_conv"]

    class KeepsOne(vqfast.VQModel):
        _keep_in_fp32_modules = "quantize"  # one name as a str, as diffusers allows

    for cls, kept in ((KeepsQuantizer, ("quantize", "post_quant_conv")), (KeepsOne, ("quantize",))):
        for low in (True, False):
            loaded = cls.from_pretrained(folder, torch_dtype=torch.float16, low_cpu_mem_usage=low)
            for name, p in loaded.named_parameters():
                assert p.dtype == (torch.float32 if name.split(".")[0] in kept else torch.float16), (cls, low, name)
    assert vqfast.VQModel._keep_in_fp32_modules is None and vqfast.VQModel._no_split_modules is None


# ------------------------------------------------------------------ sharded checkpoints


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_save_loads_in_diffusers_and_vqfast(tmp_path, safe):
    theirs, ours = make_pair("default")
    ours.save_pretrained(tmp_path, max_shard_size="200KB", safe_serialization=safe)
    suffix = ".safetensors" if safe else ".bin"
    index = json.loads((tmp_path / f"diffusion_pytorch_model{suffix}.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob(f"diffusion_pytorch_model-*{suffix}"))
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}{suffix}"
    sizes = {k: v.numel() * v.element_size() for k, v in ours.state_dict().items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for name in shards:  # each shard within the limit unless one tensor alone is larger
        keys = [k for k, f in index["weight_map"].items() if f == name]
        assert sum(sizes[k] for k in keys) <= 200_000 or len(keys) == 1
    assert not (tmp_path / f"diffusion_pytorch_model{suffix}").exists()
    x = images(1)
    with torch.no_grad():
        ref = ours(x).sample
        # diffusers reads a sharded .bin checkpoint only when told use_safetensors=False
        theirs = diffusers.VQModel.from_pretrained(tmp_path, use_safetensors=None if safe else False)
        assert rel_err(theirs.eval()(x).sample, ref) <= 1e-5
        assert torch.equal(vqfast.VQModel.from_pretrained(tmp_path)(x).sample, ref)


def test_diffusers_sharded_folder_loads_in_vqfast(tmp_path):
    theirs, ours = make_pair("movq")
    theirs.save_pretrained(tmp_path, max_shard_size="300KB", variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    loaded = vqfast.VQModel.from_pretrained(tmp_path, variant="fp16")
    assert _same_weights(loaded, ours)
    # and what vqfast writes with a variant is named as diffusers names it
    loaded.save_pretrained(tmp_path / "ours", max_shard_size="300KB", variant="fp16")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert _same_weights(diffusers.VQModel.from_pretrained(tmp_path / "ours", variant="fp16"), ours)
    with pytest.raises(FileNotFoundError, match=r"Error no file named diffusion_pytorch_model.bin found .*weights files present: \[.*fp16"):
        vqfast.VQModel.from_pretrained(tmp_path)


def test_resaving_replaces_the_old_checkpoint(tmp_path):
    model = vqfast.VQModel(**SMALL)
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*"))) > 2
    model.save_pretrained(tmp_path, variant="ema")  # another variant: left alone
    model.save_pretrained(tmp_path)  # unsharded now: the shards and their index go
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "diffusion_pytorch_model.ema.safetensors", "diffusion_pytorch_model.safetensors",
    ]
    model.save_pretrained(tmp_path, max_shard_size=20_000)  # and back: the single file goes
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert _same_weights(vqfast.VQModel.from_pretrained(tmp_path), model)


def test_broken_shard_index_names_the_problem(tmp_path):
    vqfast.VQModel(**SMALL).save_pretrained(tmp_path, max_shard_size=20_000)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    next(tmp_path.glob("diffusion_pytorch_model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"lists files that are not in .*diffusion_pytorch_model-00002-of"):
        vqfast.VQModel.from_pretrained(tmp_path)
    index.write_text('{"metadata": {}}')
    with pytest.raises(OSError, match=r"could not read the shard index .*'weight_map'"):
        vqfast.VQModel.from_pretrained(tmp_path)


def test_save_arguments(tmp_path):
    model = vqfast.VQModel(**SMALL)
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    for bad, error, message in (
        ("10 apples", ValueError, r"max_shard_size must be a number of bytes or a string such as '10GB'.*got '10 apples'"),
        (0, ValueError, "max_shard_size must be at least 1 byte, got 0"),
        (1.5, TypeError, "max_shard_size must be a number of bytes"),
    ):
        with pytest.raises(error, match=message):
            model.save_pretrained(tmp_path / "x", max_shard_size=bad)
    with pytest.raises(ValueError, match="push_to_hub=True is not supported"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['safe'\]"):
        model.save_pretrained(tmp_path / "x", safe=True)
    assert checkpoint.parse_size("s", "10GB") == 10**10 and checkpoint.parse_size("s", "2GiB") == 2 * 2**30
    assert checkpoint.parse_size("s", "1.5MB") == 1_500_000 and checkpoint.parse_size("s", 123) == 123


def test_hub_arguments_reach_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    vqfast.VQModel(**SMALL).save_pretrained(tmp_path / "vq")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, revision=None, cache_dir=None, force_download=False,
                               token=None, local_files_only=False):
        calls.append(dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
                          local_files_only=local_files_only))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    kwargs = dict(revision="v1", cache_dir="c", force_download=True, token="t", local_files_only=True)
    vqfast.VQModel.from_pretrained("owner/repo", subfolder="vq", proxies=None, **kwargs)
    assert calls == [kwargs]  # proxies=None is the default and is not passed on
    with pytest.raises(ValueError, match=r"snapshot_download does not take \['proxies'\] .*HTTPS_PROXY"):
        vqfast.VQModel.from_pretrained("owner/repo", subfolder="vq", proxies={"https": "p"})


def test_legacy_bin_format_loads(saved):
    model, folder = saved
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    # torch.save's pre-1.6 format, which torch.load cannot memory-map
    torch.save(model.state_dict(), folder / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert _same_weights(vqfast.VQModel.from_pretrained(folder), model)
