"""Regenerate the README's benchmark table from the committed ``vqfast bench`` results.

    python bench/table.py          # rewrites the block between the bench markers in README.md

Reads every bench/results/**/vqfast-bench-*.json and the GPU runs' gpu-check.json. Each row: the case, the machine it ran on,
vqfast's median time (or compiled vqfast's, named) and the baseline's, the speed-up, the peak
memory each added, and the date.
Nothing in the table is typed by hand.
"""

import json
import re
from pathlib import Path

from vqfast.cli.bench import Case, comparisons, row_cells

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
#: Row order: whole-model cases first (what users run), then the ops.
KIND_ORDER = ["decode", "encode", "quantize", "spatial_norm", "group_norm"]


def rows() -> list[str]:
    found = []
    for file in sorted((ROOT / "bench" / "results").rglob("vqfast-bench-*.json")):
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
    found += gpu_rows()
    return [line for _, line in sorted(found)]


def gpu_rows() -> list[tuple[tuple, str]]:
    """Rows of the GPU runs (bench/results/**/gpu-check.json, bench/gpu_check.py): the target and
    grid steps' measured cases, vqfast against each baseline of the same case. The CPU
    rehearsals' files (no card) are not results."""
    found = []
    for file in sorted((ROOT / "bench" / "results").rglob("gpu-check.json")):
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


SIDE_START, SIDE_END = "<!-- side-by-side:start -->", "<!-- side-by-side:end -->"


def side_by_side_rows() -> list[str]:
    """bench/side_by_side.py's runs: the latest per (case, machine, busy processes), vqfast's
    speed-ups as the median of per-round ratios with their quartiles."""
    latest: dict[tuple, dict] = {}
    for file in sorted((ROOT / "bench" / "results").glob("side-by-side-*.json")):
        run = json.loads(file.read_text())
        key = (run["case"], run["kind"], run["device_name"], run.get("busy_processes") or 0)
        if key not in latest or run["date"] > latest[key]["date"]:
            latest[key] = run

    def ratio(run, name):
        r, (lo, hi) = run["ratios"][name], run["ratio_quartiles"][name]
        return f"{r:.2f}x ({lo:.2f}-{hi:.2f})"

    out = []
    for (case, kind, machine, busy), run in sorted(latest.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1], kv[0][3])):
        name, _, rest = case.partition(" ")
        cells = [f"{name} {kind} {rest}", machine, str(busy), ratio(run, "vqfast vs diffusers"),
                 ratio(run, "vqfast vs diffusers-compile"), ratio(run, "vqfast-compile vs diffusers-compile"),
                 str(len(run["times_s"]["vqfast"])), run["date"][:10] + (f" ({run['commit']})" if run.get("commit") else "")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def replace_block(text: str, start: str, end: str, lines: list[str]) -> str:
    block = "\n".join([start, *lines, end])
    new, n = re.subn(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"README.md needs exactly one {start} ... {end} block")
    return new


def render(text: str) -> str:
    """README.md's text with both generated tables brought up to date with bench/results."""
    text = replace_block(text, START, END, [
        "| case | machine | vqfast | baseline | speed-up | peak memory (vqfast / baseline) | date |",
        "|---|---|---|---|---|---|---|", *rows()])
    return replace_block(text, SIDE_START, SIDE_END, [
        "| case | machine | busy processes | vqfast vs diffusers | vs compiled diffusers | "
        "compiled vqfast vs compiled diffusers | rounds | date |",
        "|---|---|---|---|---|---|---|---|", *side_by_side_rows()])


def main() -> None:
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text()))


if __name__ == "__main__":
    main()
