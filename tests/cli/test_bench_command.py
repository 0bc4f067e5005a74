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
