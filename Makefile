# Fresh machine with only Python 3.11: `make test` and `make train` build everything they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test train lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Two pytest workers (CI has two cores): the suite is mostly single-threaded XLA compiles.
test: lint
	$(BIN)/python -m pytest -n 2

# The venv's JAX is the CPU build; naming the platform keeps libtpu (in the test extra, for the
# TPU compile checks) from probing for a TPU and printing its errors.
train: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python -m train

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
