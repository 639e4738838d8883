"""Vector-database formats of lexical weights (m3_jax.sparse_formats)."""

from __future__ import annotations

import numpy as np
import pytest

from m3_jax.sparse_formats import from_indices_values, to_csr, to_id_weight_dict, to_indices_values

WEIGHTS = [
    {"17": np.float32(0.25), "5": np.float32(0.5), "300": np.float32(0.125)},
    {},
    {"5": np.float32(0.75)},
]


def test_indices_values_sorted_and_round_trip():
    out = to_indices_values(WEIGHTS[0])
    assert out == {"indices": [5, 17, 300], "values": [0.5, 0.25, 0.125]}
    assert from_indices_values(out["indices"], out["values"]) == WEIGHTS[0]
    assert to_indices_values({}) == {"indices": [], "values": []}
    assert to_id_weight_dict(WEIGHTS[0]) == {5: 0.5, 17: 0.25, 300: 0.125}


def test_csr_rows_and_lexical_scores():
    csr = to_csr(WEIGHTS, vocab_size=400)
    assert csr.shape == (3, 400) and csr.dtype == np.float32
    np.testing.assert_array_equal(csr.indptr, [0, 3, 3, 4])
    dense = csr.toarray()
    assert dense[0, 5] == 0.5 and dense[2, 5] == 0.75 and dense[1].sum() == 0
    # The row dot product is FlagEmbedding's compute_lexical_matching_score.
    assert (csr[0] @ csr[2].T).toarray()[0, 0] == pytest.approx(0.5 * 0.75)


def test_bad_input():
    with pytest.raises(ValueError, match="token-id strings"):
        to_indices_values({"hello": 1.0})
    with pytest.raises(ValueError, match="outside"):
        to_csr(WEIGHTS, vocab_size=100)
    with pytest.raises(ValueError, match="2 indices but 1 values"):
        from_indices_values([1, 2], [0.5])
