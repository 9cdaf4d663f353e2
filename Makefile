# microft developer tasks. `make install` creates .venv; everything else uses it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: install test lint demo bench clean

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev,plot]"
	bash .ci/llama_wheel.sh $(BIN)/pip --cached

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check microft tests bench

demo:
	$(BIN)/microft finetune

bench:
	$(BIN)/python bench/run_all.py

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
