"""bench/gpu_check.py's plumbing without running its steps: one results file, valid after every
record; steps that stop at their budget say so; pytest's summary read back; and bench/table.py
turns a GPU run's file into table rows (CI runs the whole script on its CPU: make test-gpu-rehearsal)."""

import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_are_one_file_rewritten_whole_after_each_record(tmp_path):
    gc = load("gpu_check")
    res = gc.Results(tmp_path / "gpu-check.json", {"card": None})
    assert json.loads((tmp_path / "gpu-check.json").read_text())["steps"] == {name: [] for name in gc.SHARES}
    res.add("kernels", {"measured_us": 1.5})
    assert json.loads((tmp_path / "gpu-check.json").read_text())["steps"]["kernels"] == [{"measured_us": 1.5}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.json"]  # no temporary file left
    assert abs(sum(gc.SHARES.values()) - 1) < 1e-9 and list(gc.SHARES) == list(gc.STEPS)


def test_a_spent_budget_is_recorded_not_run(tmp_path):
    gc = load("gpu_check")
    from vqfast.cli.bench import Case

    res = gc.Results(tmp_path / "gpu-check.json", {})
    past = time.monotonic() - 1
    gc.correctness(res, past, "cpu", quick=True)
    assert [r["status"] for r in res.data["steps"]["correctness"]] == ["not run: the step's budget was spent"] * len(gc.QUICK_TESTS)
    assert gc._model_case(res, "grid", Case("decode", "movq", 1, 64, "float32", "vqfast", "cpu"), past, 1, 1) is False
    assert res.data["steps"]["grid"][0]["status"] == "not run: the step's budget was spent"


def test_pytest_summary_is_read_back():
    gc = load("gpu_check")
    out = ("...s.F\nSKIPPED [2] tests/ops/test_x.py:10: needs a CUDA GPU: compiled kernels\n"
           "FAILED tests/ops/test_x.py::test_y - AssertionError\n"
           "1 failed, 4 passed, 2 skipped in 3.2s")
    summary = gc.pytest_summary(out)
    assert summary["counts"] == {"failed": 1, "passed": 4, "skipped": 2}
    assert summary["failed"] == ["tests/ops/test_x.py::test_y"]
    assert summary["skipped"] == ["tests/ops/test_x.py:10: needs a CUDA GPU: compiled kernels"]


def test_table_reads_a_gpu_run(tmp_path):
    table = load("table")
    run = {"meta": {"card": "NVIDIA H200", "triton": "3.6.0", "date": "2026-12-24T10:00:00+00:00"},
           "steps": {"target": [
               {"status": "measured", "case": {"kind": "decode", "name": "movq", "batch": 8, "size": 512, "dtype": "float16",
                                               "impl": impl, "device": "cuda", "channels_last": False},
                "ms": ms, "peak_mib": 1000.0} for impl, ms in (("vqfast", 50.0), ("diffusers", 100.0))]}}
    (tmp_path / "bench" / "results" / "gpu").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "gpu" / "gpu-check.json").write_text(json.dumps(run))
    cpu_only = dict(run, meta={**run["meta"], "card": None})
    (tmp_path / "bench" / "results" / "rehearsal").mkdir()
    (tmp_path / "bench" / "results" / "rehearsal" / "gpu-check.json").write_text(json.dumps(cpu_only))
    rows = [line for _, line in table.gpu_rows(tmp_path / "bench" / "results")]
    assert rows == ["| decode movq batch 8 512x512 float16 | NVIDIA H200 (triton 3.6.0) | 50.0 ms | diffusers 100.0 ms | "
                    "2.00x | 1000 MiB / 1000 MiB | 2026-12-24 |"]
