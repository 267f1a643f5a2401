# Two commands on a fresh machine: `make run` and `make test` (both set up .venv when needed).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
WSSS := $(BIN)/wsss
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MPLBACKEND := Agg

.PHONY: setup run stages data test lint format lock clean

setup: $(VENV)/.installed

# Installs exactly the pinned set; torch 2.14.1 / torchvision 0.29.1 come from this machine's wheel store.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

data: setup
	test -f data/embedded/manifest.parquet || $(WSSS) import embedded

run: stages

# The stages in order on the embedded default data set.
stages: data
	$(WSSS) ingest
	$(WSSS) train-classifier
	$(WSSS) pseudo-masks
	$(WSSS) train-segmenter
	$(WSSS) evaluate

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q

# Re-resolves requirements.in in a scratch venv and pins the result.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -r requirements.in
	.lock-venv/bin/pip install --quiet --no-deps animal-mnist==0.4
	{ echo '# Pinned by `make lock` from requirements.in (one pip resolution); `make setup` installs exactly this set.'; \
	  .lock-venv/bin/pip freeze; } > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf artifacts metrics plots
