"""Read the rows of one split of a cache file in batches: memory holds a window of chunks, never a table.

HDF5 stores ``/features`` in chunks of about 1 MiB (``table.chunk_rows`` rows; gzip-compressed
for spatial activations), and a chunk is read and decompressed whole. So an epoch's order is made
chunk by chunk: the chunks are shuffled, then the rows of ``window`` consecutive chunks are
shuffled among themselves, then cut into batches. Each chunk is decompressed once per epoch (the
file's chunk cache holds a window), a batch mixes rows from up to ``window`` chunks, and memory is
a window of chunks plus one batch, whatever the number of rows.

The per-row index (positions, label numbers) is kept: 12 bytes a row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.store.table import CacheError

WINDOW_CHUNKS = 8  # chunks whose rows are shuffled together
CHUNK_CACHE_BYTES = 64 << 20  # HDF5's chunk cache per open dataset: several windows of ~1 MiB chunks


@dataclass(frozen=True)
class SplitRows:
    """The rows of one split: where they are in the file and their class numbers."""

    positions: np.ndarray  # (N,) int64, increasing: row numbers in the cache file
    labels: np.ndarray  # (N,) int32: index into the cache's classes

    def __len__(self) -> int:
        return len(self.positions)


def plan(positions: np.ndarray, batch_size: int, chunk_rows: int, shuffle: bool = False, seed: int = 0,
         window: int = WINDOW_CHUNKS) -> list[np.ndarray]:
    """Batches of row positions covering ``positions`` once. Without ``shuffle``: in file order.
    With it: chunks in a random order, rows shuffled within windows of ``window`` chunks."""
    if not shuffle:
        order = np.asarray(positions)
    else:
        rng = np.random.default_rng(seed)
        chunk_of = np.asarray(positions) // max(1, chunk_rows)
        chunks = np.unique(chunk_of)
        rng.shuffle(chunks)
        by_chunk = {c: [] for c in chunks.tolist()}
        for position, chunk in zip(np.asarray(positions).tolist(), chunk_of.tolist()):
            by_chunk[chunk].append(position)
        pieces = []
        for start in range(0, len(chunks), window):
            rows = np.array([p for c in chunks[start:start + window].tolist() for p in by_chunk[c]], dtype=np.int64)
            rng.shuffle(rows)
            pieces.append(rows)
        order = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class FeatureReader:
    """Reads rows of ``/features`` by position, as float32, checksums verified (fletcher32)."""

    def __init__(self, path: Path, dataset: str = "features"):
        self.path = path
        self.file = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007)
        self.data = self.file[dataset]
        self.chunk_rows = self.data.chunks[0] if self.data.chunks else max(1, self.data.shape[0])
        self.shape = tuple(self.data.shape[1:])

    def read(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions), *shape) float32, in the order given."""
        positions = np.asarray(positions, dtype=np.int64)
        if not len(positions):
            return np.zeros((0, *self.shape), np.float32)
        order = np.argsort(positions, kind="stable")
        ascending = positions[order]
        unique, inverse = np.unique(ascending, return_inverse=True)
        try:
            block = self.data[unique.tolist()] if len(unique) > 1 else self.data[int(unique[0])][None]
        except OSError as error:  # fletcher32 mismatch: edited or damaged on disk
            raise CacheError(f"{self.path}: features fail their checksum ({error}); "
                             "delete it and run 'make features'") from None
        out = np.empty((len(positions), *self.shape), np.float32)
        out[order] = block[inverse]
        return out

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
