"""vqfast encode on webdataset shards, made by the webdataset writer and read back by its reader:
keys and passed-through bytes kept, undecodable samples skipped by key, resume per shard,
kill-and-rerun byte-identical, two parts equal one process, an empty shard, a truncated tar."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqfast.cli import shards
from vqfast.cli.main import main
from vqfast.models.atomic import tag
from test_tokens import make_model, one_thread  # noqa: F401 (the fixture)

webdataset = pytest.importorskip("webdataset", reason="webdataset is a test dependency (pip install -e .[test])")


def jpeg(seed: int, size=(20, 24)) -> bytes:
    w, h = size
    pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    out = io.BytesIO()
    Image.frombytes("RGB", (w, h), bytes(pixels.untyped_storage())).save(out, format="JPEG")
    return out.getvalue()


def make_shards(folder: Path) -> dict[str, list[dict]]:
    """img2dataset's layout: 00000.tar (6 samples: one with a broken jpg, one without an image),
    00001.tar (3), 00002.tar (none); 9-digit keys, .jpg + .txt + .json per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[dict]] = {}
    for shard, count in (("00000", 6), ("00001", 3), ("00002", 0)):
        samples = []
        with webdataset.TarWriter(str(folder / f"{shard}.tar")) as sink:
            for i in range(count):
                key = f"{int(shard):05d}{i:04d}"
                sample = {"__key__": key, "txt": f"caption {key}".encode(), "json": json.dumps({"i": i}).encode(),
                          "jpg": jpeg(int(shard) * 10 + i)}
                if shard == "00000" and i == 2:
                    sample["jpg"] = b"not a jpeg"
                if shard == "00000" and i == 4:
                    del sample["jpg"]
                sink.write(sample)
                samples.append(sample)
        written[shard] = samples
    return written


def read_back(path: Path) -> list[dict]:
    """The samples of a shard as the webdataset reader gives them (it refuses an empty shard:
    that one is read as a tar, which must hold no member)."""
    import tarfile

    with tarfile.open(path) as tar:
        if not tar.getmembers():
            return []
    return list(webdataset.WebDataset(str(path), shardshuffle=False))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


def encode(data: Path, out: Path, model_dir: Path, *extra: str) -> int:
    return main(["encode", f"{data}/{{00000..00002}}.tar", "--model", str(model_dir), "--size", "16",
                 "--batch-size", "2", "--workers", "1", "-o", str(out), *extra])


def test_shards_in_token_shards_out(tmp_path, model_dir, capsys):
    written = make_shards(tmp_path / "data")
    assert encode(tmp_path / "data", tmp_path / "out", model_dir) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["00000.json", "00000.tar", "00001.json", "00001.tar",
                                                     "00002.json", "00002.tar", "index.json"]
    first = read_back(out / "00000.tar")
    assert [s["__key__"] for s in first] == ["000000000", "000000001", "000000003", "000000005"]
    for s in first:
        source = next(w for w in written["00000"] if w["__key__"] == s["__key__"])
        assert s["txt"] == source["txt"] and s["json"] == source["json"] and "jpg" not in s  # untouched
        ids = np.load(io.BytesIO(s["tokens.npy"]))
        assert ids.dtype == np.uint16 and ids.shape == (8, 8) and ids.max() < 64
    done = json.loads((out / "00000.json").read_text())
    assert done["samples"] == 6 and done["encoded"] == 4
    assert set(done["skipped"]) == {"000000002", "000000004"} and "no image" in done["skipped"]["000000004"]
    assert len(read_back(out / "00001.tar")) == 3 and read_back(out / "00002.tar") == []
    index = json.loads((out / "index.json").read_text())
    assert [r["encoded"] for r in index["shards"]] == [4, 3, 0] and index["encoded"] == 7
    # the tokens are the model's for the image as the image path reads it
    assert "skipped 00000.tar:'000000002'" in capsys.readouterr().err


def test_resume_per_shard_and_kill_then_rerun_is_byte_identical(tmp_path, model_dir, capsys):
    make_shards(tmp_path / "data")
    out = tmp_path / "out"
    assert encode(tmp_path / "data", out, model_dir) == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    capsys.readouterr()
    assert encode(tmp_path / "data", out, model_dir) == 0
    assert "3 already done" in capsys.readouterr().out
    # a run killed in shard 00001: its JSON never written, a temporary file left behind
    (out / "00001.json").unlink()
    (out / "00001.tar").write_bytes(b"torn")
    stale = out / f".vqfast-{tag('00001.tar')}-x.tmp"
    stale.write_bytes(b"partial")
    assert encode(tmp_path / "data", out, model_dir) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first and not stale.exists()
    # a changed input shard is encoded again; another model's output is not reused
    (tmp_path / "data" / "00002.tar").write_bytes((tmp_path / "data" / "00001.tar").read_bytes())
    capsys.readouterr()
    assert encode(tmp_path / "data", out, model_dir) == 0
    assert "2 already done" in capsys.readouterr().out
    assert len(read_back(out / "00002.tar")) == 3


def test_two_parts_write_what_one_process_writes(tmp_path, model_dir):
    make_shards(tmp_path / "data")
    assert encode(tmp_path / "data", tmp_path / "one", model_dir) == 0
    assert encode(tmp_path / "data", tmp_path / "two", model_dir, "--part", "1/2") == 0
    assert not (tmp_path / "two" / "index.json").exists()  # part 0's shards are not done yet
    assert sorted(p.name for p in (tmp_path / "two").glob("*.tar")) == ["00001.tar"]
    assert encode(tmp_path / "data", tmp_path / "two", model_dir, "--part", "0/2") == 0
    for name in ("00000.tar", "00001.tar", "00002.tar", "index.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_a_truncated_shard_is_refused_by_name_and_the_others_are_done(tmp_path, model_dir, capsys):
    make_shards(tmp_path / "data")
    whole = (tmp_path / "data" / "00001.tar").read_bytes()
    (tmp_path / "data" / "00001.tar").write_bytes(whole[: len(whole) // 2 + 100])
    assert encode(tmp_path / "data", tmp_path / "out", model_dir) == 1
    err = capsys.readouterr().err
    assert "00001.tar" in err and "cannot be read as a tar" in err
    assert (tmp_path / "out" / "00000.json").exists() and not (tmp_path / "out" / "00001.json").exists()
    assert not (tmp_path / "out" / "index.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--part", "2/2"], "--part must be i/n with 0 <= i < n"),
    (["--image-ext", ","], "--image-ext must list file extensions"),
])
def test_bad_shard_arguments_are_refused(tmp_path, model_dir, capsys, args, message):
    make_shards(tmp_path / "data")
    assert encode(tmp_path / "data", tmp_path / "out", model_dir, *args) == 2
    assert message in capsys.readouterr().err


def test_size_is_required_and_braces_expand(tmp_path, model_dir, capsys):
    make_shards(tmp_path / "data")
    assert main(["encode", str(tmp_path / "data"), "--model", str(model_dir), "-o", str(tmp_path / "out")]) == 2
    assert "--size is required" in capsys.readouterr().err
    assert shards.expand_braces("a/{008..010}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar"]
    assert shards.expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]
    assert shards.split_key("dir/000000001.tokens.npy") == ("dir/000000001", "tokens.npy")


def test_token_shards_decode_to_image_shards(tmp_path, model_dir, capsys):
    written = make_shards(tmp_path / "data")
    assert encode(tmp_path / "data", tmp_path / "tokens", model_dir) == 0
    decode = ["decode", str(tmp_path / "tokens"), "--model", str(model_dir), "--batch-size", "2",
              "-o", str(tmp_path / "images")]
    assert main(decode) == 0
    back = read_back(tmp_path / "images" / "00001.tar")
    assert [s["__key__"] for s in back] == [s["__key__"] for s in written["00001"]]
    for s, source in zip(back, written["00001"]):
        assert s["txt"] == source["txt"] and s["json"] == source["json"] and "tokens.npy" not in s
        assert Image.open(io.BytesIO(s["png"])).size == (16, 16)
    assert read_back(tmp_path / "images" / "00002.tar") == []
    first = (tmp_path / "images" / "00000.tar").read_bytes()
    capsys.readouterr()
    assert main(decode) == 0 and "3 already done" in capsys.readouterr().out
    (tmp_path / "images" / "00000.json").unlink()
    assert main(decode) == 0 and (tmp_path / "images" / "00000.tar").read_bytes() == first
