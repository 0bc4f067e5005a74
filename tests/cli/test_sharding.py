"""vqfast encode / decode under torchrun: two CPU processes (gloo) give what one process gives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from test_tokens import decode, encode, make_images, make_model, one_thread  # noqa: F401 (autouse fixture)

from vqfast.cli import sharding, tokenfile


def torchrun(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "vqfast", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_shards_cover_every_item_once():
    items = list(range(11))
    shards = [sharding.shard(items, SimpleNamespace(rank=r, world=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == items and shards[0] == [0, 3, 6, 9]


def test_ranks_take_whole_batches_of_the_global_order():
    """Whatever the number of ranks, every batch holds the same images as one process's: so the
    convolutions round alike and the outputs are the same bytes, by construction."""
    items = [f"img{i:02d}" for i in range(11)]
    batches = sharding.batches(items, 3)
    assert batches == [items[0:3], items[3:6], items[6:9], items[9:11]]
    for world in (1, 2, 3, 5):
        taken = [sharding.shard(batches, SimpleNamespace(rank=r, world=world)) for r in range(world)]
        assert sorted(sum(taken, [])) == batches  # every batch once, none split or merged
        assert taken[world - 1] == batches[world - 1 :: world]


def run_ranks(stores, body) -> list:
    """body(ranks) on one thread per rank (rank r talks to stores[r]); the results in rank order."""
    results, errors = [None] * len(stores), []

    def one(r):
        try:
            results[r] = body(sharding.Ranks(r, len(stores), torch.device("cpu"), stores[r]))
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def test_ranks_exchange_values_through_the_store_and_leave_nothing_in_it():
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=30))

    def body(ranks):
        gathered = sharding.gather(ranks, {"rank": ranks.rank, "items": list(range(ranks.rank + 1))})
        smallest = sharding.all_min(ranks, 10 - ranks.rank)
        sharding.barrier(ranks)
        return gathered, smallest

    results = run_ranks([store] * 3, body)
    expected = [{"rank": r, "items": list(range(r + 1))} for r in range(3)]
    assert results == [(expected, 8)] * 3
    assert store.num_keys() == 0  # every exchange deleted by the last rank to read it


def test_rank_0_hosting_the_store_leaves_after_the_others():
    """Under a launcher without torchrun's agent, rank 0 hosts the store: it must not end (and take
    the store with it) while another rank still has a request to make."""
    host = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=30),
                         wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", host.port, 2, is_master=False, timeout=timedelta(seconds=30))
    rank_1_may_leave, rank_0_left = threading.Event(), threading.Event()

    def body(ranks):
        sharding.barrier(ranks)
        if ranks.rank == 1:
            rank_1_may_leave.wait(30)
        sharding.stop(ranks)
        if ranks.rank == 0:
            rank_0_left.set()
        return ranks.rank

    t = threading.Thread(target=lambda: results.extend(run_ranks([host, client], body)))
    results: list = []
    t.start()
    assert not rank_0_left.wait(0.5)  # held by rank 1, whatever the machine's speed
    rank_1_may_leave.set()
    t.join(60)
    assert results == [0, 1] and rank_0_left.is_set()


def test_a_failed_rank_stops_the_others_at_their_next_exchange():
    """Outside torchrun nothing ends the other ranks when one fails: they must not wait for it
    (for up to 24 hours), but stop at their next exchange naming the failed rank and its error.
    The first failure is the one reported."""
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=30))  # what a plain wait would take before giving up

    def body(ranks):
        if ranks.rank == 1:
            sharding.fail(ranks, ValueError("--model /nowhere: no such folder"))
            sharding.fail(ranks, RuntimeError("a later error"))
            return "failed"
        try:
            sharding.gather(ranks, 0)
        except sharding.OtherRankFailed as e:
            return str(e)

    failed, reported = run_ranks([store] * 2, body)[::-1]
    assert failed == "failed"
    assert reported.startswith("rank 1 failed: --model /nowhere: no such folder; this rank stopped too"), reported


def test_a_rank_failing_without_torchrun_ends_the_run(tmp_path):
    """Two processes launched without torchrun (rank 0 hosts the store): rank 1 is given a model
    folder that does not exist and fails at once; rank 0, waiting for it at its first exchange,
    ends with exit status 1 and rank 1's error instead of waiting."""
    folder = tmp_path / "images"
    make_images(folder, 2)
    model = make_model(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, model_dir in ((0, model), (1, tmp_path / "nowhere")):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        command = [sys.executable, "-m", "vqfast", "encode", str(folder), "--model", str(model_dir),
                   "-o", str(tmp_path / "t.safetensors")]
        procs.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    assert procs[1].returncode == 2, outs[1]
    assert procs[0].returncode == 1, outs[0]
    assert "[rank 0] error: rank 1 failed: --model" in outs[0][1] and "nowhere" in outs[0][1], outs[0][1]
    assert "waitForInput" not in outs[0][1]  # no store warnings while it waited
    assert not (tmp_path / "t.safetensors").exists()


def test_two_torchrun_processes_match_one_process(tmp_path):
    folder = tmp_path / "images"
    names = make_images(folder, 7)  # odd: the ranks get 4 and 3
    (folder / "broken.png").write_bytes(b"garbage")
    model = make_model(tmp_path / "model")
    one, two = tmp_path / "one", tmp_path / "two"
    assert encode(folder, "--model", model, "-o", one / "t.safetensors", "--batch-size", 2) == 0
    assert decode(one / "t.safetensors", "--model", model, "-o", one / "png", "--batch-size", 2) == 0

    run = torchrun("encode", folder, "--model", model, "-o", two / "t.safetensors", "--batch-size", 2, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("batch size 2:") == 1  # printed by rank 0 only
    assert run.stderr.count("skipped 'broken.png'") == 1  # by the rank that read it
    assert (two / "t.safetensors").read_bytes() == (one / "t.safetensors").read_bytes()
    manifest = {k: json.loads((d / "t.safetensors.manifest.json").read_text()) for k, d in (("one", one), ("two", two))}
    assert manifest["two"]["world_size"] == 2
    assert manifest["two"]["rows"] == manifest["one"]["rows"] == {n: i for i, n in enumerate(names)}
    assert manifest["two"]["skipped"] == manifest["one"]["skipped"] and list(manifest["two"]["skipped"]) == ["broken.png"]
    assert not tokenfile.parts_folder(two / "t.safetensors").exists()

    run = torchrun("decode", two / "t.safetensors", "--model", model, "-o", two / "png", "--batch-size", 2, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    pngs = {d: sorted(p.relative_to(d / "png").as_posix() for p in (d / "png").rglob("*.png")) for d in (one, two)}
    assert pngs[two] == pngs[one] == names  # nothing missing, nothing twice
    for name in names:
        assert (two / "png" / name).read_bytes() == (one / "png" / name).read_bytes(), name
    decoded = json.loads((two / "png" / "manifest.json").read_text())
    assert (decoded["world_size"], decoded["written"], decoded["images"]) == (2, 7, 7)
