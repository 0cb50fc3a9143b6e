"""The rung contract: what every training rung of the ladder declares, and the one skeleton that trains it.

A rung (``train-head``, ``train-top``, ``finetune``) declares its name, its params section, its
``VERSION``, where its inputs come from and how it fits a classifier on them. Everything else is
done here, the same way for each:

1. open its inputs (an error naming the stage to run when they do not exist yet);
2. the cache key: sha256 of the stage, its VERSION, its own params that change the model, and the
   identity (content hash) of its inputs; a model already trained under that key is reused;
3. otherwise "recomputing (what changed)", the class check (every class in train), the fit (class
   weights, early stopping, a backup per epoch for the Keras rungs), the accuracies;
4. the model saved whole (a temporary folder moved into place) with its provenance in ``model.json``.

A trained model (``Trained``) has one face, whatever the rung: its inputs and a classifier with
``predict_proba`` on them and ``as_keras`` (``training.classifiers``). Evaluate, predict, export
and compare use only that face.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.fingerprint import RunRecord, replaced_folder, stage_key
from pipeline.params import Params, as_dict, key_fields
from pipeline.store.table import CacheError
from pipeline.training import classifiers
from pipeline.training.inputs import iterate
from pipeline.training.keras_fit import remove_backup

log = logging.getLogger("pipeline.training")


class TrainingError(ValueError):
    """Data that cannot train this rung (a class missing from the train split, ...)."""


@dataclass(frozen=True)
class Trained:
    """A trained model: the rung that made it, where it is, its inputs and its classifier."""

    rung: "Rung"
    folder: Path
    key: str
    inputs: object  # training.inputs.CachedInputs or ImageInputs
    classifier: object  # training.classifiers.LogRegClassifier or KerasClassifier
    trained_now: bool = False

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.classes)

    @property
    def meta(self) -> dict:
        return json.loads((self.folder / "model.json").read_text())


@dataclass(frozen=True)
class FitJob:
    """What a rung's ``fit`` gets besides its inputs."""

    params: Params
    cache_dir: Path  # converted backbone weights live in cache_dir/weights
    train: object  # store.batches.SplitRows
    val: object
    backup: Path  # a folder for per-epoch backups; removed once the model is saved
    log: Callable  # (message) -> None, prefixed with the stage's name


@dataclass(frozen=True)
class Rung:
    name: str  # the value of train.strategy that chooses it: head, top, finetune
    stage: str  # Make target, CLI command and DVC stage: train-head, ...
    section: str  # params section, cache folder and log name: train_head, ...
    version: int  # bump when a model trained from the same params and inputs would come out different
    summary: str  # what trains, in one line
    input_stage: str  # the stage whose output it reads
    open_inputs: Callable  # (params, base) -> inputs
    fit: Callable  # (inputs, FitJob) -> classifier

    def folder(self, params: Params, base: Path) -> Path:
        return Path(base) / params.paths.cache_dir / self.section

    def key(self, params: Params, inputs) -> tuple[str, dict]:
        own = key_fields(getattr(params, self.section))
        # the split settings are not in the key (the inputs' content hash covers the splits they make),
        # but they are named when they are why a model is trained again
        splits = {k: getattr(params.data, k) for k in ("train_fraction", "val_fraction", "test_fraction", "split_csv",
                                                         "group_near_duplicates")}
        ingredients = {self.section: own, "data": splits,
                       "inputs": {inputs.layer: inputs.attrs["content_hash"], "views": list(inputs.views)}}
        return stage_key(self.section, self.version, own, {"inputs": inputs.identity}), ingredients

    def model_dir(self, params: Params, base: Path, key: str) -> Path:
        return self.folder(params, base) / key[:16]

    def find(self, params: Params, base: str | Path) -> Trained | None:
        """The model these params would train, if it exists; computes nothing."""
        base = Path(base)
        try:
            inputs = self.open_inputs(params, base)
        except CacheError:
            return None
        key, _ = self.key(params, inputs)
        folder = self.model_dir(params, base, key)
        if not (folder / "model.json").is_file():
            return None
        return Trained(self, folder, key, inputs, classifiers.load(folder))

    def load(self, params: Params, base: str | Path) -> Trained:
        """The model these params choose; an error naming what to run when it is not trained."""
        found = self.find(params, base)
        if found is None:
            self.open_inputs(params, Path(base))  # says which stage to run first, if its inputs are missing
            raise CacheError(f"no {self.stage} model for these params in {self.folder(params, Path(base))}; "
                             f"run 'make {self.stage}' first")
        return found

    def train(self, params: Params, base: str | Path = ".") -> Trained:
        """Train this rung unless a model with its key exists; returns the model either way."""
        base = Path(base)
        inputs = self.open_inputs(params, base)
        key, ingredients = self.key(params, inputs)
        out = self.model_dir(params, base, key)
        record = RunRecord(self.folder(params, base) / "last.json")
        if (out / "model.json").is_file():
            log.info("%s: cache hit (%s)", self.section, out.name)
            record.save(ingredients)
            return Trained(self, out, key, inputs, classifiers.load(out))
        log.info("%s: recomputing (%s)", self.section, record.reason(ingredients, "no model for these params yet"))
        train, val = inputs.rows("train"), inputs.rows("val")
        missing = [c for i, c in enumerate(inputs.classes) if not np.any(train.labels == i)]
        if missing:
            raise TrainingError(f"class(es) {', '.join(missing)} have no images in the train split; add images "
                                "or change data.train_fraction")
        backup = out.with_name(out.name + ".backup")
        started = time.perf_counter()
        job = FitJob(params, base / params.paths.cache_dir, train, val, backup,
                     lambda message: log.info("%s: %s", self.section, message))
        classifier = self.fit(inputs, job)
        history = classifier.history
        history["fit_seconds"] = time.perf_counter() - started
        if history.get("epochs_run"):
            history["seconds_per_epoch"] = history["fit_seconds"] / history["epochs_run"]
        if len(val):
            history["val_accuracy"] = accuracy(classifier, inputs, "val")
        meta = {"stage": self.stage, "rung": self.name, "section": self.section, "version": self.version,
                "key": key, "classes": inputs.classes, "params": as_dict(getattr(params, self.section)),
                "inputs": {"layer": inputs.layer, "file": inputs.path.name, "identity": inputs.identity,
                           "shape": list(inputs.shape)},
                "n_train": len(train), "n_val": len(val)}
        with replaced_folder(out) as tmp:
            classifiers.save(classifier, meta, tmp)
        remove_backup(backup)
        record.save(ingredients)
        val_text = f", val accuracy {history['val_accuracy']:.3f}" if "val_accuracy" in history else ""
        epochs = f"{history['epochs_run']} epochs, " if history.get("epochs_run") else ""
        log.info("%s: trained on %d images (%s%.1f s)%s", self.section, len(train), epochs, history["fit_seconds"],
                 val_text)
        return Trained(self, out, key, inputs, classifier, trained_now=True)


def predict_split(classifier, inputs, split: str, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions (N,), class numbers (N,), probabilities (N, n_classes)) of every row of ``split``,
    in file order, read a batch at a time: memory is one batch plus the (N, n_classes) answers."""
    rows = inputs.rows(split)
    probabilities = [np.zeros((0, len(inputs.classes)))]
    for positions, x in iterate(inputs, split, batch_size):
        probabilities.append(classifier.predict_proba(x))
    return rows.positions, rows.labels, np.concatenate(probabilities)


def accuracy(classifier, inputs, split: str, batch_size: int = 64) -> float:
    """Share of ``split``'s rows whose most probable class is their label."""
    _, labels, probabilities = predict_split(classifier, inputs, split, batch_size)
    return float(np.mean(np.argmax(probabilities, axis=1) == labels)) if len(labels) else 0.0
