# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

# torch==2.13.0 is the CPU build this project's machines carry on disk; plain `torch`
# would pull a multi-GB CUDA build. An already installed torch (any build) is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test test-bare bench bench-pytest

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e .

install-test:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test]"

demo: install
	$(PYTHON) -m vqfast demo

test: install-test
	$(PYTHON) -m pytest tests
	$(MAKE) test-bare

# The package alone in a fresh virtual environment (build/bare-venv, reused; runtime dependencies
# only, no test extra): save_pretrained, encode, decode, a two-process torchrun encode and the
# demo must work there without a warning.
test-bare:
	TORCH_SPEC="$(TORCH_SPEC)" $(PYTHON) .ci/bare_install.py

# `vqfast bench` (this device's default subset) writes its JSON to bench/results/, then the
# README's table is regenerated from every committed result. bench-pytest runs the
# pytest-benchmark suites (per-op and whole-model grids) instead.
bench: install-test
	$(PYTHON) -m vqfast bench
	$(PYTHON) bench/table.py

bench-pytest: install-test
	mkdir -p bench/results
	$(PYTHON) -m pytest bench --benchmark-only --benchmark-columns=mean,min,max,rounds \
		--benchmark-json=bench/results/pytest-bench-$$(date +%Y-%m-%d)-$$($(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')").json
