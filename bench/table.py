"""Regenerate the benchmark tables in README.md and docs/benchmarks.md from the committed results.

    python bench/table.py          # rewrites the blocks between the markers in both files

docs/benchmarks.md holds the full tables:

- ``<!-- bench:start -->`` ... ``<!-- bench:end -->``: every bench/results/**/vqfast-bench-*.json
  (``vqfast bench``) and the GPU runs' gpu-check.json. Each row: the case, the machine it ran on,
  vqfast's median time (or compiled vqfast's, named) and the baseline's, the speed-up, the peak
  memory each added, and the date.
- ``<!-- side-by-side:start -->`` ... ``<!-- side-by-side:end -->``: bench/side_by_side.py's runs
  (bench/results/side-by-side-*.json), the latest per case, machine and number of busy processes.

README.md holds the headline, ``<!-- headline:start -->`` ... ``<!-- headline:end -->``: one row per
case measured side by side on the machine of the newest result (vqfast against diffusers and
against torch.compile(diffusers), alone, and against diffusers beside one busy process), then one
row per case measured on a GPU (gpu-check.json), when there is one. And the codebook search
against what users would use instead, ``<!-- search:start -->`` ... ``<!-- search:end -->``: per
quantize case and machine, the newest ``vqfast bench`` run that set it against FAISS.

Nothing in the tables is typed by hand.
"""

import json
import re
from pathlib import Path

from vqfast.cli.bench import Case, comparisons, row_cells

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SIDE_START, SIDE_END = "<!-- side-by-side:start -->", "<!-- side-by-side:end -->"
HEAD_START, HEAD_END = "<!-- headline:start -->", "<!-- headline:end -->"
SEARCH_START, SEARCH_END = "<!-- search:start -->", "<!-- search:end -->"
#: Row order: whole-model cases first (what users run), then the ops.
KIND_ORDER = ["decode", "encode", "quantize", "spatial_norm", "group_norm"]


def rows(results: Path = RESULTS) -> list[str]:
    found = []
    for file in sorted(results.rglob("vqfast-bench-*.json")):
        run = json.loads(file.read_text())
        for r in run["results"]:
            case = r["case"]
            for ours_name, ours, name, b in comparisons(r):
                if "error" in b or "error" in ours:
                    continue
                key = (KIND_ORDER.index(case["kind"]), case["name"], case["batch"], case["size"], case["dtype"],
                       ours_name, name)
                cells = [Case(**case).label, run["device_name"], *row_cells(ours_name, ours, name, b), run["date"][:10]]
                found.append((key, "| " + " | ".join(cells) + " |"))
    found += gpu_rows(results)
    return [line for _, line in sorted(found)]


def gpu_runs(results: Path = RESULTS) -> list[tuple[dict, dict[tuple, dict]]]:
    """The GPU runs (bench/results/**/gpu-check.json, bench/gpu_check.py): per run its meta and
    the target and grid steps' measured cases, {case without impl: {impl: record}}. The CPU
    rehearsals' files (no card) are not results."""
    found = []
    for file in sorted(results.rglob("gpu-check.json")):
        run = json.loads(file.read_text())
        meta = run["meta"]
        if not meta.get("card"):
            continue
        by_case: dict[tuple, dict] = {}
        for step in ("target", "grid"):
            for r in run["steps"].get(step, []):
                if r.get("status") == "measured":
                    case = {k: v for k, v in r["case"].items() if k != "impl"}
                    by_case.setdefault(tuple(sorted(case.items())), {})[r["case"]["impl"]] = r
        found.append((meta, by_case))
    return found


def gpu_rows(results: Path = RESULTS) -> list[tuple[tuple, str]]:
    """Rows of the GPU runs: vqfast against each baseline of the same case."""
    found = []
    for meta, by_case in gpu_runs(results):
        for key, impls in by_case.items():
            case = dict(key)
            ours = impls.get("vqfast")
            if ours is None:
                continue
            for name, b in impls.items():
                if name == "vqfast":
                    continue
                order = (KIND_ORDER.index(case["kind"]), case["name"], case["batch"], case["size"], case["dtype"], "vqfast", name)
                cells = [Case(**case, impl="vqfast").label, f"{meta['card']} (triton {meta['triton']})",
                         *row_cells("vqfast", ours, name, b), meta["date"][:10]]
                found.append((order, "| " + " | ".join(cells) + " |"))
    return found


def side_by_side_runs(results: Path = RESULTS) -> list[dict]:
    return [json.loads(file.read_text()) for file in sorted(results.glob("side-by-side-*.json"))]


def latest_side_by_side(results: Path = RESULTS) -> dict[tuple, dict]:
    """The latest run per (case, kind, machine, busy processes)."""
    latest: dict[tuple, dict] = {}
    for run in side_by_side_runs(results):
        key = (run["case"], run["kind"], run["device_name"], run.get("busy_processes") or 0)
        if key not in latest or run["date"] > latest[key]["date"]:
            latest[key] = run
    return latest


def case_label(case: str, kind: str) -> str:
    """'movq batch 1 256x256 float32', 'decode' -> 'movq decode batch 1 256x256 float32'."""
    name, _, rest = case.partition(" ")
    return f"{name} {kind} {rest}"


def side_by_side_rows(results: Path = RESULTS) -> list[str]:
    """bench/side_by_side.py's runs: the latest per (case, machine, busy processes), vqfast's
    speed-ups as the median of per-round ratios with their quartiles."""

    def ratio(run, name):
        if name not in run["ratios"]:
            return ""
        r, (lo, hi) = run["ratios"][name], run["ratio_quartiles"][name]
        return f"{r:.2f}x ({lo:.2f}-{hi:.2f})"

    out = []
    latest = latest_side_by_side(results)
    for (case, kind, machine, busy), run in sorted(latest.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1], kv[0][3])):
        cells = [case_label(case, kind), machine, str(busy), ratio(run, "vqfast vs diffusers"),
                 ratio(run, "vqfast vs diffusers-compile"), ratio(run, "vqfast-compile vs diffusers-compile"),
                 ratio(run, "vqfast-compile vs vqfast"),
                 str(len(run["times_s"]["vqfast"])), run["date"][:10] + (f" ({run['commit']})" if run.get("commit") else "")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def headline_rows(results: Path = RESULTS) -> tuple[str, list[str]]:
    """(machine column's name, rows) of the README's headline: on the machine of the newest
    side-by-side result, per case the latest run alone (busy_processes 0) and beside one busy
    process (1); then per case and card the latest GPU run. Blank cells where a run is missing."""
    latest = latest_side_by_side(results)
    rows_: list[str] = []
    devices = set()
    if latest:
        newest = max(latest.values(), key=lambda run: run["date"])
        machine = newest["device_name"]
        cases: dict[tuple, dict[int, dict]] = {}
        for (case, kind, device_name, busy), run in latest.items():
            if device_name == machine and busy in (0, 1):
                cases.setdefault((case, kind), {})[busy] = run
                devices.add(run.get("device", "cpu"))

        def ratio(run, name):
            return f"{run['ratios'][name]:.2f}x" if run and name in run["ratios"] else ""

        for (case, kind), by_busy in sorted(cases.items()):
            alone, busy = by_busy.get(0), by_busy.get(1)
            dates = sorted({run["date"][:10] for run in by_busy.values()})
            cells = [case_label(case, kind), machine, ratio(alone, "vqfast vs diffusers"),
                     ratio(alone, "vqfast vs diffusers-compile"), ratio(busy, "vqfast vs diffusers"), ", ".join(dates)]
            rows_.append("| " + " | ".join(cells) + " |")
    gpu: dict[tuple, tuple] = {}
    for meta, by_case in gpu_runs(results):
        for key, impls in by_case.items():
            if "vqfast" not in impls:
                continue
            if (key, meta["card"]) not in gpu or meta["date"] > gpu[key, meta["card"]][0]["date"]:
                gpu[key, meta["card"]] = (meta, impls)
    for (key, card), (meta, impls) in sorted(gpu.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
        devices.add("cuda")
        ours = impls["vqfast"]["ms"]

        def vs(name):
            r = impls.get(name)
            return f"{r['ms'] / ours:.2f}x" if r and r.get("ms") else ""

        cells = [Case(**dict(key), impl="vqfast").label, f"{card} (triton {meta['triton']})", vs("diffusers"),
                 vs("diffusers-compile"), "", meta["date"][:10]]
        rows_.append("| " + " | ".join(cells) + " |")
    return ("CPU" if devices <= {"cpu"} else "machine"), rows_


def search_rows(results: Path = RESULTS) -> list[str]:
    """The codebook search against FAISS, cdist + argmin and diffusers: per quantize case and
    machine the newest `vqfast bench` run with a FAISS baseline, the speed-ups and each method's
    wrong codes on the +20 offset case."""
    latest: dict[tuple, tuple[dict, dict]] = {}
    for file in sorted(results.rglob("vqfast-bench-*.json")):
        run = json.loads(file.read_text())
        for r in run["results"]:
            if r["case"]["kind"] == "quantize" and r["baselines"].get("faiss", {}).get("ms"):
                c = r["case"]
                key = (c["name"], c["batch"] * c["size"] ** 2, c["dtype"], run["device_name"])
                if key not in latest or run["date"] > latest[key][0]["date"]:
                    latest[key] = (run, r)
    out = []
    for _, (run, r) in sorted(latest.items()):
        ours, others = r["vqfast"], r["baselines"]

        def vs(name):
            return f"{others[name]['ms'] / ours['ms']:.2f}x" if others.get(name, {}).get("ms") else ""

        wrong = " / ".join(str(x.get("wrong_codes", "-")) for x in (ours, *(others.get(n, {}) for n in
                                                                          ("faiss", "cdist", "diffusers"))))
        cells = [Case(**r["case"]).label, run["device_name"], f"{ours['ms']:.1f} ms", vs("faiss"), vs("cdist"),
                 vs("diffusers"), f"{wrong} of {ours.get('rows_checked', '')}", run["date"][:10]]
        out.append("| " + " | ".join(cells) + " |")
    return out


def replace_block(text: str, start: str, end: str, lines: list[str], where: str = "README.md") -> str:
    block = "\n".join([start, *lines, end])
    new, n = re.subn(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{where} needs exactly one {start} ... {end} block")
    return new


def render_readme(text: str, results: Path = RESULTS) -> str:
    """README.md's text with its headline table brought up to date with bench/results."""
    machine, lines = headline_rows(results)
    text = replace_block(text, HEAD_START, HEAD_END, [
        f"| case | {machine} | vs diffusers | vs torch.compile(diffusers) | vs diffusers beside one busy process | date |",
        "|---|---|---|---|---|---|", *lines], "README.md")
    return replace_block(text, SEARCH_START, SEARCH_END, [
        "| case | machine | vqfast | vs FAISS | vs cdist + argmin | vs diffusers | "
        "wrong codes at +20 (vqfast / FAISS / cdist / diffusers) | date |",
        "|---|---|---|---|---|---|---|---|", *search_rows(results)], "README.md")


#: Until tests/test_tables.py (which calls ``render`` on README.md) is retired.
render = render_readme


def render_benchmarks(text: str, results: Path = RESULTS) -> str:
    """docs/benchmarks.md's text with both full tables brought up to date with bench/results."""
    text = replace_block(text, START, END, [
        "| case | machine | vqfast | baseline | speed-up | peak memory (vqfast / baseline) | date |",
        "|---|---|---|---|---|---|---|", *rows(results)], "docs/benchmarks.md")
    return replace_block(text, SIDE_START, SIDE_END, [
        "| case | machine | busy processes | vqfast vs diffusers | vs compiled diffusers | "
        "compiled vqfast vs compiled diffusers | compiled vqfast vs vqfast | rounds | date |",
        "|---|---|---|---|---|---|---|---|---|", *side_by_side_rows(results)], "docs/benchmarks.md")


def main() -> None:
    for path, render_ in ((README, render_readme), (BENCHMARKS, render_benchmarks)):
        text = path.read_text()
        new = render_(text)
        if new != text:
            path.write_text(new)


if __name__ == "__main__":
    main()
