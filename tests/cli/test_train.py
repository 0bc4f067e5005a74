"""``vqfast train``: a few steps write a loadable model and its record, reproducibly from the seed,
and the reconstruction loss trains the encoder through the quantizer's straight-through backward."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import vqfast
from vqfast.cli import train
from vqfast.cli.main import main

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Folders of two 3-step runs with seed 0 ("a", "b") and of a 0-step run ("init")."""
    root = tmp_path_factory.mktemp("train")
    for name, steps in (("a", 3), ("b", 3), ("init", 0)):
        assert main(["train", "--steps", str(steps), "--batch", "2", "--out", str(root / name)]) == 0
    return root


def test_writes_a_loadable_model_and_its_record(runs):
    model = vqfast.VQModel.from_pretrained(runs / "a")
    assert model.config.num_vq_embeddings == train.CONFIG["num_vq_embeddings"]
    record = json.loads((runs / "a" / "training.json").read_text())
    assert (record["seed"], record["steps"], record["stopped_by"]) == (0, 3, "steps")
    assert record["data"]["heldout_crops"] == 36
    assert 0 < record["heldout"]["psnr_db"] < 60
    assert 0 < record["heldout"]["codebook_usage"] <= 1
    assert record["machine"]["torch"] == torch.__version__
    assert record["history"][-1]["step"] == 3


def test_same_seed_same_weights(runs):
    a = vqfast.VQModel.from_pretrained(runs / "a").state_dict()
    b = vqfast.VQModel.from_pretrained(runs / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_moves_encoder_and_codebook(runs):
    init = vqfast.VQModel.from_pretrained(runs / "init").state_dict()
    done = vqfast.VQModel.from_pretrained(runs / "a").state_dict()
    for key in ("encoder.conv_in.weight", "quantize.embedding.weight", "decoder.conv_out.weight"):
        assert not torch.equal(init[key], done[key]), key


def test_reconstruction_gradient_flows_through_the_quantizer():
    torch.manual_seed(0)
    model = vqfast.VQModel(**train.CONFIG)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = model.encode(x).latents
    z_q, commit, _ = model.quantize(z)
    recon = model.decode(z_q, force_not_quantize=True).sample
    (recon - x).square().mean().backward(retain_graph=True)  # no commitment term: straight-through only
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    g = model.quantize.embedding.weight.grad
    assert g is None or not g.any()
    commit.backward()  # the commitment loss is what moves the codebook
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_heldout_strip_is_never_trained_on():
    photos = [torch.zeros(3, 427, 640)]
    for p in photos:
        p[:, :, train.HOLDOUT[0] : train.HOLDOUT[1]] = 1  # mark the held-out strip
    crops = train.random_crops(photos, 200, torch.Generator().manual_seed(0))
    assert crops.shape == (200, 3, 64, 64) and crops.max() == 0
    assert train.heldout_crops(photos).min() == 1


def test_missing_scikit_learn_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    assert main(["train", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "pip install 'vqfast[train]'" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--steps", "-1"], ["--batch", "0"], ["--seconds", "0"]])
def test_bad_arguments_are_named(args, tmp_path, capsys):
    assert main(["train", *args, "--out", str(tmp_path)]) == 2
    assert args[0] in capsys.readouterr().err
