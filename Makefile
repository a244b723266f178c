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
	$(BIN)/python -m pytest -q -ra --durations=25

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

bench: install
	$(BIN)/python bench/linear_probe.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/orchestration_scale.py
	$(BIN)/python bench/detection_step.py
	$(BIN)/python bench/optimizer_step.py
	$(BIN)/python bench/data_path.py
	$(BIN)/python bench/pretrain_step.py
	$(BIN)/python bench/split_bn.py

# every GPU figure (bench/gpu_check.py), on a machine with one GPU; runs without the venv, with only the
# GPU image's packages (the GPU machines have their own torch and no network). Each part in its own
# process under a cap; the whole check stops at 420 s (7 minutes: an estimate for one H100, not yet run
# on a GPU); every figure goes to $(GPU_OUT) as it is measured; exit 1 when a part failed.
# docs/real-scale.md has the ready command for a lent GPU machine.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
GPU_OUT ?= gpu-check.json
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) bench/gpu_check.py --out $(GPU_OUT)

clean:
	rm -rf runs mlruns mlflow.db mlflow.db.lock gpu-check.json
