"""Unit rows and nearest neighbours against brute force, on random data (reproducible in CI)."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline import vectors


@given(st.integers(1, 40), st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**31), st.booleans())
def test_nearest_is_the_brute_force_answer(n_queries, n_bank, k, seed, masked):
    rng = np.random.default_rng(seed)
    queries = vectors.unit_rows(rng.normal(size=(n_queries, 5)))
    bank = vectors.unit_rows(rng.normal(size=(n_bank, 5))).astype(np.float16)
    allowed = rng.random(n_bank) < 0.6 if masked else None
    old_block, vectors.BANK_BLOCK = vectors.BANK_BLOCK, 7  # several bank blocks, merged
    try:
        indices, similarities = vectors.nearest(queries, bank, k, allowed)
    finally:
        vectors.BANK_BLOCK = old_block
    full = queries @ bank.astype(np.float32).T
    if allowed is not None:
        full = np.where(allowed[None, :], full, -np.inf)
    expected = -np.sort(-full, axis=1)[:, :min(k, n_bank)]
    np.testing.assert_allclose(similarities, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(full, indices, axis=1), expected, rtol=1e-6, atol=1e-6)


def test_unit_rows_have_length_one_and_zero_rows_stay_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(vectors.unit_rows(x), [[0.6, 0.8], [0.0, 0.0]])
    assert vectors.unit_rows(x).dtype == np.float64 and vectors.unit_rows(x.astype(np.float16)).dtype == np.float32
    np.testing.assert_allclose(vectors.unit_rows([[2.0, 1.0]], centre=[1.0, 1.0]), [[1.0, 0.0]])
