"""Regenerate the README's benchmark table from the committed results in bench/results/.

    python bench/table.py          # rewrites the block between the bench markers in README.md

Each row: the case, the machine it ran on, vqfast's mean time and each baseline's, the speed-up,
and the peak memory each added. Nothing in the table is typed by hand.
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def machine(run: dict, row: dict) -> str:
    if row["extra_info"].get("gpu"):
        return row["extra_info"]["gpu"]
    cpu = run["machine_info"].get("cpu", {})
    return f"{cpu.get('brand_raw', 'CPU')}, {cpu.get('count', '?')} cores"


def rows() -> list[str]:
    out = []
    for file in sorted((ROOT / "bench" / "results").glob("bench-*.json")):
        run = json.loads(file.read_text())
        date = run["datetime"][:10]
        groups: dict = {}
        for b in run["benchmarks"]:
            groups.setdefault(b["group"], {})[b["params"]["impl"]] = b
        for group, impls in sorted(groups.items()):
            ours = impls.get("vqfast")
            if ours is None:
                continue
            t = ours["stats"]["mean"]
            for name, b in impls.items():
                if name == "vqfast":
                    continue
                bt = b["stats"]["mean"]
                peaks = [x["extra_info"].get("peak_mib") for x in (ours, b)]
                peak = "n/a" if None in peaks else f"{peaks[0]:.0f} / {peaks[1]:.0f} MiB"
                out.append(
                    f"| {group} | {machine(run, ours)} | {t * 1e3:.1f} ms | {name} {bt * 1e3:.1f} ms | "
                    f"{bt / t:.2f}x | {peak} | {date} |"
                )
    return out


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
