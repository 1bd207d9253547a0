# Two entry points (see README): `make demo` and `make test`. Both create .venv and install
# what they need; torch is pinned first so no dependency can pull a newer (CUDA) build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(BIN)/compress demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest tests -q --durations=25
