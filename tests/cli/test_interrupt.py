"""kill -9 (and Ctrl-C) at random moments, then resume: the outputs are byte for byte those of an
uninterrupted run, for encode and decode, in one process and in two (torchrun, gloo), and for
webdataset shards in and token shards out (shards).

The moments come from a seeded generator: some a random time after the launch (the process may
die while importing torch, scanning, or computing), the others once a random number of batches
(encode) or PNGs (decode) is on disk, plus a few random milliseconds (it dies mid-batch, while
writing, or while merging). The outcome checked does not depend on where it lands. Bounded: nine
interrupted runs of 12 small images (as files, or as five webdataset shards).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_tokens import TINY, decode, encode, one_thread, save_image  # noqa: F401 (autouse fixture)

import vqfast

SEED = 13
#: (command, processes) -> how each interruption is timed: "start" (a random time from launch) or
#: "work" (once a random number of further batches or PNGs is on disk), and the signal.
PLANS = {
    ("encode", 1): [("work", signal.SIGINT), ("start", signal.SIGKILL)],
    ("encode", 2): [("work", signal.SIGKILL)],
    ("decode", 1): [("work", signal.SIGKILL), ("work", signal.SIGTERM), ("start", signal.SIGKILL)],
    ("decode", 2): [("work", signal.SIGKILL)],
    ("shards", 1): [("work", signal.SIGKILL)],
    ("shards", 2): [("work", signal.SIGKILL)],
}


def command(kind: str, processes: int, *args) -> list[str]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return [*launcher, "-m", "vqfast", "encode" if kind == "shards" else kind, *map(str, args)]


def finished(kind: str, target: Path) -> int:
    """How many batches (encode: parts), images (decode: PNGs) or shards (shards: done marks) are
    on disk so far."""
    if kind == "shards":
        return len([p for p in target.glob("*.json") if p.name != "index.json"]) if target.is_dir() else 0
    if kind == "encode":
        parts = target.with_name(target.name + ".parts")
        return len(list(parts.glob("rank*.safetensors"))) if parts.is_dir() else 0
    return len(list(target.rglob("*.png"))) if target.is_dir() else 0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in sessions of their own, so
    the launcher's process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def interrupt(cmd: list[str], kind: str, target: Path, when: str, sig: int, rng: random.Random) -> tuple[int, str]:
    """Run cmd and send sig to its whole process group at a random moment; (exit status, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    if when == "start":
        delay = rng.uniform(0.0, 3.0)
    else:  # a random point of the progress, then a random few milliseconds into the next step
        goal = finished(kind, target) + rng.randint(1, {"encode": 4, "decode": 8, "shards": 3}[kind])
        while finished(kind, target) < goal and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        delay = rng.uniform(0.0, 0.02)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        for pid in descendants(proc.pid):  # at once, as when a machine loses power
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Inputs, a model, and the outputs of uninterrupted one-process runs at batch size 2."""
    root = tmp_path_factory.mktemp("interrupt")
    folder = root / "images"
    names = sorted(f"img{i:02d}.png" for i in range(12))
    for i, name in enumerate(names):
        save_image(folder / name, size=(64, 64), seed=i)
    # Wider than the other tests' model: tens of milliseconds per batch, so that a signal sent a few
    # milliseconds after a batch lands inside the next one.
    torch.manual_seed(0)
    model = root / "model"
    vqfast.VQModel.from_config({**TINY, "block_out_channels": (32, 64), "norm_num_groups": 8}).save_pretrained(model)
    assert encode(folder, "--model", model, "-o", root / "ref" / "t.safetensors", "--batch-size", 2) == 0
    assert decode(root / "ref" / "t.safetensors", "--model", model, "-o", root / "ref" / "png", "--batch-size", 2) == 0
    # the same images as five webdataset shards of two or three samples (a .jpg and a .txt each)
    webdataset = pytest.importorskip("webdataset", reason="webdataset is a test dependency (pip install -e .[test])")
    (root / "shards").mkdir()
    for shard in range(5):
        with webdataset.TarWriter(str(root / "shards" / f"{shard:05d}.tar")) as sink:
            for name in names[shard * 12 // 5:(shard + 1) * 12 // 5]:
                sink.write({"__key__": name[:-4], "png": (folder / name).read_bytes(), "txt": name.encode()})
    assert encode(*shard_args(root, model, root / "ref" / "shards")) == 0
    return root, folder, model, names


def shard_args(root: Path, model: Path, out: Path) -> tuple:
    return (root / "shards", "--model", model, "-o", out, "--size", 64, "--batch-size", 2, "--workers", 1)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".vqfast-*") if p.is_file())


@pytest.mark.parametrize("kind, processes", sorted(PLANS))
def test_interrupted_at_random_moments_then_resumed_gives_the_same_bytes(reference, kind, processes):
    root, folder, model, names = reference
    rng = random.Random(f"{SEED}-{kind}-{processes}")
    work = root / f"{kind}-{processes}"
    tokens = root / "ref" / "t.safetensors"
    if kind == "shards":
        target = work / "shards"
        args = shard_args(root, model, target)
    elif kind == "encode":
        target = work / "t.safetensors"
        args = (folder, "--model", model, "-o", target, "--batch-size", 2)
    else:
        target = work / "png"
        args = (tokens, "--model", model, "-o", target, "--batch-size", 2)
    for when, sig in PLANS[kind, processes]:
        status, err = interrupt(command(kind, processes, *args), kind, target, when, sig, rng)
        if status in (130, 143):  # Ctrl-C or SIGTERM reached the command: one line, no traceback
            what = "interrupted" if sig == signal.SIGINT else "terminated"
            assert f"{what}; finished work is kept: rerun the same command to resume" in err
            assert "Traceback" not in err
        assert status in (0, 130, 143, -sig, 1), err  # torchrun reports a killed worker as 1

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(command(kind, processes, *args), env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    if kind == "shards":  # every token shard and the index (the per-shard records hold times)
        ref = root / "ref" / "shards"
        assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in ref.iterdir())
        for name in [f"{i:05d}.tar" for i in range(5)] + ["index.json"]:
            assert (target / name).read_bytes() == (ref / name).read_bytes(), name
    elif kind == "encode":
        assert target.read_bytes() == tokens.read_bytes()
        assert not target.with_name(target.name + ".parts").exists()
    else:
        for name in names:
            assert (target / name).read_bytes() == (root / "ref" / "png" / name).read_bytes(), name
        assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*.png")) == names
    assert leftovers(work) == []  # no temporary file and no lock left behind
