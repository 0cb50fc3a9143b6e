"""A rung's input rows: what its classifier reads, for training, evaluation, predict and export.

Every rung reads rows of one "layer" of the network, in batches:
- ``CachedInputs``: activations stored by a features stage (pooled features for the head, the
  cut point's activations for train-top), read from HDF5 a batch at a time (``store.batches``);
- ``ImageInputs``: the photos themselves, decoded and resized exactly as in the features stage,
  for the fine-tuned network (its rows, labels and splits are those of the pooled cache).

Both have the same face: ``layer``, ``shape`` (one row's), ``classes``, ``identity`` (the content
hash a rung's cache key depends on), ``rows(split)``, ``plan(rows, ...)``, ``read(positions)``,
``paths(positions)``, ``position_of`` (sha256 -> row, for predict). Memory: one batch of rows plus a
per-row index of a few bytes, whatever the number of photos.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

import pipeline.store.batches as batches
import pipeline.store.labels as labels
import pipeline.store.table as table
from pipeline.data.decode import MAX_PIXELS, ImageError, decode_rgb
from pipeline.store.batches import SplitRows


class CachedInputs:
    """Rows of a feature cache file, labelled and split as the labelling file says (``store.labels``), read
    as the mean of ``views`` (default: every view the file holds); ``missing`` is the error text when
    there is no cache file."""

    def __init__(self, path: Path, labelling: Path, views: tuple[str, ...] | None = None, missing: str | None = None):
        if missing and not path.is_file():
            raise table.CacheError(missing)
        self.path = path
        self.attrs = table.read_attrs(path)
        stored = tuple(table.stored_views(self.attrs))
        self.views = tuple(views or stored)  # a row is the mean of these views' activations
        if not set(self.views) <= set(stored):
            raise table.CacheError(f"{path.name} holds the views {list(stored)}, features.views asks for "
                                   f"{list(self.views)}; run 'make features'")
        self.labelling = labels.read(labelling)
        with h5py.File(path, "r") as f:
            self._positions = labels.positions_in(self.labelling, f["sha256"].asstr()[...], path)
        self.classes = list(self.labelling.classes)
        self.layer = str(self.attrs["layer"])
        self.shape = tuple(int(d) for d in self.attrs["feature_shape"])
        views = "" if self.views == ("original",) else ":" + "+".join(self.views)
        self.identity = str(self.labelling.attrs["content_hash"]) + views
        self._readers: list[batches.FeatureReader] = []

    @property
    def positions(self) -> np.ndarray:
        """(N,) int64, increasing: the cache file's row of each photo of the labelling, in its order."""
        return self._positions

    @property
    def content_hash(self) -> str:
        """What the labelled rows are: the features key and each labelled photo's sha256, label and split."""
        return str(self.labelling.attrs["content_hash"])

    @property
    def reader(self) -> batches.FeatureReader:
        if not self._readers:
            self._readers = [batches.FeatureReader(self.path, table.view_dataset(v)) for v in self.views]
        return self._readers[0]

    def rows(self, split: str) -> SplitRows:
        chosen = np.flatnonzero(self.labelling.splits == split)
        number = {c: i for i, c in enumerate(self.classes)}
        labels_of = np.array([number[name] for name in self.labelling.labels[chosen]], dtype=np.int32)
        return SplitRows(self._positions[chosen], labels_of.reshape(len(chosen)))

    def plan(self, rows: SplitRows, batch_size: int, shuffle: bool = False, seed: int = 0) -> list[np.ndarray]:
        return batches.plan(rows.positions, batch_size, self.reader.chunk_rows, shuffle, seed)

    def read(self, positions: np.ndarray) -> np.ndarray:
        """(B, *shape) float32: the mean of the views."""
        first = self.reader.read(positions)
        if len(self._readers) == 1:
            return first
        return (first + sum(reader.read(positions) for reader in self._readers[1:])) / len(self._readers)

    def paths(self, positions: np.ndarray) -> list[str]:
        """The photos' paths (relative to data.root) at rows ``positions`` of the cache file."""
        return self.labelling.paths[self._labelled(positions)].tolist()

    def sha256(self, positions: np.ndarray) -> list[str]:
        return self.labelling.sha256[self._labelled(positions)].tolist()

    def _labelled(self, positions: np.ndarray) -> np.ndarray:
        """Where rows ``positions`` of the cache file are in the labelling (both are sorted by sha256)."""
        return np.searchsorted(self._positions, np.asarray(positions, dtype=np.int64))

    def position_of(self) -> dict[str, int]:
        """{sha256: row} of every row (for predict: photos already in the cache)."""
        with h5py.File(self.path, "r") as f:
            return {sha: i for i, sha in enumerate(f["sha256"].asstr()[...].tolist())}

    def close(self) -> None:
        """Close the HDF5 files opened for reading rows (they reopen when read again)."""
        for reader in self._readers:
            reader.close()
        self._readers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImageInputs(CachedInputs):
    """The photos listed in a feature cache, decoded and resized to ``input_size`` (the network's input)."""

    layer_name = "image"

    def __init__(self, path: Path, labelling: Path, root: Path, input_size: int, resize,
                 decoding: tuple[int, int] = (0, MAX_PIXELS), missing: str | None = None, workers: int = 2):
        """``decoding``: (the draft size, features.max_pixels), as the features stage decoded them."""
        super().__init__(path, labelling, ("original",), missing)
        self.layer = self.layer_name
        self.identity = self.content_hash
        self.shape = (input_size, input_size, 3)
        self.root = root
        self.input_size = input_size
        self.draft_size, self.max_pixels = decoding
        self.resize = resize  # (H, W, 3) uint8 -> (S, S, 3) float32
        self.workers = workers

    def plan(self, rows: SplitRows, batch_size: int, shuffle: bool = False, seed: int = 0) -> list[np.ndarray]:
        return batches.plan(rows.positions, batch_size, 1, shuffle, seed, window=len(rows) or 1)

    def read(self, positions: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) float32 0..255, decoded on ``workers`` threads."""
        files = [self.root / p for p in self.paths(positions)]
        with ThreadPoolExecutor(self.workers) as pool:
            images = list(pool.map(self._load, files))
        return np.stack(images) if images else np.zeros((0, *self.shape), np.float32)

    def _load(self, file: Path) -> np.ndarray:
        try:
            return self.resize(decode_rgb(file, self.draft_size, self.max_pixels))
        except ImageError as error:
            raise table.CacheError(f"{file} changed since 'make features' ({error}); run it again") from None


class ArrayInputs:
    """Rows held in memory with the face training needs (``classes``, ``shape``, ``plan``, ``read``): for
    fitting a head on arrays (out-of-fold logits, benchmarks). The first ``n_train`` rows train."""

    layer = "array"
    views = ("original",)

    def __init__(self, x: np.ndarray, labels: np.ndarray, classes: list[str]):
        self.x = np.asarray(x, np.float32)
        self.labels = np.asarray(labels, np.int32)
        self.classes = list(classes)
        self.shape = tuple(self.x.shape[1:])

    def split_rows(self, n_train: int) -> tuple[SplitRows, SplitRows]:
        every = np.arange(len(self.x), dtype=np.int64)
        return (SplitRows(every[:n_train], self.labels[:n_train]), SplitRows(every[n_train:], self.labels[n_train:]))

    def plan(self, rows: SplitRows, batch_size: int, shuffle: bool = False, seed: int = 0) -> list[np.ndarray]:
        return batches.plan(rows.positions, batch_size, 1, shuffle, seed, window=len(rows) or 1)

    def read(self, positions: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(positions, np.int64)]

    def close(self) -> None:
        pass


def iterate(inputs, split: str, batch_size: int):
    """Yield ``(positions, x)`` for every row of ``split``, in file order."""
    rows = inputs.rows(split)
    for positions in inputs.plan(rows, batch_size):
        yield positions, inputs.read(positions)
