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

5. its guard (``training.guard``: temperature, rejection score and threshold), fitted on the train
   and val photos for the ``reject`` params and kept beside the model under a key of its own, so
   that changing ``reject.keep`` refits the guard in seconds and never retrains the rung.

A trained model (``Trained``) has one face, whatever the rung: its inputs and a guarded classifier
with ``answer`` (calibrated probabilities and rejection scores), ``predict_proba`` and ``as_keras``
(``training.classifiers``, ``training.guard``). Evaluate, predict, export and compare use only
that face.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.data import corrections
from pipeline.errors import PipelineError
from pipeline.fingerprint import RunRecord, replaced_folder, stage_key
from pipeline.params import Params, as_dict, key_fields
from pipeline.project import Project
from pipeline.store.table import CacheError
from pipeline.training import classifiers
from pipeline.training.classifiers import softmax
from pipeline.training.guard import RESERVED, Guard, Guarded, fit_guard
from pipeline.training.inputs import iterate
from pipeline.training.keras_fit import remove_backup

log = logging.getLogger("pipeline.training")


class TrainingError(PipelineError, ValueError):
    """Data that cannot train this rung (a class missing from the train split, ...)."""


@dataclass(frozen=True)
class Trained:
    """A trained model: the rung that made it, where it is, its inputs and its classifier."""

    rung: "Rung"
    folder: Path
    key: str
    inputs: object  # training.inputs.CachedInputs or ImageInputs
    classifier: Guarded  # a training.classifiers face with its guard
    trained_now: bool = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.inputs.close()

    @property
    def guard(self) -> Guard:
        return self.classifier.guard

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
    weights_dir: Path  # converted backbone weights (layout.weights_dir)
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
    open_inputs: Callable  # (project) -> inputs
    fit: Callable  # (inputs, FitJob) -> classifier
    # (inputs, FitJob, the fitted classifier) -> (logits of the train photos from models that did not see
    # them, their labels): to calibrate when the val split is too small; None: no temperature then
    out_of_fold: Callable | None = None

    def folder(self, project: Project) -> Path:
        return project.cache_dir / self.section

    def key(self, project: Project, inputs) -> tuple[str, dict]:
        params = project.params
        own = key_fields(getattr(params, self.section))
        # the split settings and the user's corrections are not in the key (the inputs' content hash covers
        # the labels and splits they make), but they are named when they are why a model is trained again
        splits = {k: getattr(params.data, k) for k in ("train_fraction", "val_fraction", "test_fraction", "split_csv",
                                                         "group_near_duplicates")}
        splits["corrections"] = corrections.summary(corrections.read(corrections.file_of(params.data, project.base)))
        ingredients = {self.section: own, "data": splits,
                       "inputs": {inputs.layer: inputs.content_hash, "views": list(inputs.views)}}
        return stage_key(self.section, self.version, own, {"inputs": inputs.identity}), ingredients

    def model_dir(self, project: Project, key: str) -> Path:
        return self.folder(project) / key[:16]

    def find(self, project: Project) -> Trained | None:
        """The model these params would train, if it exists; computes nothing."""
        try:
            inputs = self.open_inputs(project)
        except CacheError:
            return None
        key, _ = self.key(project, inputs)
        folder = self.model_dir(project, key)
        if not (folder / "model.json").is_file():
            inputs.close()
            return None
        classifier = classifiers.load(folder)
        return Trained(self, folder, key, inputs, Guarded(classifier, self.guard(project, inputs, classifier, folder)))

    def load(self, project: Project) -> Trained:
        """The model these params choose; an error naming what to run when it is not trained."""
        found = self.find(project)
        if found is None:
            self.open_inputs(project).close()  # says which stage to run first, if its inputs are missing
            raise CacheError(f"no {self.stage} model for these params in {self.folder(project)}; "
                             f"run 'make {self.stage}' first")
        return found

    def train(self, project: Project) -> Trained:
        """Train this rung unless a model with its key exists; returns the model either way."""
        params = project.params
        inputs = self.open_inputs(project)
        key, ingredients = self.key(project, inputs)
        out = self.model_dir(project, key)
        record = RunRecord(self.folder(project) / "last.json")
        check_class_names(inputs.classes, params.reject.label)
        if (out / "model.json").is_file():
            log.info("%s: cache hit (%s)", self.section, out.name)
            record.save(ingredients)
            classifier = classifiers.load(out)
            return Trained(self, out, key, inputs, Guarded(classifier, self.guard(project, inputs, classifier, out)))
        log.info("%s: recomputing (%s)", self.section, record.reason(ingredients, "no model for these params yet"))
        train, val = inputs.rows("train"), inputs.rows("val")
        missing = [c for i, c in enumerate(inputs.classes) if not np.any(train.labels == i)]
        if missing:
            raise TrainingError(f"class(es) {', '.join(missing)} have no images in the train split; add images "
                                "or change data.train_fraction")
        backup = out.with_name(out.name + ".backup")
        started = time.perf_counter()
        job = FitJob(params, project.weights_dir, train, val, backup,
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
        guarded = Guarded(classifier, self.guard(project, inputs, classifier, out, job))
        return Trained(self, out, key, inputs, guarded, trained_now=True)

    def guard(self, project: Project, inputs, classifier, folder: Path, job: FitJob | None = None) -> Guard:
        """The guard of the model in ``folder`` for ``params.reject``: kept beside it under its own key,
        fitted (from the train and val photos only) when missing."""
        params = project.params
        key = stage_key("guard", GUARD_VERSION, as_dict(params.reject))
        where = folder / f"guard-{key[:12]}"
        if (where / "guard.json").is_file():
            return Guard.load(where)
        say = lambda message: log.info("%s: %s", self.section, message)  # noqa: E731
        train_embedding, train_labels = embeddings(classifier, inputs, "train")
        val_embedding, val_labels = embeddings(classifier, inputs, "val")
        oof = None
        if self.out_of_fold is not None:
            job = job or FitJob(params, project.weights_dir, inputs.rows("train"), inputs.rows("val"),
                                folder.with_name(folder.name + ".backup"), say)
            oof = lambda: self.out_of_fold(inputs, job, classifier)  # noqa: E731
        guard = fit_guard(classifier, train_embedding, train_labels, val_embedding, val_labels, params.reject, oof, say)
        with replaced_folder(where) as tmp:
            guard.save(tmp)
        return guard


# Bump when a guard fitted from the same model and params would come out different. 2: energy and msp
# thresholds from out-of-fold logits when val is small (they were the train photos' own, in-sample). 3: no
# temperature from held-out photos that are all answered right (it was an artefact of the search).
GUARD_VERSION = 3


def check_class_names(classes: list[str], label: str) -> None:
    """No class may be named like the answer for "none of these" (``reject.label``, or the reserved ``unknown``)."""
    for name in dict.fromkeys((RESERVED, label)):  # the reserved name first: it is named so whatever reject.label says
        if name in classes:
            raise TrainingError(f"a class folder is named {name!r}, the answer for photos like none of the classes "
                                f"({'reserved' if name == RESERVED else 'reject.label'}); rename the folder"
                                + ("" if name == RESERVED else " or set reject.label to another name"))


def embeddings(classifier, inputs, split: str, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """((N, E) float32 embeddings, (N,) class numbers) of every row of ``split``, read a batch at a time."""
    rows = inputs.rows(split)
    blocks = [classifier.embed(x) for _, x in iterate(inputs, split, batch_size)]
    return (np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)), rows.labels


def answer_split(model: Guarded, inputs, split: str, batch_size: int = 64) -> dict:
    """Every row of ``split`` in file order, a batch at a time: ``positions``, ``labels`` (N,), calibrated
    ``probabilities`` and ``uncalibrated`` ones (N, K), rejection ``scores`` (N,)."""
    rows = inputs.rows(split)
    k = len(inputs.classes)
    parts: dict = {"probabilities": [np.zeros((0, k))], "uncalibrated": [np.zeros((0, k))], "scores": [np.zeros(0)]}
    for _, x in iterate(inputs, split, batch_size):
        embedding = model.classifier.embed(x)
        logits = model.classifier.logits_of_embedding(embedding)
        parts["probabilities"].append(softmax(logits / model.guard.temperature))
        parts["uncalibrated"].append(softmax(logits))
        parts["scores"].append(model.guard.scores(embedding, logits))
    return {"positions": rows.positions, "labels": rows.labels, **{k: np.concatenate(v) for k, v in parts.items()}}


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
