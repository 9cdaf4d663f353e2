# microft developer tasks. `make install` creates .venv; everything else uses it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: install test test-avx2 lint demo bench clean

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev,plot]"
	bash .ci/llama_wheel.sh $(BIN)/pip --cached

test:
	$(BIN)/python -m pytest -q

# The tests whose kernels depend on the CPU (linear routing, the MFU probe, every --precision through the CLI
# and its resume), again with torch, oneDNN, MKL and OpenBLAS held to AVX2: an AVX2-only CPU's paths (no
# native bf16), checked on any CPU. MICROFT_CPU_BF16 is unset: the detection is under test. Inductor's cache
# is kept apart (it does not key on the ISA: full-width kernels crashed when torch was held to AVX2); its
# minute-long compile test (marked slow) runs in `make test` only.
AVX2_ENV := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell
AVX2_TESTS := tests/test_linear.py tests/test_perf.py tests/test_precision_cpu.py

test-avx2:
	env -u MICROFT_CPU_BF16 $(AVX2_ENV) TORCHINDUCTOR_CACHE_DIR=$${TMPDIR:-/tmp}/microft-inductor-avx2 \
		$(BIN)/python -m pytest -q -m "not slow" $(AVX2_TESTS)

lint:
	$(BIN)/ruff check microft tests bench

demo:
	$(BIN)/microft finetune

bench:
	$(BIN)/python bench/run_all.py

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
