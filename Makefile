# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

# torch==2.13.0 is the CPU build this project's machines carry on disk; plain `torch`
# would pull a multi-GB CUDA build. An already installed torch (any build) is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test test-bare test-avx2 test-triton-oldest test-gpu-rehearsal bench bench-pytest

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

# The CPU numerics (tests/ops, tests/models) again with the vector ISA capped to AVX2 in ATen,
# oneDNN and MKL: no result may rest on the kernels an AVX-512 CPU picks. isa_cap.py first checks
# that the cap took effect. CI runs it after `make test`.
AVX2 = ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: install-test
	$(AVX2) $(PYTHON) .ci/isa_cap.py
	$(AVX2) $(PYTHON) -m pytest tests/ops tests/models

# The kernels under the oldest triton users have (torch 2.11 ships 3.6), in a venv on top of this
# one: interpreted (the kernel suites) and compiled for sm_80/sm_90 (no spills, static budgets held).
# CI runs it after `make test`.
TRITON_OLDEST ?= 3.6.0
KERNEL_TESTS = tests/ops/test_codebook.py tests/ops/test_norms.py tests/ops/test_kernel_norm_paths.py \
	tests/ops/test_dispatch.py tests/ops/test_selfcheck.py tests/ops/test_kernel_compile.py
test-triton-oldest: install-test
	$(PYTHON) -m venv --system-site-packages build/triton-oldest
	build/triton-oldest/bin/python -m pip install -q "triton==$(TRITON_OLDEST)"
	build/triton-oldest/bin/python -c "import triton; assert triton.__version__ == '$(TRITON_OLDEST)', triton.__version__"
	build/triton-oldest/bin/python -m pytest $(KERNEL_TESTS)

# The GPU machine's script, rehearsed on this CPU (CI runs it): bench/gpu_check.sh with the kernels
# in the interpreter and tiny cases, every step's code, one results JSON and one log in the folder;
# then the GPU test selection as the GPU runs it (TRITON_INTERPRET=0), where every kernel case
# must skip, naming the missing GPU, and the rest pass.
test-gpu-rehearsal: install-test
	rm -rf build/gpu-rehearsal
	QUICK=1 OUT=build/gpu-rehearsal bash bench/gpu_check.sh
	test "$$(ls build/gpu-rehearsal)" = "$$(printf 'gpu-check.json\ngpu-check.log')"
	TRITON_INTERPRET=0 $(PYTHON) -m pytest -q $$($(PYTHON) bench/gpu_check.py --print-tests)

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
