"""Rows as directions: unit-length rows, and their nearest neighbours by cosine similarity.

One helper for what the heads, the rejection guard, near-duplicate search and the app all need.
Similarities are computed ``BLOCK`` query rows at a time, so memory is (BLOCK, N) floats whatever
the number of queries.
"""
from __future__ import annotations

import numpy as np

BLOCK = 256  # query rows per block of similarities
BANK_BLOCK = 65536  # bank rows per block


def unit_rows(x: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """(N, D) rows minus ``centre`` (when given), scaled to length 1 (zero rows stay zero); float64 stays
    float64, anything else becomes float32."""
    x = np.asarray(x)
    x = x if x.dtype == np.float64 else x.astype(np.float32)
    if centre is not None:
        x = x - np.asarray(centre, x.dtype)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest(queries: np.ndarray, bank: np.ndarray, k: int, allowed: np.ndarray | None = None):
    """The ``k`` rows of ``bank`` most similar to each unit query row (both unit rows, so the dot product is the
    cosine similarity): ((N, k) indices, (N, k) float32 similarities), most similar first. ``allowed``:
    (len(bank),) bool, the bank rows that may be chosen (the others come last, at -inf). The bank is read
    ``BANK_BLOCK`` rows at a time (a float16 bank stays float16 but for one block)."""
    queries = np.asarray(queries, np.float32)
    k = min(k, len(bank))
    indices = np.empty((len(queries), k), np.int64)
    similarities = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), BLOCK):
        best_i, best_s = None, None
        for first in range(0, len(bank), BANK_BLOCK):
            block = queries[start:start + BLOCK] @ np.asarray(bank[first:first + BANK_BLOCK], np.float32).T
            if allowed is not None:
                block = np.where(allowed[None, first:first + BANK_BLOCK], block, -np.inf)
            ids = np.broadcast_to(np.arange(first, first + block.shape[1]), block.shape)
            if best_i is not None:  # the best so far compete with this block's
                block, ids = np.hstack([best_s, block]), np.hstack([best_i, ids])
            top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < block.shape[1] else \
                np.broadcast_to(np.arange(block.shape[1]), block.shape)
            best_s, best_i = np.take_along_axis(block, top, axis=1), np.take_along_axis(ids, top, axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        indices[start:start + BLOCK] = np.take_along_axis(best_i, order, axis=1)
        similarities[start:start + BLOCK] = np.take_along_axis(best_s, order, axis=1)
    return indices, similarities
