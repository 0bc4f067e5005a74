"""The documentation runs and is current: README.md and docs/*.md.

- Every ```sh, ```bash and ```python block is its own test case, run in a fresh temporary folder
  (shell blocks with ``bash -e``, python blocks in a subprocess), with this checkout's vqfast
  importable and ``vqfast`` / ``python`` on the PATH. A block marked on the line right before it
  with ``<!-- doc-test: skip (REASON) -->`` is reported as skipped with that reason.
- The generated tables are those bench/table.py writes from bench/results.
- Relative links, and their #anchors, resolve.
- Every option of every ``vqfast`` subcommand is in docs/command.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"sh": "shell", "bash": "shell", "python": "python"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SKIP = re.compile(r"^\s*<!--\s*doc-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
MARKER = re.compile(r"^\s*<!--\s*doc-test")
#: One block's limit; the runnable blocks take well under 20 s on a 2-core CPU.
TIMEOUT_S = 120


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}-{self.language}"


def fenced_blocks(page: Path) -> list[tuple[int, str, str, str]]:
    """(line of the opening fence, its info string, the body with the fence's indent removed,
    the line before the fence) for every fenced block of a markdown page."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3)
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        found.append((start + 1, info, "\n".join(body) + "\n", lines[start - 1] if start else ""))
        i += 1
    return found


def blocks() -> list[Block]:
    out = []
    for page in PAGES:
        for line, info, code, before in fenced_blocks(page):
            if info in LANGUAGES:
                m = SKIP.match(before)
                out.append(Block(page, line, info, code, m.group("reason").strip() if m else None))
    return out


BLOCKS = blocks()


def _env(bin_dir: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"  # no block may reach the network
    env.pop("TRITON_INTERPRET", None)  # the test suite's setting (conftest.py), not a reader's
    return env


def _shims(bin_dir: Path) -> None:
    """``vqfast``, ``python`` and ``python3`` on the PATH: this interpreter, this checkout."""
    bin_dir.mkdir()
    for name, command in (("vqfast", f'"{sys.executable}" -m vqfast'), ("python", f'"{sys.executable}"'),
                          ("python3", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block: Block, tmp_path: Path):
    if block.skip is not None:
        pytest.skip(f"{block.id}: {block.skip}")
    if block.language == "python" and re.search(r"^\s*(from|import)\s+diffusers\b", block.code, re.M) \
            and importlib.util.find_spec("diffusers") is None:
        pytest.skip(f"{block.id}: needs diffusers (the test extra)")
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    _shims(bin_dir)
    work.mkdir()
    if LANGUAGES[block.language] == "python":
        cmd = [sys.executable, "-c", block.code]
    else:
        cmd = ["bash", "-e", "-c", block.code]
    try:
        run = subprocess.run(cmd, cwd=work, env=_env(bin_dir), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} ran over {TIMEOUT_S} s")
    assert run.returncode == 0, (
        f"{block.id} exited with {run.returncode}\n--- block\n{block.code}--- stdout\n{run.stdout[-3000:]}"
        f"\n--- stderr\n{run.stderr[-3000:]}")


def test_every_marker_is_right_before_a_block():
    """A skip marker that is not on the line right before a block (or is misspelt) skips nothing."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines):
            if MARKER.search(line):
                assert SKIP.match(line), f"{page.name}:{n + 1}: write <!-- doc-test: skip (REASON) -->"
                following = lines[n + 1] if n + 1 < len(lines) else ""
                m = FENCE.match(following)
                assert m and m.group(3) in LANGUAGES, f"{page.name}:{n + 1}: the marker must be right before a sh, bash or python block"


def test_fences_are_closed():
    """A fence left open (or doubled) swallows the prose after it into a block."""
    for page in PAGES:
        for line, info, code, _ in fenced_blocks(page):
            inner = [n for n, text in enumerate(code.splitlines()) if FENCE.match(text)]
            assert not inner, f"{page.name}:{line}: a fence inside the block that opens here"


def test_the_pages_have_blocks_that_run():
    assert any(b.skip is None for b in BLOCKS), "no block of the documentation runs"


# --- generated tables ---------------------------------------------------------------------------

def _table():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    return table


def test_readme_headline_matches_the_results():
    text = (ROOT / "README.md").read_text()
    assert _table().render_readme(text) == text, "README.md's headline is out of date: run `python bench/table.py`"


def test_benchmark_tables_match_the_results():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert _table().render_benchmarks(text) == text, \
        "docs/benchmarks.md's tables are out of date: run `python bench/table.py`"


def _write(path: Path, run: dict) -> None:
    import json

    path.write_text(json.dumps(run))


def _side_by_side(date: str, case: str, kind: str, busy: int, device_name: str, speedup: float) -> dict:
    names = ["vqfast vs diffusers", "vqfast vs diffusers-compile", "vqfast-compile vs vqfast",
             "vqfast-compile vs diffusers-compile"]
    return {"device": "cpu", "device_name": device_name, "date": date, "kind": kind, "case": case,
            "busy_processes": busy, "times_s": {"vqfast": [1.0, 1.0, 1.0]},
            "ratios": {n: speedup for n in names}, "ratio_quartiles": {n: [speedup, speedup] for n in names}}


def test_headline_rows(tmp_path: Path):
    """The newest result's machine only; alone and beside one busy process side by side, a blank
    cell where a run is missing; GPU rows from a GPU run with a card, none from a rehearsal."""
    amd, xeon = "AMD EPYC (AVX2), 2 threads", "Intel(R) Xeon(R) Processor, 2 threads"
    runs = [("2026-12-01T10:00:00+00:00", "movq batch 1 256x256 float32", "decode", 0, xeon, 9.0),
            ("2026-12-06T09:00:00+00:00", "movq batch 1 256x256 float32", "decode", 0, amd, 2.0),
            ("2026-12-06T08:00:00+00:00", "movq batch 1 256x256 float32", "decode", 0, amd, 7.0),  # older
            ("2026-12-06T10:00:00+00:00", "movq batch 1 256x256 float32", "decode", 1, amd, 1.5),
            ("2026-12-06T11:00:00+00:00", "amused batch 1 256x256 float32", "encode", 1, amd, 1.25),
            ("2026-12-06T11:30:00+00:00", "amused batch 1 256x256 float32", "encode", 2, amd, 0.5)]
    for i, run in enumerate(runs):
        _write(tmp_path / f"side-by-side-{i}.json", _side_by_side(*run))
    table = _table()
    machine, rows = table.headline_rows(tmp_path)
    assert machine == "CPU"
    assert rows == [f"| amused encode batch 1 256x256 float32 | {amd} |  |  | 1.25x | 2026-12-06 |",
                    f"| movq decode batch 1 256x256 float32 | {amd} | 2.00x | 2.00x | 1.50x | 2026-12-06 |"]

    case = {"kind": "decode", "name": "movq", "batch": 8, "size": 512, "dtype": "float16", "device": "cuda",
            "channels_last": False}

    def gpu_run(card):
        records = [{"case": {**case, "impl": impl}, "status": "measured", "ms": ms}
                   for impl, ms in (("vqfast", 10.0), ("diffusers", 30.0), ("diffusers-compile", 20.0))]
        return {"meta": {"card": card, "triton": "3.9.0", "date": "2026-12-07T00:00:00+00:00"},
                "steps": {"target": records}}

    (tmp_path / "gpu").mkdir()
    _write(tmp_path / "gpu" / "gpu-check.json", gpu_run("NVIDIA H100 80GB HBM3"))
    (tmp_path / "rehearsal").mkdir()
    _write(tmp_path / "rehearsal" / "gpu-check.json", gpu_run(None))
    machine, rows = table.headline_rows(tmp_path)
    assert machine == "machine" and len(rows) == 3
    assert rows[-1].endswith("| NVIDIA H100 80GB HBM3 (triton 3.9.0) | 3.00x | 2.00x |  | 2026-12-07 |"), rows[-1]
    text = table.render_readme("a\n<!-- headline:start -->\nold\n<!-- headline:end -->\nb\n"
                               "<!-- search:start -->\nold\n<!-- search:end -->\n", tmp_path)
    assert text.startswith("a\n<!-- headline:start -->\n| case | machine | vs diffusers |") and "old" not in text


# --- links --------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _without_code(page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def _without_code(text: str) -> str:
    return re.sub(r"^([ \t]*)(`{3,}).*?^\1\2[ \t]*$", "", text, flags=re.M | re.S)


def test_relative_links_resolve():
    bad = []
    for page in PAGES:
        text = _without_code(page.read_text())
        for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


# --- the command's options ----------------------------------------------------------------------

def test_every_option_is_documented():
    from vqfast.cli.main import COMMANDS

    text = (ROOT / "docs" / "command.md").read_text()
    missing = []
    for name, (module, _) in COMMANDS.items():
        if f"vqfast {name}" not in text:
            missing.append(f"vqfast {name}")
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub, name)
        for action in sub.choices[name]._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help") and not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                    missing.append(f"vqfast {name} {option}")
    if "--debug" not in text:
        missing.append("--debug")
    assert not missing, f"docs/command.md does not mention: {', '.join(missing)}"


def test_search_rows(tmp_path: Path):
    """Per quantize case and machine the newest run that has a FAISS baseline; speed-ups against
    each baseline and every method's wrong codes on the offset case."""
    amd = "AMD EPYC (AVX2), 2 threads"
    case = {"kind": "quantize", "name": "movq", "batch": 1, "size": 256, "dtype": "float32", "impl": "vqfast",
            "device": "cpu"}

    def run(date, ours_ms, faiss):
        wrong = {"rows_checked": 1024, "offset": 20.0}
        baselines = {"diffusers": {"ms": 40.0, "wrong_codes": 4, **wrong}, "cdist": {"ms": 20.0, "wrong_codes": 4, **wrong}}
        if faiss:
            baselines["faiss"] = {"ms": 10.0, "wrong_codes": 0, **wrong}
        return {"device": "cpu", "device_name": amd, "date": date,
                "results": [{"case": case, "vqfast": {"ms": ours_ms, "wrong_codes": 0, **wrong}, "baselines": baselines}]}

    _write(tmp_path / "vqfast-bench-1.json", run("2026-12-05T10:00:00+00:00", 8.0, True))
    _write(tmp_path / "vqfast-bench-2.json", run("2026-12-06T10:00:00+00:00", 5.0, True))
    _write(tmp_path / "vqfast-bench-3.json", run("2026-12-07T10:00:00+00:00", 1.0, False))  # no FAISS: not this table's
    assert _table().search_rows(tmp_path) == [
        f"| quantize movq K=16384 D=4 N=1024 float32 | {amd} | 5.0 ms | 2.00x | 4.00x | 8.00x | 0 / 0 / 4 / 4 of 1024 | 2026-12-06 |"]
