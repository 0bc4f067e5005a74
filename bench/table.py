"""Regenerate the README's benchmark table from the committed ``vqfast bench`` results.

    python bench/table.py          # rewrites the block between the bench markers in README.md

Reads every bench/results/**/vqfast-bench-*.json. Each row: the case, the machine it ran on,
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
    return [line for _, line in sorted(found)]


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    table = "\n".join(
        [START, "| case | machine | vqfast | baseline | speed-up | peak memory (vqfast / baseline) | date |",
         "|---|---|---|---|---|---|---|", *rows(), END]
    )
    new, n = re.subn(re.escape(START) + ".*?" + re.escape(END), table, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"README.md needs exactly one {START} ... {END} block")
    readme.write_text(new)


if __name__ == "__main__":
    main()
