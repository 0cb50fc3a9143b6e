"""What a trained classifier needs to say "none of these" and to mean its probabilities.

Every rung's classifier is wrapped in a ``Guarded`` model, fitted on the training photos only:

- **Calibration.** Temperature scaling: probabilities are ``softmax(logits / T)``, with ``T``
  chosen to minimise the log loss on the val split (or on out-of-fold logits of the train split when
  val has fewer than ``MIN_HELD_OUT`` photos). Top-1 labels never change; the confidences do.
- **Rejection.** A score of how unlike the training photos a photo is (higher: less like them),
  from what the classifier's last layer sees (its *embedding*). The default, ``knn``, is one minus
  the cosine similarity to the k-th nearest training photo's embedding (Sun et al. 2022: deep
  nearest neighbours); ``mahalanobis``, ``energy`` and ``msp`` are there too (``reject.score``). The
  threshold keeps ``reject.keep`` of the known photos: the ``keep`` quantile of the scores of val
  photos (their neighbours are train photos), or leave-one-out scores of the train photos when
  val is too small. No unknown photo ever sets it. A photo above it is answered ``reject.label``.

The embeddings the kNN score compares with (the *bank*) are kept with the model: every train photo
up to ``reject.bank_size`` rows, else that many k-means centres (class by class, in proportion).
Shapes: embeddings (N, E) float32, logits (N, K) float64, scores (N,) float64.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

from pipeline.training.classifiers import softmax
from pipeline.vectors import nearest, unit_rows

log = logging.getLogger("pipeline.training")

RESERVED = "unknown"  # never a class name, whatever reject.label says
MIN_HELD_OUT = 20  # fewer val photos than this cannot set a threshold: out-of-fold scores instead
ECE_BINS = 15


@dataclass
class Guard:
    """Temperature, score and threshold of one model (plain data, saved as ``guard.json`` + ``guard.npz``)."""

    temperature: float = 1.0
    calibrated_on: str = "none"  # val | out-of-fold | none
    score: str = "knn"
    k: int = 10
    threshold: float = 0.0
    threshold_from: str = "none"  # val | out-of-fold | leave-one-out | train (in-sample) | none
    keep: float = 0.95
    label: str = "unknown"
    bank_rows: int = 0  # rows of the kNN bank; train photos or k-means centres
    bank_kind: str = "none"  # photos | k-means centres
    arrays: dict = field(default_factory=dict, repr=False)  # bank (M, E); projection (E, E) for mahalanobis

    @property
    def rule(self) -> str:
        return f"answer '{self.label}' when score > threshold ({self.score} score, higher is less like the training photos)"

    def scores(self, embedding: np.ndarray, logits: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        """(N,) rejection scores. ``exclude_self``: the embeddings are the bank's own rows (leave-one-out)."""
        if self.score == "knn":
            bank = self.arrays["bank"]
            _, similarities = nearest(unit_rows(embedding), bank, self.k + exclude_self)
            return 1.0 - similarities[:, -1].astype(np.float64)  # 1 - the k-th nearest's similarity
        if self.score == "mahalanobis":
            z = np.asarray(embedding, np.float64) @ self.arrays["projection"]
            means = self.arrays["bank"]
            squared = (z * z).sum(1, keepdims=True) - 2 * z @ means.T + (means * means).sum(1)[None, :]
            return squared.min(axis=1)
        if self.score == "energy":
            return -logsumexp(logits, axis=1)
        return 1.0 - softmax(logits / self.temperature).max(axis=1)

    def accepted(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) <= self.threshold

    def save(self, folder: Path) -> None:
        meta = {k: v for k, v in asdict(self).items() if k != "arrays"}
        (folder / "guard.json").write_text(json.dumps({**meta, "rule": self.rule}, indent=2))
        if self.arrays:
            np.savez(folder / "guard.npz", **self.arrays)

    @classmethod
    def load(cls, folder: Path) -> "Guard":
        meta = json.loads((folder / "guard.json").read_text())
        meta.pop("rule", None)
        arrays = {}
        if (folder / "guard.npz").is_file():
            with np.load(folder / "guard.npz") as stored:
                arrays = {name: stored[name] for name in stored.files}
        return cls(**meta, arrays=arrays)

    def keras_outputs(self, embedding, logits):
        """Keras tensors: (probabilities (N, K), score (N,)) from the classifier's embedding and logits."""
        from keras import layers

        from pipeline.training.layers import OpenSetScore

        scaled = layers.Rescaling(1.0 / self.temperature, name="temperature")(logits)
        probabilities = layers.Softmax(name="probabilities")(scaled)
        bank = self.arrays.get("bank")
        k = min(self.k, len(bank)) if self.score == "knn" else 1
        score = OpenSetScore(self.score, k, self.temperature, bank=bank if self.score in ("knn", "mahalanobis")
                             else None, projection=self.arrays.get("projection"), name="score")([embedding, logits])
        return probabilities, score


def separable(logits: np.ndarray, labels: np.ndarray) -> bool:
    """Whether every photo's top logit is its own class: then the log loss of softmax(logits / T) only
    falls as T shrinks, and the temperature a search returns is where the loss stops being representable,
    not a calibration."""
    return len(labels) > 0 and bool(np.all(np.argmax(logits, axis=1) == labels))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the mean log loss of softmax(logits / T) (bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    def loss(log_t):
        z = logits / np.exp(log_t)
        return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]))

    best = minimize_scalar(loss, bounds=(np.log(0.02), np.log(50.0)), method="bounded")
    return float(np.exp(best.x))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """ECE of the top-1 confidence over ``bins`` equal-width bins, and each bin's count, confidence and accuracy."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    mean_conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(counts, 1)
    mean_acc = np.bincount(which, weights=correct.astype(float), minlength=bins) / np.maximum(counts, 1)
    ece = float(np.sum(counts * np.abs(mean_conf - mean_acc)) / max(1, len(labels)))
    return {"ece": ece, "counts": counts.tolist(), "confidence": mean_conf.tolist(), "accuracy": mean_acc.tolist(),
            "edges": edges.tolist()}


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over photos of the squared distance between the probabilities and the one-hot label
    (scikit-learn's multiclass Brier score, not halved for two classes)."""
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(labels, probabilities, labels=np.arange(probabilities.shape[1]),
                                  scale_by_half=False))


def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Probability that an unknown photo scores above a known one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(known_scores)), np.ones(len(unknown_scores))]
    return float(roc_auc_score(y, np.r_[known_scores, unknown_scores]))


def make_bank(embedding: np.ndarray, labels: np.ndarray, size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Unit rows to compare with: every row up to ``size``, else ``size`` k-means centres of the unit rows,
    shared among the classes in proportion to their photos (each class at least one)."""
    unit = unit_rows(np.asarray(embedding, np.float32))
    if len(unit) <= size:
        return unit, "photos"
    from sklearn.cluster import MiniBatchKMeans

    counts = np.bincount(labels)
    share = np.maximum(1, np.floor(size * counts / counts.sum()).astype(int))
    centres = []
    for k, n in enumerate(share):
        rows = unit[labels == k]
        if len(rows) <= n:
            centres.append(rows)
            continue
        km = MiniBatchKMeans(n_clusters=int(n), random_state=seed, n_init=3, batch_size=1024).fit(rows)
        centres.append(unit_rows(km.cluster_centers_.astype(np.float32)))
    return np.concatenate(centres).astype(np.float32), "k-means centres"


def mahalanobis_arrays(embedding: np.ndarray, labels: np.ndarray) -> dict:
    """Projected class means and the projection P (P P^T = the inverse of the shared, Ledoit-Wolf-shrunk
    covariance of the class-centred embeddings)."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(embedding, np.float64)
    means = np.stack([x[labels == k].mean(axis=0) for k in range(int(labels.max()) + 1)])
    covariance = LedoitWolf().fit(x - means[labels]).covariance_
    values, vectors = np.linalg.eigh(covariance)
    projection = vectors / np.sqrt(np.maximum(values, 1e-12))
    return {"bank": means @ projection, "projection": projection}


@dataclass
class Guarded:
    """A classifier with its guard: the face evaluate, predict, export and compare use.

    ``answer(x)`` -> (calibrated probabilities (N, K), scores (N,)); ``predict_proba`` the former."""

    classifier: object  # training.classifiers face: embed, logits_of_embedding, as_keras, classes, history
    guard: Guard

    @property
    def classes(self) -> list[str]:
        return self.classifier.classes

    @property
    def history(self) -> dict:
        return self.classifier.history

    def answer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embedding = self.classifier.embed(x)
        logits = self.classifier.logits_of_embedding(embedding)
        return softmax(logits / self.guard.temperature), self.guard.scores(embedding, logits)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        embedding = self.classifier.embed(x)
        return softmax(self.classifier.logits_of_embedding(embedding) / self.guard.temperature)

    def as_keras(self, input_shape):
        """input -> [probabilities (N, K), score (N,)]."""
        from pipeline.tf_import import keras as quiet_keras

        keras = quiet_keras()
        inner = self.classifier.as_keras(input_shape)
        inputs = keras.Input(tuple(input_shape), name="model_input")
        embedding, logits = inner(inputs)
        probabilities, score = self.guard.keras_outputs(embedding, logits)
        return keras.Model(inputs, [probabilities, score], name="guarded")


def fit_guard(classifier, train_embedding: np.ndarray, train_labels: np.ndarray, val_embedding: np.ndarray,
              val_labels: np.ndarray, reject, oof_logits=None, say=None) -> Guard:
    """Temperature and rejection threshold from the training photos only (train and val splits).

    ``reject``: ``RejectParams``; ``oof_logits``: a callable giving (train logits of models that did not see
    each photo, their labels), used when val is too small; ``say``: a log function."""
    say = say or (lambda message: None)
    guard = Guard(score=reject.score, k=reject.k, keep=reject.keep, label=reject.label)
    held_out = len(val_labels) >= MIN_HELD_OUT
    oof = oof_logits() if not held_out and oof_logits is not None else None  # (logits, labels) of unseen photos
    if not held_out:
        say(f"{len(val_labels)} val photos (fewer than {MIN_HELD_OUT}): the temperature and the rejection threshold "
            f"come from scores of the train photos{'' if oof is not None else '; no temperature (1.0)'}")
    # calibration
    held = (classifier.logits_of_embedding(val_embedding), val_labels) if held_out else oof
    if held is not None and separable(*held):
        say(f"every {'val' if held_out else 'out-of-fold'} photo is answered right: their log loss falls towards 0 "
            "for any small temperature, so no temperature can be fitted from them; probabilities kept as the "
            "head gives them (temperature 1)")
        guard.calibrated_on = "none (every val photo right)" if held_out else "none (every out-of-fold photo right)"
    elif held is not None:
        guard.temperature = fit_temperature(*held)
        guard.calibrated_on = "val" if held_out else "out-of-fold"
    # the score's arrays
    if guard.score == "knn":
        bank, guard.bank_kind = make_bank(train_embedding, train_labels, reject.bank_size)
        guard.arrays = {"bank": bank}
        guard.bank_rows = len(bank)
    elif guard.score == "mahalanobis":
        guard.arrays = mahalanobis_arrays(train_embedding, train_labels)
        guard.bank_rows, guard.bank_kind = len(guard.arrays["bank"]), "class means"
    # the threshold
    if held_out:
        scores = guard.scores(val_embedding, classifier.logits_of_embedding(val_embedding))
        guard.threshold_from = "val"
    elif guard.score in ("energy", "msp") and oof is not None:  # scores of the logits alone: those of unseen photos
        scores = guard.scores(train_embedding[:0], oof[0])
        guard.threshold_from = "out-of-fold"
    else:
        exclude = guard.score == "knn" and guard.bank_kind == "photos"  # each photo's own bank row left out
        scores = guard.scores(train_embedding, classifier.logits_of_embedding(train_embedding), exclude_self=exclude)
        guard.threshold_from = "leave-one-out" if exclude else "train (in-sample)"
    guard.threshold = float(np.quantile(scores, reject.keep))  # keep 1: the most unusual known photo
    fitted = f"temperature {guard.temperature:.3g} ({guard.calibrated_on})" if not guard.calibrated_on.startswith(
        "none") else f"no temperature {guard.calibrated_on[5:]}"
    say(f"calibrated: {fitted}; rejection: {guard.score} score, "
        f"threshold {guard.threshold:.4g} keeps {100 * reject.keep:g}% of the {guard.threshold_from} photos")
    return guard
