# Thin aliases for `python -m pipeline STAGE`. Staleness lives in the cache keys, not in file times:
# every stage target always runs and does only the work its inputs and params require.
#   make train-head PARAMS=my.yaml SET="train_head.C=0.1 train_head.model=softmax"

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PARAMS ?= params.yaml
SET    ?=
RUN    := $(PY) -m pipeline
ARGS   := --params $(PARAMS) $(foreach s,$(SET),--set $(s))

.PHONY: help setup demo features train train-head train-top finetune advise compare evaluate all predict export test bench clean-cache

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv with the pinned dependencies and the project

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.lock
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: setup ## build the demo dataset (data/demo) and run features, train-head and evaluate on it
	$(RUN) demo-data --out data/demo
	$(RUN) all $(ARGS)

features: setup ## cache the frozen backbone's activations of every image (incremental)
	$(RUN) features $(ARGS)

train-head: setup ## train the head on the cached features (never runs the backbone)
	$(RUN) train-head $(ARGS)

train-top: setup ## train the backbone's last blocks (above train_top.cut_point) on their cached input
	$(RUN) train-top $(ARGS)

finetune: setup ## train every layer from the pretrained start on the images (two phases, augmentation)
	$(RUN) finetune $(ARGS)

train: setup ## train the rung train.strategy names (auto: what 'make advise' recommends)
	$(RUN) train $(ARGS)

advise: setup ## which rung suits this dataset (head, train-top, fine-tuning), with the reasons
	$(RUN) advise $(ARGS)

compare: setup ## the trained rungs side by side on the test split
	$(RUN) compare $(ARGS)

evaluate: setup ## metrics of the model trained last, on the test split; brings it up to date first
	$(RUN) evaluate $(ARGS)

all: setup ## features, train-head and evaluate
	$(RUN) all $(ARGS)

predict: setup ## labels for new photos: make predict IMAGES="photo.jpg folder/" [FORMAT=csv|json]
	@test -n "$(IMAGES)" || { echo 'usage: make predict IMAGES="photo.jpg folder/"'; exit 2; }
	$(RUN) predict $(IMAGES) $(ARGS) $(if $(FORMAT),--format $(FORMAT))

export: setup ## write the last trained model as .keras, SavedModel and TFLite (checked for parity)
	$(RUN) export $(ARGS)

test: setup ## run the test suite
	$(PY) -m pytest -q

bench: setup ## benchmarks on ../shared/datasets (numbers quoted in README)
	$(PY) bench/core.py

clean-cache: ## delete every cached artifact (features, heads, converted weights)
	rm -rf cache/features cache/heads cache/tops cache/finetuned cache/weights cache/file_index cache/model.json
