# Thin aliases for `python -m pipeline COMMAND`. Staleness lives in the cache keys, not in file times:
# every target always runs and does only the work its inputs and params require.
#   make train-head PARAMS=my.yaml SET="train_head.C=0.1 train_head.model=softmax"
# The stage targets (features, train-head, evaluate, ...) are in stages.mk, generated from pipeline/graph.py.

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PARAMS ?= params.yaml
SET    ?=
RUN    := $(PY) -m pipeline
ARGS   := --params $(PARAMS) $(foreach s,$(SET),--set $(s))

.PHONY: help setup setup-ray demo all advise compare inspect predict export serve test docs bench clean-cache

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

include stages.mk

setup: $(VENV)/.installed ## create .venv with the pinned dependencies and the project

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.lock
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup-ray: setup ## add the pinned Ray extra to .venv (features.engine: ray)
	$(VENV)/bin/pip install --quiet -r requirements-ray.lock
	$(VENV)/bin/pip check

demo: setup ## build the demo dataset (data/demo) and run features, train-head and evaluate on it
	$(RUN) demo-data --out data/demo
	$(RUN) all $(ARGS)

all: setup ## features, the rung train.strategy chooses, and evaluate
	$(RUN) all $(ARGS)

advise: setup ## which rung suits this dataset (head, train-top, fine-tuning), with the reasons
	$(RUN) advise $(ARGS)

compare: setup ## the rungs trained for these params side by side on the test split
	$(RUN) compare $(ARGS)

inspect: features ## label errors, near-duplicates, outliers from the cache; TEMPLATE=1: rows to fill in data.corrections
	$(RUN) inspect $(ARGS) $(if $(TEMPLATE),--corrections-template)

predict: setup ## labels for new photos: make predict IMAGES="photo.jpg folder/" [FORMAT=csv|json]
	@test -n "$(IMAGES)" || { echo 'usage: make predict IMAGES="photo.jpg folder/"'; exit 2; }
	$(RUN) predict $(IMAGES) $(ARGS) $(if $(FORMAT),--format $(FORMAT))

export: setup ## write the chosen model as .keras, SavedModel and TFLite (checked for parity)
	$(RUN) export $(ARGS)

serve: setup ## the local app (serve.host:serve.port, 127.0.0.1:8000): try photos, review findings, label, retrain
	$(RUN) serve $(ARGS)

test: setup ## run the test suite
	$(PY) -m pytest -q

docs: setup ## build the documentation site from docs/ into site/ (MkDocs, offline; a broken link fails)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

bench: setup ## benchmarks on ../shared/datasets (numbers quoted in README)
	$(PY) bench/core.py

clean-cache: setup ## delete this project's caches (the machine's converted backbones are kept)
	$(RUN) clean-cache $(ARGS)
