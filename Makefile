# Two commands do all the set-up on a fresh machine:
#   make quickstart   venv + install + run grids/quickstart.yaml, then print the report
#   make test         venv + install + the test suite
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: install quickstart test test-unit bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

quickstart: install
	$(BIN)/sslgrid run grids/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q -ra

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

bench: install
	$(BIN)/python bench/linear_probe.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/detection_step.py
	$(BIN)/python bench/optimizer_step.py

clean:
	rm -rf runs mlruns mlflow.db
