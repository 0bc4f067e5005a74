"""The dataset commands used as a hostile user would: nothing deleted or written over, nothing mixed,
no input silently left out, no run that fails late or whole for one file, one-line messages.

Each test is one class of case; several of each kind, beyond the ones first reported.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_tokens import (  # noqa: F401 (fixtures: model_dir, one_thread)
    decode, encode, huge_png, make_images, model_dir, one_thread, png_of, save_image,
)

import vqfast
from vqfast.cli import images, tokenfile, tokens
from vqfast.models import atomic


@pytest.fixture
def data(tmp_path) -> tuple[Path, list[str]]:
    folder = tmp_path / "images"
    return folder, make_images(folder, n=4)


def one_line_error(capsys, *fragments: str) -> str:
    """The captured stderr: one line, holding every fragment, no traceback."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -------------------------------------------------------------------- nothing deleted or written over


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, names = data
    monkeypatch.setattr(tokens, "encode_ids", lambda m, x: pytest.fail("computed"))
    before = snapshot(folder)
    for out in (folder / names[0], folder / "sub"):  # an input image; a folder of them
        for extra in ([], ["--overwrite"]):
            assert encode(folder, "--model", model_dir, "-o", out, *extra) == 2
            capsys.readouterr()
    link = tmp_path / "link.safetensors"
    link.symlink_to(folder / names[1])  # an output path that leads to an input
    assert encode(folder, "--model", model_dir, "-o", link, "--overwrite") == 2
    one_line_error(capsys, "would write over the input image", "never writes over its inputs")
    assert snapshot(folder) == before


def test_overwrite_deletes_nothing_before_every_argument_is_checked(tmp_path, data, model_dir, capsys):
    folder, _ = data
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    kept = {p: p.read_bytes() for p in (out, tokens.manifest_of(out))}
    refused = [["--size", "7"], ["--max-memory", "1KiB"], ["--max-memory", "9" * 400], ["--batch-size", "0"],
               ["--workers", "0"], ["--dtype", "float16", "--device", "cpu"], ["--max-pixels", "0"]]
    for args in refused:
        assert encode(folder, "--model", model_dir, "-o", out, "--overwrite", *args) == 2, args
        capsys.readouterr()
        assert {p: p.read_bytes() for p in kept} == kept, args


def test_overwrite_deletes_only_vqfast_files(tmp_path, data, model_dir, capsys):
    folder, _ = data
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert encode(folder, "--model", model_dir, "-o", notes, "--overwrite") == 2
    one_line_error(capsys, "is not a readable safetensors file", "--overwrite replaces only vqfast token files")
    assert notes.read_text() == "my notes"
    out = tmp_path / "t.safetensors"
    theirs = tokenfile.parts_folder(out) / "README.txt"  # someone else's file in the parts folder
    theirs.parent.mkdir()
    theirs.write_text("keep me")
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    assert encode(folder, "--model", model_dir, "-o", out, "--overwrite", "--size", "8") == 0
    assert theirs.read_text() == "keep me" and tokenfile.list_parts(theirs.parent) == []
    manifest = tokens.manifest_of(tmp_path / "m.safetensors")
    manifest.write_text('{"mine": true}')  # where a run would write its manifest: not vqfast's
    assert encode(folder, "--model", model_dir, "-o", tmp_path / "m.safetensors") == 2
    one_line_error(capsys, "is not a vqfast encode manifest")
    assert manifest.read_text() == '{"mine": true}'


def test_decode_never_writes_over_its_token_file_or_the_source_images(tmp_path, data, model_dir, capsys):
    folder, names = data
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    before = snapshot(folder)
    assert decode(out, "--model", model_dir, "-o", folder, "--overwrite") == 2  # back into the photos' folder
    one_line_error(capsys, f"holds {len(names)} of the images this token file was encoded from",
                   "not even with --overwrite")
    assert snapshot(folder) == before
    own = tmp_path / "dec" / "a.png"  # a token file whose only row decodes onto the token file itself
    own.parent.mkdir()
    save_file({"tokens": torch.zeros(1, 8, 8, dtype=torch.int16)}, own, metadata={"names": json.dumps(["a.png"])})
    kept = own.read_bytes()
    assert decode(own, "--model", model_dir, "-o", own.parent, "--overwrite") == 2
    one_line_error(capsys, "would write over the token file")
    assert own.read_bytes() == kept
    theirs = tmp_path / "dec2" / "manifest.json"  # where decode writes its manifest: someone else's file
    theirs.parent.mkdir()
    theirs.write_text("[1, 2, 3]")
    assert decode(out, "--model", model_dir, "-o", theirs.parent, "--overwrite") == 2
    one_line_error(capsys, "is not a vqfast decode manifest")
    assert theirs.read_text() == "[1, 2, 3]"


def test_a_decode_binds_its_pngs_to_the_bytes_it_read(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, names = data
    first, second = tmp_path / "t.safetensors", tmp_path / "u.safetensors"
    assert encode(folder, "--model", model_dir, "-o", first) == 0
    for i, name in enumerate(names):
        save_image(folder / name, seed=50 + i)  # new photos under the same names
    assert encode(folder, "--model", model_dir, "-o", second) == 0
    old_bytes, new_bytes = first.read_bytes(), second.read_bytes()
    real_load = tokens.load_model

    def replace_then_load(*args):  # the token file is replaced (atomically) once decode has read it
        os.replace(second, first)
        return real_load(*args)

    monkeypatch.setattr(tokens, "load_model", replace_then_load)
    png = tmp_path / "png"
    assert decode(first, "--model", model_dir, "-o", png) == 0
    monkeypatch.setattr(tokens, "load_model", real_load)
    stamp = json.loads(images.read_stamp(png / names[0]))
    assert stamp["tokens"] == images.digest(old_bytes)  # the bytes it decoded, not the file there now
    assert first.read_bytes() == new_bytes
    assert decode(first, "--model", model_dir, "-o", png) == 2  # the PNGs are of the old tokens: not "done"
    one_line_error(capsys, f"already holds {len(names)} PNGs that were not decoded from this token file")
    assert decode(first, "--model", model_dir, "-o", png, "--overwrite") == 0
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    second.write_bytes(new_bytes)
    assert decode(second, "--model", model_dir, "-o", fresh) == 0
    assert all(torch.equal(png_of(png / n), png_of(fresh / n)) for n in names)  # the new tokens' pixels


def test_two_outputs_in_one_folder_keep_their_own_manifests(tmp_path, data, model_dir):
    folder, _ = data
    train, val = tmp_path / "ds.train", tmp_path / "ds.val"
    assert encode(folder, "--model", model_dir, "-o", train) == 0
    assert encode(folder / "sub", "--model", model_dir, "-o", val) == 0
    a, b = (json.loads(tokens.manifest_of(p).read_text()) for p in (train, val))
    assert (a["tokens"], a["images"]) == ("ds.train", 4) and (b["tokens"], b["images"]) == ("ds.val", 2)
    assert tokens.manifest_of(train).name == "ds.train.manifest.json"


# -------------------------------------------------------------------- every input a row or a named skip


def test_links_and_special_files_are_rows_or_named_skips(tmp_path, model_dir, capsys):
    folder = tmp_path / "images"
    save_image(folder / "a.png", seed=1)
    save_image(tmp_path / "elsewhere" / "b.png", seed=2)
    (folder / "z.png").symlink_to("a.png")  # an alias: its own row, whatever the directory order
    (folder / "linked").symlink_to(tmp_path / "elsewhere")  # a linked folder: followed
    (folder / "back").symlink_to(folder)  # a loop back up: its images are listed already
    (folder / "dangling.png").symlink_to("missing.png")
    (folder / "loop.png").symlink_to("loop.png")
    os.mkfifo(folder / "fifo.png")  # reading it would block for ever
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    err = capsys.readouterr().err
    manifest = json.loads(tokens.manifest_of(out).read_text())
    assert list(manifest["rows"]) == ["a.png", "linked/b.png", "z.png"]
    assert sorted(manifest["skipped"]) == ["dangling.png", "fifo.png", "loop.png"]
    assert "symbolic link whose target cannot be reached" in manifest["skipped"]["dangling.png"]
    assert "is a FIFO, not a regular file" in manifest["skipped"]["fifo.png"]
    assert all(f"skipped {n!r}" in err for n in manifest["skipped"])
    rows = tokenfile.read_tokens(out)
    assert torch.equal(rows[0], rows[2])  # the alias holds the same image


def test_a_huge_sparse_file_is_skipped_by_name_without_being_read(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, names = data
    huge = folder / "huge.png"
    with open(huge, "wb") as f:
        f.write(huge_png(tmp_path / "small.png", 4, 4).read_bytes())  # a valid header, then 16 GiB of nothing
        f.truncate(16 * 2**30)
    real_open, opened = open, []
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(Path(p).name) or real_open(p, *a, **k))
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    monkeypatch.undo()
    assert "huge.png" not in opened
    skipped = json.loads(tokens.manifest_of(out).read_text())["skipped"]
    assert list(skipped) == ["huge.png"] and "more than an image of --max-pixels" in skipped["huge.png"]
    assert "skipped 'huge.png'" in capsys.readouterr().err


def test_a_scan_reads_headers_without_decoding_or_holding_the_file(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = save_image(tmp_path / "a.png", size=(64, 48))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded by the scan"))
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("whole file read by the scan"))
    header = images.scan(path)
    assert header.size == (64, 48) and header.problem is None
    assert header.digest == images.file_digest(path)


def test_names_decode_could_not_write_are_refused_at_encode(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(tokens, "encode_ids", lambda m, x: pytest.fail("computed"))
    save_image(tmp_path / "x" / "a.png")
    save_image(tmp_path / "y" / "a.png" / "b.png")  # a folder named a.png
    out = tmp_path / "t.safetensors"
    assert encode(tmp_path / "x" / "a.png", tmp_path / "y", "--model", model_dir, "-o", out) == 2
    one_line_error(capsys, "images 'a.png' and 'a.png/b.png' cannot both be decoded")
    path = tmp_path / "t2.safetensors"  # a token file made elsewhere with such names: refused before compute
    save_file({"tokens": torch.zeros(2, 8, 8, dtype=torch.int16)}, path,
              metadata={"names": json.dumps(["a.png", "a.png/b.png"])})
    monkeypatch.setattr(tokens, "decode_ids", lambda m, ids: pytest.fail("computed"))
    assert decode(path, "--model", model_dir, "-o", tmp_path / "dec") == 2
    one_line_error(capsys, "cannot both be decoded")


def test_decode_refuses_outputs_it_could_not_write_before_compute(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, names = data
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    monkeypatch.setattr(tokens, "decode_ids", lambda m, ids: pytest.fail("computed"))
    dec = tmp_path / "dec"
    (dec / names[0]).mkdir(parents=True)  # a folder where a PNG goes
    assert decode(out, "--model", model_dir, "-o", dec, "--overwrite") == 2
    one_line_error(capsys, "taken by something that is not a file", names[0])
    (dec / names[0]).rmdir()
    (dec / "sub").write_text("a file where a folder of PNGs goes")
    assert decode(out, "--model", model_dir, "-o", dec, "--overwrite") == 2
    one_line_error(capsys, "is a file, where PNGs need a folder")


# -------------------------------------------------------------------- messages: true, one line, bounded


def test_an_unwritable_folder_is_not_called_busy(tmp_path, data, model_dir, capsys, monkeypatch):
    from vqfast.cli import sharding

    folder, _ = data

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(sharding, "_acquire", refuse)  # root may write anywhere: simulate the folder
    assert encode(folder, "--model", model_dir, "-o", tmp_path / "t.safetensors") == 2
    err = one_line_error(capsys, f"cannot create files in {tmp_path} (Permission denied)")
    assert "in use" not in err


def test_a_full_disk_names_the_file(tmp_path, data, model_dir, capsys, monkeypatch):
    folder, _ = data
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full)
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 1
    one_line_error(capsys, f"cannot write {tokenfile.parts_folder(out)}", "No space left on device")
    assert not [p for p in tokenfile.parts_folder(out).iterdir()]  # no temporary left behind


@pytest.mark.parametrize("name, value, fragment", [
    ("WORLD_SIZE", "abc", "WORLD_SIZE must be an integer of at least 1, got 'abc'"),
    ("WORLD_SIZE", "", "WORLD_SIZE must be an integer of at least 1, got ''"),
    ("WORLD_SIZE", "0", "WORLD_SIZE must be an integer of at least 1, got '0'"),
    ("LOCAL_RANK", "x", None),  # read only when WORLD_SIZE > 1: ignored here
])
def test_bad_environment_is_named(tmp_path, data, model_dir, capsys, monkeypatch, name, value, fragment):
    folder, _ = data
    monkeypatch.setenv(name, value)
    status = encode(folder, "--model", model_dir, "-o", tmp_path / "t.safetensors")
    if fragment is None:
        assert status == 0
    else:
        assert status == 2
        one_line_error(capsys, fragment)


def test_rank_is_checked_against_the_world(tmp_path, data, capsys, monkeypatch):
    folder, _ = data
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    assert encode(folder, "-o", tmp_path / "t.safetensors") == 2
    one_line_error(capsys, "RANK must be below WORLD_SIZE=2, got 5")


def _model_copy(model_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_hostile_model_folders_end_in_one_short_line(tmp_path, data, model_dir, capsys):
    folder, _ = data
    config = json.loads((model_dir / "config.json").read_text())
    cases = {
        "deep": (lambda d: (d / "config.json").write_text('{"zz": ' + "[" * 5_000_000 + "]" * 5_000_000 + "}"),
                 "nested too deeply"),
        "long": (lambda d: (d / "config.json").write_text(json.dumps({**config, "block_out_channels": [8] * 10**6})),
                 "block_out_channels"),
        "pickle": (lambda d: ((d / "diffusion_pytorch_model.safetensors").unlink(),
                              torch.save({"x": object()}, d / "diffusion_pytorch_model.bin")), "could not read"),
        "int": (lambda d: save_file({k: (v.to(torch.int32) if k == "encoder.conv_in.weight" else v) for k, v in
                                     vqfast.VQModel.from_pretrained(model_dir).state_dict().items()},
                                    d / "diffusion_pytorch_model.safetensors"), "must be a floating tensor"),
    }
    for name, (damage, fragment) in cases.items():
        broken = _model_copy(model_dir, tmp_path / name)
        damage(broken)
        assert encode(folder, "--model", broken, "-o", tmp_path / "t.safetensors") == 2, name
        err = one_line_error(capsys, fragment, str(broken))
        assert len(err) < 1000, (name, len(err))


def test_the_library_names_the_config_file_too(tmp_path, model_dir):
    broken = _model_copy(model_dir, tmp_path / "deep")
    (broken / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(OSError, match="config.json: its JSON is nested too deeply"):
        vqfast.VQModel.from_pretrained(broken)
    (broken / "config.json").write_text(json.dumps({"block_out_channels": ["x"] * 10**6}))
    with pytest.raises(ValueError) as caught:
        vqfast.VQModel.from_pretrained(broken)
    assert "config.json" in str(caught.value) and len(str(caught.value)) < 300


def test_odd_file_names_print_on_one_line(tmp_path, data, model_dir, capsys):
    folder, _ = data
    (folder / "bad\nname.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    raw = os.fsencode(str(folder)) + b"/\xff\xfe.png"  # bytes that are not UTF-8
    with open(raw, "wb") as f:
        f.write(b"also truncated")
    out = tmp_path / "t.safetensors"
    assert encode(folder, "--model", model_dir, "-o", out) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("vqfast encode: skipped ") for line in lines), err
    assert "bad\\nname.png" in err and "\\udcff\\udcfe.png" in err
    skipped = json.loads(tokens.manifest_of(out).read_text())["skipped"]
    assert sorted(skipped) == sorted(["bad\nname.png", os.fsdecode(b"\xff\xfe.png")])


def test_a_message_is_clipped_to_its_head_and_tail():
    from vqfast.cli.main import message

    text = message(ValueError("start " + "x" * 10**6 + " what to do"))
    assert len(text) < 700 and text.startswith("start ") and text.endswith(" what to do")
    assert "characters left out" in text and "\n" not in message(ValueError("a\nb"))
    assert sys.getsizeof(text) < 2000


def test_the_tokens_and_their_digest_come_from_one_file(tmp_path, data, model_dir, monkeypatch):
    """The file is replaced between the hash and the tensors' load: both are still the old file's."""
    import safetensors.torch

    folder, names = data
    first, second = tmp_path / "t.safetensors", tmp_path / "u.safetensors"
    assert encode(folder, "--model", model_dir, "-o", first) == 0
    for i, name in enumerate(names):
        save_image(folder / name, seed=70 + i)
    assert encode(folder, "--model", model_dir, "-o", second) == 0
    old_bytes, old_tokens = first.read_bytes(), tokenfile.read_tokens(first)
    assert not torch.equal(old_tokens, tokenfile.read_tokens(second))
    real_load = safetensors.torch.load_file

    def replace_then_load(path, *args, **kwargs):
        os.replace(second, first)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", replace_then_load)
    read = tokenfile.open_for_decode(first)
    assert read.digest == images.digest(old_bytes) and torch.equal(read.tokens, old_tokens)
