"""The bare-install check: vqfast in a fresh virtual environment holding only its runtime
dependencies (no test extra, no diffusers, no pytest), where everything the README documents
must work without warnings.

Creates (or reuses) the environment in build/bare-venv (BARE_VENV=... to move it), installs
torch (TORCH_SPEC, default torch==2.13.0, only when missing) and the package built from this
checkout (reinstalled on every run; its dependencies come from pyproject.toml), checks that no
test-only package is there, then runs bare_check.py inside it. Exit status 0 when all passed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("BARE_VENV", ROOT / "build" / "bare-venv"))
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
#: Packages of the test extra (or pulled in by it) that must not be importable in the environment.
TEST_ONLY = ("diffusers", "pytest", "triton", "huggingface_hub", "sklearn", "accelerate")


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kwargs)


def main() -> int:
    python = VENV / "bin" / "python"
    if not python.exists():
        run(sys.executable, "-m", "venv", VENV)  # no --system-site-packages: nothing leaks in
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    has_torch = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        run(*pip, "install", "-q", TORCH_SPEC)
    with tempfile.TemporaryDirectory() as wheels:
        run(*pip, "wheel", "-q", "--no-deps", "-w", wheels, ROOT)
        (wheel,) = Path(wheels).glob("vqfast-*.whl")
        run(*pip, "install", "-q", "--force-reinstall", "--no-deps", wheel)
        run(*pip, "install", "-q", wheel)  # the runtime dependencies it declares
    leaked = [name for name in TEST_ONLY
              if subprocess.run([python, "-c", f"import {name}"], capture_output=True).returncode == 0]
    if leaked:
        print(f"bare install: {VENV} holds test-only packages {leaked}; delete it and rerun", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as work:  # not the checkout: import the installed package
        shutil.copy(Path(__file__).with_name("bare_check.py"), work)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK")}
        env["OMP_NUM_THREADS"] = "1"
        return subprocess.run([python, "bare_check.py"], cwd=work, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
