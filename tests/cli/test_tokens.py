"""vqfast encode / decode on a handful of tiny images: round trip, memory budget, resume, bad inputs."""

from __future__ import annotations

import json
import os
import sys
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vqfast
from vqfast.cli import budget, tokenfile, tokens
from vqfast.cli.main import main

TINY = dict(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
    latent_channels=4, num_vq_embeddings=64,
)
# Both token-id decode branches: codebook rows to the decoder, and ids to decode() itself
# (lookup_from_codebook, as aMUSEd).
VARIANTS = {"group": {}, "lookup": dict(lookup_from_codebook=True)}


def make_model(folder: Path, variant: str = "group") -> Path:
    torch.manual_seed(0)
    model = vqfast.VQModel.from_config({**TINY, **VARIANTS[variant]})
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()  # spread like a trained codebook: many distinct ids
    model.save_pretrained(folder)
    return folder


def save_image(path: Path, size: tuple[int, int] = (16, 16), seed: int = 0) -> Path:
    w, h = size
    pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (w, h), bytes(pixels.untyped_storage())).save(path)
    return path


def make_images(folder: Path, n: int = 6) -> list[str]:
    """n 16x16 PNGs, half of them in a subfolder; their names, sorted."""
    names = [f"{'sub/' if i % 2 else ''}img{i}.png" for i in range(n)]
    for i, name in enumerate(names):
        save_image(folder / name, seed=i)
    return sorted(names)


def pixels_of(path: Path) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], as the command reads an image."""
    image = Image.open(path).convert("RGB")
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1


def png_of(path: Path) -> torch.Tensor:
    image = Image.open(path)
    assert image.mode == "RGB"
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (100x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def data(tmp_path) -> tuple[Path, list[str]]:
    folder = tmp_path / "images"
    return folder, make_images(folder)


def encode(*args) -> int:
    return main(["encode", *map(str, args)])


def decode(*args) -> int:
    return main(["decode", *map(str, args)])


# -------------------------------------------------------------------- round trip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_equals_the_model(tmp_path, data, variant, capsys):
    folder, names = data
    model_folder = make_model(tmp_path / "model", variant)
    out = tmp_path / "tokens.safetensors"
    assert encode(folder, "--model", model_folder, "-o", out) == 0
    assert re.search(r"^batch size \d+: --max-memory 2\.0 GiB", capsys.readouterr().out, re.M)

    model = vqfast.VQModel.from_pretrained(model_folder)
    x = torch.stack([pixels_of(folder / n) for n in names])
    with torch.no_grad():
        latents = model.encode(x).latents
        expected = model.quantize(latents)[2][2].view(len(names), 8, 8)
    ids = load_file(out)["tokens"]
    assert ids.dtype == torch.int16 and ids.shape == (6, 8, 8)
    assert torch.equal(ids.long(), expected)
    meta = tokenfile.read_metadata(out)
    assert json.loads(meta["names"]) == names
    assert (meta["num_vq_embeddings"], json.loads(meta["grid"])) == ("64", [8, 8])
    assert meta["vqfast_version"] == vqfast.__version__
    manifest = json.loads(tokens.manifest_of(out).read_text())
    assert manifest["rows"] == {n: i for i, n in enumerate(names)} and manifest["skipped"] == {}
    assert not tokenfile.parts_folder(out).exists()

    assert decode(out, "--model", model_folder, "-o", tmp_path / "decoded") == 0
    with torch.no_grad():
        if variant == "lookup":
            sample = model.decode(expected, force_not_quantize=True, shape=(6, 8, 8, 4)).sample
        else:
            sample = model.decode(latents).sample  # quantizes, then decodes
    want = ((sample / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    for i, name in enumerate(names):
        assert torch.equal(png_of(tmp_path / "decoded" / name), want[i]), name
    manifest = json.loads((tmp_path / "decoded" / "manifest.json").read_text())
    assert manifest["outputs"] == {n: n for n in names} and manifest["written"] == 6


def test_names_and_resize(tmp_path, model_dir):
    """Files and folders mix; --size resizes and centre-crops any size; the same file twice counts once."""
    save_image(tmp_path / "a" / "x.jpg", size=(40, 24))
    save_image(tmp_path / "b.PNG", size=(17, 31))
    out = tmp_path / "t.safetensors"
    assert encode(tmp_path / "a", tmp_path / "b.PNG", tmp_path / "a" / "x.jpg", "--size", 8,
                  "--model", model_dir, "-o", out) == 0
    assert json.loads(tokenfile.read_metadata(out)["names"]) == ["b.PNG", "x.jpg"]
    assert load_file(out)["tokens"].shape == (2, 4, 4)


# -------------------------------------------------------------------- memory budget


def test_budget_bounds_the_batch_size(tmp_path, data, model_dir, monkeypatch, capsys):
    folder, _ = data
    per_image = budget.estimate_per_image(vqfast.VQModel.from_pretrained(model_dir).config, 16, 16, torch.float32, "encode")
    assert per_image == 16 * 16 * 4 * 1024  # the floor: these layers are narrow
    seen = []
    real = tokens.encode_ids
    monkeypatch.setattr(tokens, "encode_ids", lambda m, x: seen.append(x.shape[0]) or real(m, x))
    runs = {}
    cases = [("1MiB", [], 1, 1), ("2.5MiB", [], 2, 2), ("1GiB", [], 256, 6), ("1GiB", ["--batch-size", 4], 4, 4)]
    for i, (limit, more, size, largest) in enumerate(cases):
        out = tmp_path / f"{i}.safetensors"
        seen.clear()
        assert encode(folder, "--model", model_dir, "-o", out, "--max-memory", limit, *more) == 0
        assert f"batch size {size}:" in capsys.readouterr().out
        assert max(seen) == largest and sum(seen) == 6
        runs[i] = tokenfile.read_contents(out).key.batch_size
    assert runs == {0: 1, 1: 2, 2: 256, 3: 4}  # the batch size is part of the key


def test_one_image_over_the_budget_is_refused_before_compute(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, _ = data
    monkeypatch.setattr(tokens, "encode_ids", lambda m, x: pytest.fail("computed"))
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out, "--max-memory", "1000KiB") == 2
    assert "one 16x16 image needs about 1.0 MiB to encode (estimated), more than --max-memory 1000.0 KiB" \
        in capsys.readouterr().err
    monkeypatch.undo()
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    monkeypatch.setattr(tokens, "decode_ids", lambda m, x: pytest.fail("computed"))
    assert decode(out, "--model", model_dir, "-o", tmp_path / "png", "--max-memory", "1MiB") == 2
    assert "one 16x16 image (a token grid of 8x8) needs about 1.5 MiB to decode" in capsys.readouterr().err


def test_batch_size_formula_and_sizes():
    assert budget.batch_size(10, 100) == 1  # never below one image
    assert budget.batch_size(1000, 100) == 10
    assert budget.batch_size(10**9, 100) == budget.DEFAULT_MAX_BATCH
    assert budget.batch_size(10**9, 100, cap=3) == 3
    assert budget.parse_size("2GiB") == 2 * 2**30 and budget.parse_size("512MiB") == 512 * 2**20
    assert budget.parse_size("1.5G") == 3 * 2**29 and budget.parse_size("3kb") == 3000
    assert budget.parse_size("123") == 123
    for bad in ("0", "-1", "lots", "2XB"):
        with pytest.raises(ValueError, match="--max-memory must be a size from 1 byte to 8 EiB"):
            budget.parse_size(bad)


def _peak_bytes(fn) -> int:
    """Most bytes of tensors alive at once while fn runs (CPU allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    alive = peak = 0
    for e in events:
        alive += e.nbytes()
        peak = max(peak, alive)
    return peak


def test_memory_grows_with_the_batch_and_stays_under_the_estimate(model_dir):
    model = vqfast.VQModel.from_pretrained(model_dir)
    size = 32
    per_image = {c: budget.estimate_per_image(model.config, size, size, model.dtype, c) for c in ("encode", "decode")}
    peaks = {}
    # One call first: it builds the derived weights (folded upsample, channels_last copies on
    # CPU), which stay like the weights themselves and are no per-image working memory.
    tokens.decode_ids(model, tokens.encode_ids(model, torch.rand(1, 3, size, size) * 2 - 1))
    # Batches 1 and 8: at this size a batch-independent term (attention's scratch, ~0.75 MB
    # with one or two threads, more with more) is as large as four images' activations.
    for b in (1, 8):
        x = torch.rand(b, 3, size, size) * 2 - 1
        ids = torch.randint(0, 64, (b, size // 2, size // 2))
        peaks[b] = (_peak_bytes(lambda: tokens.encode_ids(model, x)), _peak_bytes(lambda: tokens.decode_ids(model, ids)))
        assert peaks[b][0] <= b * per_image["encode"] and peaks[b][1] <= b * per_image["decode"]
    assert peaks[8][0] > peaks[1][0] and peaks[8][1] > peaks[1][1]


# -------------------------------------------------------------------- resume


def test_interrupted_encode_resumes_to_the_same_file(tmp_path, data, model_dir, monkeypatch):
    folder, names = data
    whole = tmp_path / "whole.safetensors"
    assert encode(folder, "--model", model_dir, "-o", whole, "--batch-size", 2) == 0

    out = tmp_path / "resumed.safetensors"
    real_write, writes = tokenfile.write, []

    def write_then_stop(path, *args):
        if writes:  # the second batch: stop as a Ctrl-C would
            raise KeyboardInterrupt
        writes.append(path)
        real_write(path, *args)

    monkeypatch.setattr(tokenfile, "write", write_then_stop)
    assert encode(folder, "--model", model_dir, "-o", out, "--batch-size", 2) == 130
    parts = tokenfile.list_parts(tokenfile.parts_folder(out))
    assert parts == writes and not out.exists()
    assert [p.name for p in tokenfile.parts_folder(out).iterdir()] == [parts[0].name]  # no torn temporary

    monkeypatch.setattr(tokenfile, "write", real_write)
    seen, real = [], tokens.encode_ids
    monkeypatch.setattr(tokens, "encode_ids", lambda m, x: seen.append(x.shape[0]) or real(m, x))
    assert encode(folder, "--model", model_dir, "-o", out, "--batch-size", 2) == 0
    assert sum(seen) == 4  # the two images of the finished part are not encoded again
    assert out.read_bytes() == whole.read_bytes()
    manifest = json.loads(tokens.manifest_of(out).read_text())
    assert manifest["from_earlier_runs"] == 2 and manifest["rows"] == {n: i for i, n in enumerate(names)}

    seen.clear()  # a finished run: nothing to do, the output stays the same
    assert encode(folder, "--model", model_dir, "-o", out, "--batch-size", 2) == 0
    assert seen == [] and out.read_bytes() == whole.read_bytes()


def test_decode_skips_finished_images(tmp_path, data, model_dir, monkeypatch):
    folder, names = data
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    assert decode(out, "--model", model_dir, "-o", tmp_path / "dec", "--batch-size", 4) == 0
    before = {n: (tmp_path / "dec" / n).read_bytes() for n in names}
    for n in names[:2]:
        (tmp_path / "dec" / n).unlink()  # as if the run had stopped before writing them
    seen, real = [], tokens.decode_ids
    monkeypatch.setattr(tokens, "decode_ids", lambda m, ids: seen.append(ids.shape[0]) or real(m, ids))
    assert decode(out, "--model", model_dir, "-o", tmp_path / "dec", "--batch-size", 4) == 0
    assert seen == [4]  # the whole first batch (rows 0-3): the same batches as an uninterrupted run
    assert {n: (tmp_path / "dec" / n).read_bytes() for n in names} == before
    manifest = json.loads((tmp_path / "dec" / "manifest.json").read_text())
    assert (manifest["written"], manifest["already_present"]) == (2, 4)


# -------------------------------------------------------------------- bad inputs


def test_unreadable_and_odd_sized_images_are_skipped_by_name(tmp_path, data, model_dir, capsys):
    folder, names = data
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.jpg").write_text("hello")
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    err = capsys.readouterr().err
    for name in ("broken.png", "notes.jpg"):
        assert f"skipped {name!r}" in err
    manifest = json.loads(tokens.manifest_of(out).read_text())
    assert sorted(manifest["skipped"]) == ["broken.png", "notes.jpg"]
    assert "not a readable image" in manifest["skipped"]["broken.png"]
    assert json.loads(tokenfile.read_metadata(out)["names"]) == names == list(manifest["rows"])
    assert encode(folder, "--model", model_dir, "-o", tmp_path / "s.safetensors", "--strict") == 1

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    assert encode(only_bad, "--model", model_dir, "-o", tmp_path / "n.safetensors") == 1
    assert "none of the 1 images could be read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "7"], "--size must be a positive multiple of 2 (the model's downsampling factor), got 7"),
        (["--dtype", "float16", "--device", "cpu"], "--dtype float16 needs a CUDA device"),
        (["--max-memory", "lots"], "--max-memory must be a size from 1 byte to 8 EiB"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, data, model_dir, capsys, args, message):
    folder, _ = data
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_inputs_are_refused(tmp_path, model_dir, capsys):
    odd = save_image(tmp_path / "odd" / "odd.png", size=(15, 16))
    assert encode(odd.parent, "--model", model_dir, "-o", tmp_path / "t.safetensors") == 2
    assert "image 'odd.png'" in capsys.readouterr().err
    assert encode(tmp_path / "missing", "--model", model_dir, "-o", tmp_path / "t.safetensors") == 2
    assert "is neither an image file nor a folder" in capsys.readouterr().err
    save_image(tmp_path / "twins" / "a.png")
    save_image(tmp_path / "twins" / "a.jpg")
    assert encode(tmp_path / "twins", "--model", model_dir, "-o", tmp_path / "t.safetensors") == 2
    assert "would both be decoded to 'a.png'" in capsys.readouterr().err
    assert encode(odd, "--model", tmp_path / "nowhere", "-o", tmp_path / "t.safetensors") == 2
    assert "--model" in capsys.readouterr().err


def test_output_of_another_run_is_refused(tmp_path, data, model_dir, capsys):
    folder, _ = data
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    before = out.read_bytes()
    assert encode(folder, "--model", model_dir, "-o", out, "--size", 8) == 2
    err = capsys.readouterr().err
    assert "holds tokens of another run" in err and "resize 'none' (this run: '8')" in err
    (tmp_path / "other.safetensors").write_bytes(b"not a token file")
    assert encode(folder, "--model", model_dir, "-o", tmp_path / "other.safetensors") == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        ({"tokens": torch.full((2, 8, 8), 64, dtype=torch.int16)}, None,
         "holds ids from 64 to 64; this model's ids lie in [0, 64)"),
        ({"tokens": torch.full((2, 8, 8), -1, dtype=torch.int32)}, None, "holds ids from -1 to -1"),
        ({"tokens": torch.full((2, 8, 8), -1, dtype=torch.int64).view(torch.uint64)}, None,
         "torch.uint64 holds ids of 2**63 or more, outside any codebook"),
        ({"tokens": torch.full((2, 8, 8), 64, dtype=torch.uint16)}, None, "holds ids from 64 to 64"),
        ({"tokens": torch.zeros(2, 64, dtype=torch.int16)}, None, "must be 3-D (N, h, w) with h, w >= 1, got shape (2, 64)"),
        ({"ids": torch.zeros(2, 8, 8, dtype=torch.int16)}, None, "has no tensor 'tokens' (it holds ['ids'])"),
        ({"tokens": torch.zeros(2, 8, 8)}, None, "must hold integer token ids, got dtype torch.float32"),
        ({"tokens": torch.zeros(2, 8, 8, dtype=torch.int16)}, {"names": '["a.png"]'}, "must be a list of 2 strings"),
        ({"tokens": torch.zeros(2, 8, 8, dtype=torch.int16)}, {"num_vq_embeddings": "8192"},
         "made by a model with num_vq_embeddings=8192; this model has 64"),
    ],
)
def test_bad_token_files_are_refused(tmp_path, model_dir, capsys, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, metadata=metadata)
    assert decode(path, "--model", model_dir, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "out").exists()  # refused before anything is decoded or written


def test_foreign_token_file_without_names_decodes_by_row(tmp_path, model_dir):
    path = tmp_path / "plain.safetensors"
    save_file({"tokens": torch.randint(0, 64, (3, 4, 5), dtype=torch.int64)}, path)
    assert decode(path, "--model", model_dir, "-o", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert png_of(tmp_path / "out" / "000000.png").shape == (8, 10, 3)


# -------------------------------------------------------------------- outputs reflect the inputs


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header claims width x height (no pixels are stored for the rest)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def test_changed_inputs_are_refused_until_overwrite(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, names = data
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    before = out.read_bytes()
    save_image(folder / "img0.png", seed=99)  # other pixels under the same name
    assert encode(folder, "--model", model_dir, "-o", out) == 2
    err = capsys.readouterr().err
    assert "1 inputs changed since they were encoded" in err and "'img0.png'" in err and "--overwrite" in err
    assert out.read_bytes() == before
    assert encode(folder, "--model", model_dir, "-o", out, "--overwrite") == 0
    fresh = tmp_path / "fresh.safetensors"
    assert encode(folder, "--model", model_dir, "-o", fresh) == 0
    assert out.read_bytes() == fresh.read_bytes() != before


def test_fewer_inputs_are_refused_and_more_are_added(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, names = data
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out, "--batch-size", 1) == 0
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("img2.png", "sub/img5.png"):
        (folder / name).rename(moved / Path(name).name)
    assert encode(folder, "--model", model_dir, "-o", out) == 2
    err = capsys.readouterr().err
    assert "holds 2 images that are not among the inputs: 'img2.png', 'sub/img5.png'; this run would drop them" in err
    assert len(tokenfile.read_contents(out).names) == 6
    assert encode(folder, "--model", model_dir, "-o", out, "--overwrite", "--batch-size", 1) == 0
    assert tokenfile.read_contents(out).names == [n for n in names if n not in ("img2.png", "sub/img5.png")]

    (moved / "img2.png").rename(folder / "img2.png")
    (moved / "img5.png").rename(folder / "sub" / "img5.png")
    seen, real = [], tokens.encode_ids
    monkeypatch.setattr(tokens, "encode_ids", lambda m, x: seen.append(x.shape[0]) or real(m, x))
    assert encode(folder, "--model", model_dir, "-o", out) == 0  # adds the two, keeps the batch size 1
    assert seen == [1, 1] and "4 images are already encoded" in capsys.readouterr().out
    fresh = tmp_path / "fresh.safetensors"
    assert encode(folder, "--model", model_dir, "-o", fresh, "--batch-size", 1) == 0
    assert out.read_bytes() == fresh.read_bytes()  # batch size 1: every row is computed alone


def test_batch_size_is_part_of_the_resume_key(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, _ = data
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out, "--batch-size", 2) == 0
    assert encode(folder, "--model", model_dir, "-o", out, "--batch-size", 3) == 2
    assert "were made with batch size 2, this run's is 3" in capsys.readouterr().err
    monkeypatch.setattr(tokens, "encode_ids", lambda m, x: pytest.fail("recomputed"))
    assert encode(folder, "--model", model_dir, "-o", out) == 0  # no --batch-size: the earlier one is kept
    assert "batch size 2 (the batch size of the earlier run" in capsys.readouterr().out


# -------------------------------------------------------------------- images


def test_high_bit_depth_modes_keep_their_whole_range(tmp_path):
    from vqfast.cli import images

    ramp = torch.arange(0, 65536, 257, dtype=torch.int32).repeat(4, 1)  # 0, 257, ..., 65535: (4, 256)
    expected = (torch.arange(256).float() / 127.5 - 1).expand(3, 4, 256)
    gray16 = Image.frombytes("I;16", (256, 4), ramp.to(torch.int16).numpy().tobytes())
    gray16.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert torch.equal(images.load_image(tmp_path / "g16.png", None), expected)
    for mode, values in (("I", ramp), ("F", ramp.float() / 65535)):  # TIFF content under a .png name
        Image.frombytes(mode, (256, 4), values.numpy().tobytes()).save(tmp_path / f"{mode}.png", format="TIFF")
        assert torch.equal(images.load_image(tmp_path / f"{mode}.png", None), expected), mode
    wide = ramp * 1000 - 5  # 32-bit values beyond 16 bits: the image's own range, nothing clipped
    Image.frombytes("I", (256, 4), wide.numpy().tobytes()).save(tmp_path / "wide.png", format="TIFF")
    assert torch.equal(images.load_image(tmp_path / "wide.png", None), expected)


def test_huge_headers_are_skipped_before_decoding_and_sizes_never_mix(tmp_path, data, model_dir, capsys):
    folder, names = data
    huge_png(folder / "0-huge.png", 12000, 12000)  # first by name
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    err = capsys.readouterr().err
    assert "skipped '0-huge.png': is 12000x12000 = 144000000 pixels, over the limit of 67108864 (--max-pixels)" in err
    assert tokenfile.read_contents(out).names == names
    assert encode(folder, "--model", model_dir, "-o", tmp_path / "s.safetensors", "--max-pixels", 100) == 1
    assert "none of the 7 images could be read" in capsys.readouterr().err
    before = out.read_bytes()  # a lower limit on a rerun keeps the rows made from the same bytes
    assert encode(folder, "--model", model_dir, "-o", out, "--max-pixels", 100) == 0
    assert out.read_bytes() == before

    save_image(folder / "a-small.png", size=(8, 8))
    assert encode(folder, "--model", model_dir, "-o", tmp_path / "m.safetensors") == 2
    err = capsys.readouterr().err
    assert "the images have 2 different sizes (16x16: 6 (" in err and "8x8: 1 ('a-small.png')" in err
    assert "--size N" in err and not (tmp_path / "m.safetensors").exists()


# -------------------------------------------------------------------- decode


def test_decode_checks_the_model_and_the_pngs_it_finds(tmp_path, data, model_dir, capsys):
    folder, names = data
    out, png = tmp_path / "t.safetensors", tmp_path / "png"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    torch.manual_seed(1)
    other = vqfast.VQModel.from_config(TINY)
    other.save_pretrained(tmp_path / "other")  # the same K, other weights
    assert decode(out, "--model", tmp_path / "other", "-o", png) == 2
    assert "was made by another model (weights fingerprint" in capsys.readouterr().err and not png.exists()
    assert decode(out, "--model", tmp_path / "other", "-o", png, "--force") == 0

    assert decode(out, "--model", model_dir, "-o", png) == 2  # the PNGs there are the other model's
    err = capsys.readouterr().err
    assert "already holds 6 PNGs that were not decoded from this token file by this model, dtype and batch" in err
    assert "img0.png: model '" in err  # names what differs
    assert decode(out, "--model", model_dir, "-o", png, "--overwrite") == 0
    reference = tmp_path / "reference"
    assert decode(out, "--model", model_dir, "-o", reference) == 0
    for name in names:
        assert (png / name).read_bytes() == (reference / name).read_bytes(), name
    save_image(png / "img0.png", seed=99)  # a stranger under a finished name
    assert decode(out, "--model", model_dir, "-o", png) == 2
    assert "1 PNGs that were not decoded" in (err := capsys.readouterr().err) and "img0.png: it has no vqfast stamp" in err


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32])
def test_unsigned_token_files_decode(tmp_path, model_dir, dtype):
    path = tmp_path / "u.safetensors"
    ids = torch.randint(0, 64, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    save_file({"tokens": ids.to(dtype)}, path)
    save_file({"tokens": ids}, tmp_path / "i.safetensors")
    assert decode(path, "--model", model_dir, "-o", tmp_path / "u") == 0
    assert decode(tmp_path / "i.safetensors", "--model", model_dir, "-o", tmp_path / "i") == 0
    assert png_of(tmp_path / "u" / "000001.png").equal(png_of(tmp_path / "i" / "000001.png"))


# -------------------------------------------------------------------- models, errors, locks, names


def test_nan_weights_are_refused_by_tensor_name(tmp_path, data, model_dir, capsys):
    folder, _ = data
    model = vqfast.VQModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
        model.encoder.conv_in.bias[1] = float("inf")
    model.save_pretrained(tmp_path / "nan")
    assert encode(folder, "--model", tmp_path / "nan", "-o", tmp_path / "t.safetensors") == 2
    err = capsys.readouterr().err
    assert "weights hold NaN or inf" in err and "decoder.conv_out.weight (1 of" in err and "encoder.conv_in.bias" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "meta"], "--device must be cpu, cuda or cuda:N, got 'meta'"),
        (["--max-pixels", "0"], "--max-pixels must be a positive number of pixels, got 0"),
        (["--model", "nobody-has/this-model-here"], "--model 'nobody-has/this-model-here': "),
    ],
)
def test_mistakes_end_in_one_line_and_exit_2(tmp_path, data, capsys, monkeypatch, args, message):
    folder, _ = data
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # a bare install: no hub client
    assert encode(folder, "-o", tmp_path / "t.safetensors", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path, data, capsys):
    folder, _ = data
    assert main(["--debug", "encode", str(folder), "-o", str(tmp_path / "t.safetensors"), "--device", "meta"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_second_run_on_the_same_output_refuses(tmp_path, data, model_dir, capsys):
    import subprocess

    from vqfast.cli import sharding
    from vqfast.models.atomic import tag

    folder, _ = data
    out = tmp_path / "t.safetensors"
    lock = tmp_path / f".vqfast-{tag(out.name)}.lock"
    fd = sharding._acquire(lock)  # as a running encode holds it
    try:
        assert encode(folder, "--model", model_dir, "-o", out) == 2
        err = capsys.readouterr().err
        assert f"-o {out} is in use by another vqfast run (pid " in err and not out.exists()
    finally:
        lock.unlink()
        os.close(fd)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from vqfast.cli import sharding; sharding._acquire(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.kill()  # kill -9: the kernel releases its lock, the file stays behind
    holder.wait()
    assert lock.exists()
    assert encode(folder, "--model", model_dir, "-o", out) == 0 and not lock.exists()


def test_long_names_round_trip_and_stale_temporaries_go(tmp_path, model_dir):
    from vqfast.models.atomic import tag

    folder = tmp_path / "images"
    long = "x" * 251 + ".png"  # 255 bytes, the most a file name can have
    save_image(folder / long)
    out = tmp_path / "t.safetensors"
    parts = tokenfile.parts_folder(out)
    parts.mkdir()
    stale = [parts / ".vqfast-0badf00d-abc.tmp", tmp_path / f".vqfast-{tag(out.name)}-killed.tmp"]
    kept = tmp_path / f".vqfast-{tag('someone-else')}-abc.tmp"  # another target's: not ours to remove
    for f in stale + [kept]:
        f.write_bytes(b"torn")
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    assert not any(f.exists() for f in stale) and kept.exists()
    png = tmp_path / "png"
    png.mkdir()
    stale_png = png / f".vqfast-{tag(long)}-killed.tmp"
    stale_png.write_bytes(b"torn")
    assert decode(out, "--model", model_dir, "-o", png) == 0
    assert [p.name for p in png.iterdir() if p.suffix == ".png"] == [long] and not stale_png.exists()


def test_names_too_long_to_write_are_refused_before_compute(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, _ = data
    monkeypatch.setattr(tokens, "encode_ids", lambda m, x: pytest.fail("computed"))
    out = tmp_path / ("t" * 240 + ".safetensors")  # fits, but its .parts folder and manifest would not
    assert encode(folder, "--model", model_dir, "-o", out) == 2
    err = capsys.readouterr().err
    assert "-o: the file name 'tttt" in err and "... would be 258 bytes long; file systems allow 255" in err
    path = tmp_path / "plain.safetensors"
    save_file({"tokens": torch.zeros(1, 4, 4, dtype=torch.int16)}, path, metadata={"names": json.dumps(["n" * 255])})
    assert decode(path, "--model", model_dir, "-o", tmp_path / "out") == 2
    assert "the names of its images" in capsys.readouterr().err


def test_a_run_that_fails_exits_1_in_one_line(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, _ = data

    def fail(model, x):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(tokens, "encode_ids", fail)
    assert encode(folder, "--model", model_dir, "-o", tmp_path / "t.safetensors") == 1
    err = capsys.readouterr().err
    assert err == ("vqfast encode: error: RuntimeError: DefaultCPUAllocator: not enough memory "
                   "(--debug shows the traceback)\n")
