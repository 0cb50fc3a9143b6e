"""What the app serves from: the chosen model, the photos of the cache by content hash, the neighbours.

One ``Served`` per app. Its model answers one request at a time (a LiteRT interpreter is not shared
between threads); ``retrain`` runs the features stage (labels and splits from the corrections: no
photo goes through the backbone again unless it is new) and the chosen rung in this process, then
swaps the model in. Memory: the model, plus for the neighbours the train photos' features as unit
float16 vectors (2.5 KB a photo for Lite0), plus one request.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pipeline import graph, scan
from pipeline.app import active
from pipeline.app.folder import Folder
from pipeline.data import corrections
from pipeline.data.decode import DECODERS, sniff
from pipeline.errors import PipelineError
from pipeline.params import Params
from pipeline.project import open_project
from pipeline.stages import ladder
from pipeline.store import table
from pipeline.training.guard import MIN_HELD_OUT
from pipeline.training.inputs import CachedInputs
from pipeline.use import predict
from pipeline.vectors import nearest, unit_rows

log = logging.getLogger("pipeline.serve")


class UnknownPhoto(PipelineError, LookupError):
    """A photo the cache does not hold."""


class DecisionRefused(PipelineError, ValueError):
    """A decision that cannot be kept (a label that is no class, no corrections file)."""


class NoModel(PipelineError, LookupError):
    """The project has no trained model yet: add classes and photos, then train."""


class NotTrainable(PipelineError, ValueError):
    """The photos cannot train a model yet (too few classes or photos); the message names the class."""


class Served:
    def __init__(self, project):
        self.project = project
        self.lock = threading.RLock()  # the model, the index and the temporary folder: one request at a time
        self.uploads = tempfile.TemporaryDirectory(prefix="photohead-uploads-")
        self.folder = Folder(project)
        self.trained = None
        self.pooled = None
        self.why = ""  # why there is no model, when there is none
        self.load()

    @property
    def params(self) -> Params:
        return self.project.params

    @property
    def base(self) -> Path:
        return self.project.base

    # ----------------------------------------------------------------- loading
    @property
    def ready(self) -> bool:
        return self.trained is not None

    def model(self):
        """The model served, or NoModel saying what to do first."""
        if self.trained is None:
            raise NoModel(f"no model yet ({self.why}); add at least 2 classes of photos and train")
        return self.trained

    def load(self) -> None:
        """(Re)open the chosen model and index the cache: photos by content hash, the train split's vectors.
        A project with no model yet (a new one) is served too: its classes and photos, and training."""
        with self.lock:
            for held in (self.trained.inputs if self.trained is not None else None, self.pooled):
                if held is not None:
                    held.close()
            self.folder.project = self.project  # the same folder and its lock: uploads may be under way
            try:
                self.rung = ladder.chosen(self.project)
                trained = self.rung.load(self.project)
            except (PipelineError, OSError) as error:
                self.trained = self.pooled = None
                self.rows, self.row_of, self.position, self.sha_of_path, self.sha_of_name = [], {}, {}, {}, {}
                self.input_positions, self.runner, self.root = {}, None, self.project.data_root
                self.why = " ".join(str(error).split())
                self.classes = sorted(self.folder.class_dirs())
                log.info("serve: no model yet (%s)", self.why)
                return
            self.trained = trained
            self.input_positions = self.trained.inputs.position_of()  # sha256 -> row of the model's inputs
            self.runner = None  # the backbone, opened at the first photo that is not in the cache
            self.classes = list(self.trained.classifier.classes)
            self.cache = self.project.features_file()
            self.root = self.project.data_root
            # the pooled features and the labels of these params, read through the store
            self.pooled = CachedInputs(self.cache, self.project.labels_file(self.cache))
            self.rows = self.pooled.labelling.rows()  # (sha256, path, label, split), sorted by sha256
            self.row_of = {row[0]: i for i, row in enumerate(self.rows)}  # sha256 -> row of the labelling
            self.position = dict(zip((row[0] for row in self.rows), self.pooled.positions.tolist()))  # -> cache row
            self.sha_of_path = {row[1]: row[0] for row in self.rows}  # paths relative to data.root
            # each photo's name in the corrections file (relative to the params file's folder)
            self.sha_of_name = {corrections.key_of(self.root / row[1], self.base): row[0] for row in self.rows}
            self._index_train()
            log.info("serve: %s, %d classes, %d photos in the cache", ladder.describe_choice(self.project),
                     len(self.classes), len(self.rows))

    def _index_train(self) -> None:
        """Unit vectors (float16) of the train photos' pooled features, centred on their mean, for neighbours."""
        train = self.pooled.rows("train")
        self.train_sha = self.pooled.sha256(train.positions)
        self.train_label = np.array([self.pooled.classes[i] for i in train.labels])
        width = int(np.prod(self.pooled.shape))
        total = np.zeros(width, np.float64)
        for positions in self.pooled.plan(train, 4096):
            total += self.pooled.read(positions).reshape(len(positions), -1).sum(axis=0)
        self.centre = (total / max(len(train), 1)).astype(np.float32)
        blocks = [unit_rows(self.pooled.read(positions).reshape(len(positions), -1), self.centre).astype(np.float16)
                  for positions in self.pooled.plan(train, 4096)]
        self.train_vectors = np.concatenate(blocks) if blocks else np.zeros((0, width), np.float16)

    def health(self) -> dict:
        t = self.trained
        if t is None:
            return {"status": "untrained", "message": self.why, "classes": self.classes,
                    "backbone": self.params.features.backbone, "reject_label": self.params.reject.label,
                    "max_upload_mb": self.params.serve.max_upload_mb}
        return {"status": "ok", "rung": self.rung.name, "stage": self.rung.stage, "model": t.folder.name,
                "model_key": t.key, "backbone": self.params.features.backbone,
                "features": self.cache.name, "classes": self.classes,
                "reject_label": self.params.reject.label, "max_upload_mb": self.params.serve.max_upload_mb,
                "val_accuracy": t.classifier.history.get("val_accuracy"),
                "photos": sum(row[3] != table.UNLABELLED for row in self.rows),
                "unlabelled": sum(row[3] == table.UNLABELLED for row in self.rows)}

    # ----------------------------------------------------------------- answers
    def predict(self, uploads: list[tuple[str, bytes]], top_k: int | None = None,
                neighbours: int = 0) -> list[dict]:
        """``predict --format json`` for each (name, bytes), with ``neighbours`` nearest train photos."""
        self.model()
        files, shas = [], []
        for name, data in uploads:
            kind = sniff(data[:32])
            sha = hashlib.sha256(data).hexdigest()
            shas.append(sha)
            folder = Path(self.uploads.name)
            target = folder / f"{sha}{DECODERS[kind].suffixes[0] if kind in DECODERS else '.bin'}"
            files.append((name, target, data))
        with self.lock:
            for _, target, data in files:
                target.write_bytes(data)
            try:
                self.runner = self.runner or predict.open_runner(self.trained, self.project.weights_dir)
                answers = predict.answer_files(self.project, self.trained, [t for _, t, _ in files], top_k,
                                               keep_rows=bool(neighbours), runner=self.runner,
                                               cached=self.input_positions)
            finally:
                for _, target, _ in files:
                    target.unlink(missing_ok=True)
            out = []
            for (name, _, _), sha, answer in zip(files, shas, answers):
                item = predict.as_json(answer)
                item["path"] = name
                if neighbours:
                    item["sha256"] = sha
                    item["neighbours"] = self.neighbours(answer.row, neighbours) if answer.row is not None else []
                out.append(item)
        return out

    def neighbours(self, row: np.ndarray, k: int, label: str | None = None,
                   other_than: str | None = None) -> list[dict]:
        """The ``k`` train photos nearest ``row`` (pooled features; cosine of centred features), with ``label``
        only if given; ``other_than``: the sha256 of the photo asked about, never its own neighbour."""
        with self.lock:  # one model's index: a retrain replaces them together
            if self.trained is None or self.trained.inputs.layer != "pooled" or not len(self.train_vectors) \
                    or row is None:
                return []
            vector = unit_rows(np.asarray(row, np.float32).reshape(1, -1), self.centre)
            allowed = np.ones(len(self.train_sha), bool) if label is None else self.train_label == label
            if other_than is not None:
                allowed = allowed & (np.asarray(self.train_sha) != other_than)
            best, similarity = nearest(vector, self.train_vectors, k, allowed)
        return [{"sha256": self.train_sha[i], "label": str(self.train_label[i]), "similarity": round(float(s), 4)}
                for i, s in zip(best[0], similarity[0]) if np.isfinite(s)]

    def cached_rows(self, shas: list[str]) -> dict[str, np.ndarray]:
        """{sha256: pooled features} of the photos of ``shas`` that the cache holds, read in one pass."""
        with self.lock:  # a retrain closes the cache it reads from
            found = sorted((self.position[sha], sha) for sha in set(shas) if sha in self.position)
            if not found:
                return {}
            block = self.pooled.read(np.array([i for i, _ in found], np.int64))
        return {sha: np.asarray(row, np.float32).reshape(-1) for (_, sha), row in zip(found, block)}

    def file_of(self, sha: str) -> Path | None:
        i = self.row_of.get(sha)
        return self.folder.file_of(sha) if i is None else self.folder.moved(self.rows[i][1])

    # ----------------------------------------------------------------- decisions
    def decide(self, sha: str, action: str, label: str = "") -> dict:
        """A decision on a photo of the cache, or on one the app wrote or showed since (not featurised yet)."""
        with self.lock:  # the rows of one load
            file = self.file_of(sha) if sha in self.position else self.folder.file_of(sha)
        if file is None:
            raise UnknownPhoto(f"no photo with sha256 {sha[:12]}... in the cache")
        classes = sorted(set(self.classes) | set(self.folder.class_dirs()))
        if action == "relabel" and label not in classes:
            raise DecisionRefused(f"label {label!r} is not a class ({', '.join(classes)})")
        path = corrections.file_of(self.params.data, self.base)
        if path is None:
            raise DecisionRefused("data.corrections is null: set it to a file to keep decisions")
        name = corrections.key_of(file, self.base)
        decision = corrections.Correction(name, action, label if action == "relabel" else "")
        decisions = corrections.record(path, [decision])
        return {"path": name, "action": action, "label": label, "decisions": len(corrections.decided(decisions))}

    def decisions(self) -> dict[str, corrections.Correction]:
        """The decisions made, by content hash of the photo they name."""
        made = corrections.decided(corrections.read(corrections.file_of(self.params.data, self.base)))
        return {self.sha_of_name[name]: d for name, d in made.items() if name in self.sha_of_name}

    # ----------------------------------------------------------------- labelling
    def to_label(self, limit: int = 60) -> dict:
        """The unlabelled photos in the order that teaches the model most (``app.active``)."""
        with self.lock:  # the cache, its rows and the model of one load: a retrain replaces them together
            self.model()
            decided = self.decisions()
            rows, classes = self.rows, self.classes
            pool = [i for i, r in enumerate(rows) if r[3] == table.UNLABELLED and r[0] not in decided]
            labelled = [i for i, r in enumerate(rows) if r[3] == "train"]
            if not pool:
                return {"regime": "none", "photos": [], "remaining": 0}
            positions = self.pooled.positions
            x_pool = self.pooled.read(positions[pool]).reshape(len(pool), -1)
            x_labelled = self.pooled.read(positions[labelled]).reshape(len(labelled), -1) if labelled else \
                np.zeros((0, x_pool.shape[1]), np.float32)
            proba, scores = self.trained.classifier.answer(x_pool) if self.trained.inputs.layer == "pooled" else \
                (None, None)
        order, regime = active.order(x_pool, x_labelled, len(classes), proba, batch=len(classes))
        photos = []
        for j in order[:limit]:
            item = {"sha256": rows[pool[j]][0], "path": rows[pool[j]][1]}
            if proba is not None:
                best = np.argsort(-proba[j])[:3]
                item["suggested"] = [{"label": classes[c], "probability": round(float(proba[j][c]), 4)}
                                     for c in best]
            photos.append(item)
        return {"regime": regime, "photos": photos, "remaining": len(pool)}

    def trainable(self):
        """The project of the photos now, or NotTrainable naming the class that stops training."""
        try:
            dataset = scan.scan(self.params.data, self.base, self.project.file_index)
        except scan.DatasetError as error:
            raise NotTrainable(" ".join(str(error).split())) from None
        counts = {c: {"train": 0, "val": 0, "test": 0} for c in dataset.classes}
        for record in dataset.records:
            counts[record.label][record.split] += 1
        val = sum(c["val"] for c in counts.values())
        need = 1 if val >= MIN_HELD_OUT else 2
        for name, split in counts.items():
            if split["train"] < need:
                total = sum(split.values())
                raise NotTrainable(f"class {name!r} has {split['train']} train photo(s) of {total}; calibration "
                                   f"needs {need} (with {val} val photos): add photos to {name!r}")
        return open_project(self.params, self.base)

    def retrain(self) -> dict:
        """The features stage (no backbone for photos it has) and the chosen rung, here; then the new model.
        The model served keeps answering meanwhile: every stage writes new files beside the ones it reads
        (a temporary file, then a rename), and the new model is swapped in under the lock at the end. One
        training at a time: the caller holds the app's retrain lock."""
        with self.lock:
            t = self.trained
            before = t.classifier.history.get("val_accuracy") if t is not None else None
            n_before = int(len(t.inputs.rows("train"))) if t is not None else 0
            val_before = int(len(t.inputs.rows("val"))) if t is not None else 0
        started = time.perf_counter()
        # under strategy auto, advised for the data now; served only once its labels and model exist (a
        # review reading the project meanwhile once found the new labels not written yet: a 500)
        project = self.trainable()
        # the features stage first, then the chosen rung, then evaluate: the report describes the model served
        *_, trained, _ = graph.run("evaluate", project)
        trained.inputs.close()
        seconds = time.perf_counter() - started
        with self.lock:
            self.project = project
            self.load()
            return {"val_accuracy_before": before, "val_accuracy_after": self.trained.classifier.history.get(
                        "val_accuracy"), "train_photos_before": n_before,
                    "train_photos_after": int(len(self.trained.inputs.rows("train"))), "seconds": round(seconds, 2),
                    "val_photos_before": val_before, "val_photos_after": int(len(self.trained.inputs.rows("val"))),
                    "trained": trained.trained_now}
