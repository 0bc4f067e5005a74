"""vqfast.patch / unpatch on a live diffusers VQModel."""

import importlib

import pytest
import torch
from conftest import images, make_pair, rel_err

import vqfast

_FORWARDS = importlib.import_module("vqfast.models.patch")._FORWARDS  # the module, not the function


def test_patch_accelerates_in_place_and_unpatch_restores(config_name):
    theirs, _ = make_pair(config_name)
    x = images(1)
    state = {k: v for k, v in theirs.state_dict().items()}
    with torch.no_grad():
        ref = theirs(x)
    assert vqfast.patch(theirs) is theirs
    patched = [m for m in theirs.modules() if "forward" in vars(m)]
    assert len(patched) >= 10
    # every module of a kind vqfast covers is patched (Upsample2D, Attention, ... when present)
    covered = [m for m in theirs.modules() if type(m).__name__ in _FORWARDS]
    assert covered == patched
    with torch.no_grad():
        out = theirs(x)
    assert rel_err(out.sample, ref.sample) <= 1e-5
    assert rel_err(out.commit_loss, ref.commit_loss) <= 1e-5
    after = theirs.state_dict()
    assert list(after) == list(state) and all(after[k] is not None and torch.equal(after[k], state[k]) for k in state)
    vqfast.patch(theirs)  # twice is the same as once
    assert [m for m in theirs.modules() if "forward" in vars(m)] == patched
    vqfast.unpatch(theirs)
    assert not [m for m in theirs.modules() if "forward" in vars(m)]
    with torch.no_grad():
        assert torch.equal(theirs(x).sample, ref.sample)


def test_patched_model_trains_like_diffusers():
    theirs, _ = make_pair("movq")
    twin, _ = make_pair("movq")
    vqfast.patch(twin)
    x = images(1)
    for model in (theirs, twin):
        model.train()
        out = model(x)
        (torch.mean((out.sample - x) ** 2) + out.commit_loss).backward()
    grads = dict(theirs.named_parameters())
    noise = 1e-6 * max(p.grad.abs().max() for p in theirs.parameters())
    for name, p in twin.named_parameters():
        if grads[name].grad.abs().max() > noise:
            assert rel_err(p.grad, grads[name].grad) <= 1e-4, name


def test_patch_takes_a_subclass_of_diffusers_vqmodel():
    import diffusers

    class MyVQModel(diffusers.VQModel):
        pass

    theirs, _ = make_pair("ldm_f4")
    mine = MyVQModel(**dict(theirs.config))
    mine.load_state_dict(theirs.state_dict())
    mine.eval()
    x = images(1)
    with torch.no_grad():
        ref = theirs(x).sample
        assert vqfast.patch(mine) is mine
        assert len([m for m in mine.modules() if "forward" in vars(m)]) >= 10
        assert rel_err(mine(x).sample, ref) <= 1e-5
    assert vqfast.unpatch(mine) is mine and not [m for m in mine.modules() if "forward" in vars(m)]


def test_patch_refuses_other_models():
    with pytest.raises(TypeError, match=r"patch expects a diffusers VQModel \(or a subclass of it\) or a diffusers pipeline holding one, got torch.nn.modules.linear.Linear"):
        vqfast.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="a vqfast.VQModel needs no patching"):
        vqfast.patch(vqfast.VQModel())
    with pytest.raises(TypeError, match="unpatch expects a diffusers VQModel"):
        vqfast.unpatch("movq")
