# One virtual environment in .venv holds everything; every target creates it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export XLA_FLAGS ?= --xla_force_host_platform_device_count=4
export KERAS_BACKEND ?= jax
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install test lint main clean

$(BIN)/keras-tp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/keras-tp

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1500 --durations=25 \
	  -n 2 --dist loadgroup

main: install
	XLA_FLAGS=--xla_force_host_platform_device_count=2 \
	  $(BIN)/keras-tp verify opt-125m --world-size 2 --out reports/opt-125m

clean:
	rm -rf $(VENV) reports
