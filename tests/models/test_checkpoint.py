"""diffusers-format folders: loading, saving, round trips both ways, and faults on load."""

import json
import sys

import diffusers
import pytest
import torch
from conftest import images, make_pair, rel_err

import vqfast


def _same_outputs(a, b, x, tol=1e-5):
    with torch.no_grad():
        return rel_err(b(x).sample.float(), a(x).sample.float()) <= tol


@pytest.mark.parametrize("name", ["movq", "amused"])
def test_diffusers_folder_loads_in_vqfast(tmp_path, name):
    theirs, _ = make_pair(name)
    theirs.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert {"_class_name", "_diffusers_version"} <= set(config)
    ours = vqfast.VQModel.from_pretrained(tmp_path / "model")
    assert not ours.training and ours.dtype == torch.float32
    assert ours.config._name_or_path == str(tmp_path / "model")
    assert _same_outputs(theirs, ours, images(1))


@pytest.mark.parametrize("name", ["movq", "ldm_f4"])
def test_vqfast_folder_loads_in_diffusers(tmp_path, name):
    _, ours = make_pair(name)
    ours.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["_class_name"] == "VQModel"
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").is_file()
    theirs = diffusers.VQModel.from_pretrained(tmp_path / "model").eval()
    assert _same_outputs(ours, theirs, images(1))
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value)
    again = vqfast.VQModel.from_pretrained(tmp_path / "model")
    as_json = lambda d: json.loads(json.dumps(dict(d)))  # tuples come back as lists, as in diffusers
    assert as_json(again.config) == as_json({**ours.config, "_name_or_path": str(tmp_path / "model")})


def test_subfolder_and_torch_dtype(tmp_path):
    theirs, _ = make_pair("movq")
    theirs.save_pretrained(tmp_path / "pipe" / "movq")
    ours = vqfast.VQModel.from_pretrained(str(tmp_path / "pipe"), subfolder="movq", torch_dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in ours.parameters()) and not ours.training
    with pytest.raises(TypeError, match="torch_dtype must be a floating torch.dtype"):
        vqfast.VQModel.from_pretrained(tmp_path / "pipe", subfolder="movq", torch_dtype="float16")


def test_bin_fallback_and_variant(tmp_path):
    theirs, _ = make_pair("ldm_f4")
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin" / "diffusion_pytorch_model.safetensors").exists()
    assert _same_outputs(theirs, vqfast.VQModel.from_pretrained(tmp_path / "bin"), images(1))
    theirs.save_pretrained(tmp_path / "var", variant="fp16")
    ours = vqfast.VQModel.from_pretrained(tmp_path / "var", variant="fp16")
    assert _same_outputs(theirs, ours, images(1))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        vqfast.VQModel.from_pretrained(tmp_path / "var")


def test_bin_is_read_with_weights_only(tmp_path, monkeypatch):
    _, ours = make_pair("default")
    ours.save_pretrained(tmp_path, safe_serialization=False)
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    vqfast.VQModel.from_pretrained(tmp_path)
    assert seen.get("weights_only") is True


def test_deprecated_attention_names_are_renamed(tmp_path):
    theirs, _ = make_pair("movq")
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    file = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    old = {}
    for k, v in state.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{legacy}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    save_file(old, file)
    assert _same_outputs(theirs, vqfast.VQModel.from_pretrained(tmp_path), images(1))


# ------------------------------------------------------------------ faults on load


def test_missing_folder_config_and_weights_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        vqfast.VQModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        vqfast.VQModel.from_pretrained(tmp_path / "empty")
    vqfast.VQModel().save_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"Error no file named diffusion_pytorch_model.bin found in directory .*noweights .*looked for diffusion_pytorch_model.safetensors, diffusion_pytorch_model.safetensors.index.json, diffusion_pytorch_model.bin, diffusion_pytorch_model.bin.index.json"):
        vqfast.VQModel.from_pretrained(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="sub"):
        vqfast.VQModel.from_pretrained(tmp_path / "empty", subfolder="sub")


def test_size_mismatch_names_key_and_both_shapes(tmp_path):
    vqfast.VQModel(num_vq_embeddings=300).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_vq_embeddings": 256}))
    with pytest.raises(ValueError, match=r"size mismatch for quantize.embedding.weight: the checkpoint has \(300, 3\), the model expects \(256, 3\)"):
        vqfast.VQModel.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    vqfast.VQModel().save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    file = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, file)
    with pytest.raises(ValueError) as err:
        vqfast.VQModel.from_pretrained(tmp_path)
    assert "missing keys: ['decoder.conv_out.bias']" in str(err.value)
    assert "unexpected keys: ['decoder.extra.weight']" in str(err.value)


def test_truncated_safetensors_names_the_file(tmp_path):
    vqfast.VQModel().save_pretrained(tmp_path)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(OSError, match=str(file)):
        vqfast.VQModel.from_pretrained(tmp_path)


def test_bad_config_json_names_the_file(tmp_path):
    vqfast.VQModel().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="config.json"):
        vqfast.VQModel.from_pretrained(tmp_path)


def test_save_writes_no_temporary_files(tmp_path):
    vqfast.VQModel().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


# ------------------------------------------------------------------ the hub


def test_hub_id_without_huggingface_hub_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'vqfast\[hub\]'"):
        vqfast.VQModel.from_pretrained("kandinsky-community/kandinsky-2-2-decoder", subfolder="movq")


def test_hub_id_is_resolved_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    theirs, _ = make_pair("movq")
    theirs.save_pretrained(tmp_path / "movq")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, **kwargs):
        calls.append((repo_id, allow_patterns, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ours = vqfast.VQModel.from_pretrained("owner/repo", subfolder="movq", revision="abc")
    assert calls == [("owner/repo", ["movq/config.json", "movq/diffusion_pytorch_model*"], {"revision": "abc"})]
    assert _same_outputs(theirs, ours, images(1))


def test_hub_kwargs_for_local_folders_are_accepted_and_unknown_ones_refused(tmp_path):
    vqfast.VQModel().save_pretrained(tmp_path)
    # as in diffusers: a local folder needs no download, so these have nothing to do ...
    vqfast.VQModel.from_pretrained(tmp_path, local_files_only=True, cache_dir=tmp_path / "c", token="t")
    # ... but asking for a revision of a local folder is said to do nothing
    with pytest.warns(UserWarning, match=r"revision='v2' .* local folder"):
        vqfast.VQModel.from_pretrained(tmp_path, revision="v2")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['revison'\]"):
        vqfast.VQModel.from_pretrained(tmp_path, revison="main")


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    vqfast.VQModel(block_out_channels=(32,), norm_num_groups=8).save_pretrained(tmp_path)
    for f in tmp_path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name  # not mkstemp's 0600
