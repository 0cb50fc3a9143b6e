# Generated from pipeline/graph.py by 'python -m pipeline makefile'; edit that, not this.
# Each stage target runs the stages it needs first (cache hits when up to date), then itself.
.PHONY: features top-features train-head train-top finetune evaluate train

features: setup ## cache the frozen backbone's activations of every photo (incremental)
	$(RUN) features --with-upstream $(ARGS)

top-features: setup ## cache the activations at train_top.cut_point, train-top's input (incremental)
	$(RUN) top-features --with-upstream $(ARGS)

train-head: setup ## train the head on the cached features (never runs the backbone)
	$(RUN) train-head --with-upstream $(ARGS)

train-top: setup ## train the backbone's blocks above train_top.cut_point on their cached input
	$(RUN) train-top --with-upstream $(ARGS)

finetune: setup ## train every layer from the pretrained start on the photos (two phases, augmentation)
	$(RUN) finetune --with-upstream $(ARGS)

evaluate: setup ## metrics of the model train.strategy chooses, on the test split
	$(RUN) evaluate --with-upstream $(ARGS)

train: setup ## train the rung train.strategy chooses (auto: the one 'make advise' recommends)
	$(RUN) train --with-upstream $(ARGS)
