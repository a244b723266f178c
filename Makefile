# Two commands do all the set-up on a fresh machine:
#   make quickstart   venv + install + run grids/quickstart.yaml, then print the report
#   make test         venv + install + the test suite
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: install quickstart test test-unit bench gpu-check clean

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
	$(BIN)/python bench/data_path.py
	$(BIN)/python bench/pretrain_step.py

# every GPU figure (bench/gpu_check.py), on a machine with a GPU; runs without the venv too (the GPU
# machines have their own torch and no network); sized for 8 minutes on one GPU, not yet timed on one
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) bench/gpu_check.py

clean:
	rm -rf runs mlruns mlflow.db mlflow.db.lock
