"""The README's benchmark tables are generated from the committed results (bench/table.py):
this fails when a result was added or changed without regenerating them."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_match_the_results():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text = (ROOT / "README.md").read_text()
    assert table.render(text) == text, "README.md's tables are out of date: run `python bench/table.py`"
