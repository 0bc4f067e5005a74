"""``vqfast demo`` with the embedded model and photo, and the embedded model itself."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

import vqfast
from vqfast.cli.main import main
from vqfast.cli.demo import embedded, load_image

from conftest import rel_err

from PIL import Image  # noqa: E402 (a runtime dependency)
MODEL = embedded("demo-model")


def run_demo(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["demo", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    png = tmp_path_factory.mktemp("demo") / "demo.png"
    code, out, _ = run_demo("--out", str(png))
    assert code == 0
    return out, png


def test_reports_grid_usage_psnr_and_backends(default_run):
    out, _ = default_run
    K = vqfast.VQModel.from_pretrained(MODEL).config.num_vq_embeddings
    assert "tokens: 48x48 grid (2304 tokens)" in out
    used = int(re.search(rf"codebook usage: (\d+)/{K} codes", out).group(1))
    assert 1 < used <= K
    assert float(re.search(r"PSNR: ([\d.]+) dB", out).group(1)) >= 20
    assert "automatic backend is its eager PyTorch path" in out  # on CPU: one number, said so
    assert re.search(r"vqfast \(eager\) [\d.]+ ms", out)


def test_writes_three_panels_side_by_side(default_run):
    _, png = default_run
    with Image.open(png) as im:
        assert im.size == (3 * 192, 192) and im.mode == "RGB"


def test_any_image_is_centre_cropped_to_the_downsampling_factor(tmp_path):
    src = tmp_path / "odd.png"
    Image.new("RGB", (70, 50), (200, 120, 40)).save(src)
    code, out, _ = run_demo("--image", str(src), "--out", str(tmp_path / "o.png"))
    assert code == 0 and "68x48" in out and "tokens: 17x12 grid" in out
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (3 * 68, 48)


@pytest.mark.parametrize("flag", ["--image", "--model"])
def test_missing_path_is_named_without_traceback(flag, tmp_path):
    missing = str(tmp_path / "nope")
    code, out, err = run_demo(flag, missing, "--out", str(tmp_path / "o.png"))
    assert code == 2 and flag in err and missing in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "meta"], "--device must be cpu, cuda or cuda:N, got 'meta'"),
        (["--image", "HUGE"], "50000x50000 pixels, more than the demo reads (67108864 = 8192 x 8192)"),
        (["--model", "NAN"], "weights hold NaN or inf in float32: decoder.conv_out.bias (3 of 3 values)"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(tmp_path, args, message):
    from test_tokens import huge_png

    huge_png(tmp_path / "huge.png", 50000, 50000)
    model = vqfast.VQModel.from_pretrained(MODEL)
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    args = [{"HUGE": str(tmp_path / "huge.png"), "NAN": str(tmp_path / "nan")}.get(a, a) for a in args]
    code, out, err = run_demo(*args, "--out", str(tmp_path / "o.png"))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o.png").exists()


def test_embedded_model_is_small_and_loads_in_diffusers_identically():
    diffusers = pytest.importorskip("diffusers")
    assert sum(f.stat().st_size for f in MODEL.iterdir()) <= 10 * 2**20
    ours = vqfast.VQModel.from_pretrained(MODEL)
    theirs = diffusers.VQModel.from_pretrained(MODEL, low_cpu_mem_usage=False).eval()
    x, _ = load_image(None, 4, 0)
    with torch.no_grad():
        z, z_theirs = ours.encode(x).latents, theirs.encode(x).latents
        z_q, _, (_, _, ids) = ours.quantize(z)
        _, _, (_, _, ids_theirs) = theirs.quantize(z)
        a = ours.decode(z_q, force_not_quantize=True).sample
        b = theirs.decode(z_q, force_not_quantize=True).sample
    assert rel_err(z, z_theirs) <= 1e-5 and rel_err(a, b) <= 1e-5
    # diffusers' cdist may misrank a nearly tied pair of codes; vqfast's ids are the exact nearest
    assert (ids != ids_theirs).float().mean() <= 0.01
    exact = torch.cdist(z.double().permute(0, 2, 3, 1).reshape(-1, 4), ours.quantize.embedding.weight.double())
    assert torch.equal(ids, exact.argmin(1))
