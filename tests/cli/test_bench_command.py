"""``vqfast bench`` prints its table and writes JSON that says where and when it ran."""

import json

from vqfast.cli.main import main


def test_bench_writes_table_and_json(tmp_path, capsys):
    assert main(["bench", "--kinds", "group_norm", "--repeat", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| case | device | vqfast | baseline | speed-up | peak memory (vqfast / baseline) |" in out
    (file,) = tmp_path.glob("vqfast-bench-*-cpu-group_norm.json")
    run = json.loads(file.read_text())
    assert run["device"] == "cpu" and run["device_name"] and run["date"][:4].isdigit()
    assert {"vqfast", "torch", "diffusers"} <= set(run["versions"])
    (result,) = run["results"]
    assert result["case"]["kind"] == "group_norm" and result["vqfast"]["ms"] > 0
    assert result["baselines"]["diffusers"]["ms"] > 0 and result["vqfast"]["peak_mib"] >= 0
    assert f"| {result['label']} |" in out


def test_bench_quantize_sets_the_search_against_faiss_and_cdist(tmp_path, capsys):
    assert main(["bench", "--kinds", "quantize", "--codebooks", "ldm_f4", "--size", "128", "--repeat", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (result,) = json.loads(next(tmp_path.glob("vqfast-bench-*-cpu-quantize.json")).read_text())["results"]
    assert set(result["baselines"]) == {"diffusers", "faiss", "cdist"}
    n = (128 // 8) ** 2
    for name, r in [("vqfast", result["vqfast"]), *result["baselines"].items()]:
        assert r["ms"] > 0 and r["pairs_per_s"] > 0, name
        assert r["rows_checked"] == n and r["offset"] == 20, name  # every method's codes are checked
    assert result["vqfast"]["wrong_codes"] == 0  # exact where float64 has a clear winner
    assert "+20 offset: 0 of 256 codes wrong" in out and " | faiss " in out and " | cdist " in out
