"""Static-shape batching (m3_jax.bucketing): bucket lengths and lookup, padding, plan_batches."""

from __future__ import annotations

import numpy as np
import pytest

from m3_jax.bucketing import (
    Batch,
    BucketSpec,
    bucket_index,
    bucket_length,
    lengths_up_to,
    pad,
    plan_batches,
)


def next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def check_plan(seq_lengths, spec: BucketSpec, max_length: int, batches) -> None:
    """Every property a plan must have, checked with independent arithmetic."""
    allowed = sorted({n for n in spec.lengths if n < max_length} | {max_length})
    own_bucket = [min(x for x in allowed if x >= n) for n in seq_lengths]
    # Every index exactly once, longest sequences first.
    all_indices = np.concatenate([b.indices for b in batches]) if batches else np.array([], int)
    assert sorted(all_indices.tolist()) == list(range(len(seq_lengths)))
    in_order = [seq_lengths[i] for i in all_indices]
    assert in_order == sorted(in_order, reverse=True)
    for k, b in enumerate(batches):
        assert b.length in allowed
        cap = max(1, min(spec.batch_size, spec.max_tokens // b.length))
        assert 1 <= len(b.indices) <= b.rows <= cap <= spec.batch_size
        assert b.rows * b.length <= spec.max_tokens or b.rows == 1
        # A batch is for its first (longest) sequence's bucket.
        assert b.length == own_bucket[b.indices[0]]
        members = sum(own_bucket[i] == b.length for i in b.indices)
        if members == cap:
            assert b.rows == len(b.indices) == cap
        else:  # the bucket's last batch: rows padded to a power of two
            assert b.rows == min(cap, next_pow2(members))
            assert all(own_bucket[i] != b.length for i in _later_indices(batches, k))
        # Spare rows hold shorter sequences whenever any are left.
        if k + 1 < len(batches):
            assert len(b.indices) == b.rows
        for i in b.indices:
            assert seq_lengths[i] <= b.length


def _later_indices(batches, k):
    return [int(i) for b in batches[k + 1 :] for i in b.indices]


@pytest.mark.parametrize("seed", range(6))
def test_plan_batches_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    max_length = int(rng.choice([40, 64, 100, 512]))
    seq_lengths = rng.integers(2, max_length + 1, size=n).tolist()
    spec = BucketSpec(
        lengths=(8, 16, 32, 64, 128),
        batch_size=int(rng.choice([1, 3, 8, 16, 64])),
        max_tokens=int(rng.choice([100, 256, 1000, 4096])),
    )
    check_plan(seq_lengths, spec, max_length, plan_batches(seq_lengths, spec, max_length))


def test_plan_batches_example():
    spec = BucketSpec(lengths=(16, 32), batch_size=4, max_tokens=64)
    seq_lengths = [5, 30, 16, 17, 3, 40, 8, 9, 10, 11]
    batches = plan_batches(seq_lengths, spec, max_length=48)
    shapes = [b.shape for b in batches]
    # 48 (max_length bucket): [40] -> 1 row; 32: [30, 17] -> 2 rows (cap 64 // 32 = 2);
    # 16: 7 sequences, cap 4 -> 4 + 3 (padded to 4).
    assert shapes == [(1, 48), (2, 32), (4, 16), (4, 16)]
    assert batches[0].indices.tolist() == [5]
    assert sorted(batches[1].indices.tolist()) == [1, 3]
    assert len(batches[3].indices) == 3
    check_plan(seq_lengths, spec, 48, batches)


def test_spare_rows_take_the_next_buckets_longest():
    spec = BucketSpec(lengths=(16, 32, 64), batch_size=8, max_tokens=4096)
    seq_lengths = [60, 50, 40, 30, 20, 12, 10, 8, 5]
    batches = plan_batches(seq_lengths, spec, max_length=64)
    # 64: three sequences padded to 4 rows, the fourth row takes 30 (bucket 32); 32: [20] alone,
    # 1 row; 16: the remaining four.
    assert [b.shape for b in batches] == [(4, 64), (1, 32), (4, 16)]
    assert [[seq_lengths[i] for i in b.indices] for b in batches] == [
        [60, 50, 40, 30],
        [20],
        [12, 10, 8, 5],
    ]
    check_plan(seq_lengths, spec, 64, batches)


def test_last_batch_rows_padded_to_power_of_two():
    spec = BucketSpec(lengths=(16,), batch_size=16, max_tokens=10_000)
    for n, rows in [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (16, 16), (17, 1), (21, 8)]:
        batches = plan_batches([10] * n, spec, max_length=16)
        assert batches[-1].rows == rows, n
    # Capped at the bucket's rows (max_tokens // length = 6, not a power of two).
    spec = BucketSpec(lengths=(16,), batch_size=64, max_tokens=96)
    batches = plan_batches([10] * 11, spec, max_length=16)
    assert [b.rows for b in batches] == [6, 6]
    assert [len(b.indices) for b in batches] == [6, 5]


def test_max_length_is_the_last_bucket():
    spec = BucketSpec(lengths=(16, 32, 64), batch_size=8, max_tokens=4096)
    assert lengths_up_to(spec.lengths, 48) == (16, 32, 48)
    assert lengths_up_to(spec.lengths, 32) == (16, 32)
    assert lengths_up_to(spec.lengths, 100) == (16, 32, 64, 100)
    assert lengths_up_to(spec.lengths, 10) == (10,)
    with pytest.raises(ValueError, match="ascending"):
        lengths_up_to((256, 128), 512)
    assert {b.length for b in plan_batches([33, 47, 48, 5, 6], spec, 48)} == {48, 16}
    assert {b.length for b in plan_batches([70, 100], spec, 100)} == {100}
    assert {b.length for b in plan_batches([7, 9], spec, 10)} == {10}


def test_rows_for_budget():
    spec = BucketSpec(lengths=(16,), batch_size=32, max_tokens=1000)
    assert spec.rows_for(16) == 32
    assert spec.rows_for(100) == 10
    assert spec.rows_for(5000) == 1  # always at least one row


def test_bucket_length():
    assert bucket_length(1, (4, 8)) == 4
    assert bucket_length(4, (4, 8)) == 4
    assert bucket_length(5, (4, 8)) == 8
    with pytest.raises(ValueError, match="9 tokens exceeds the largest bucket 8"):
        bucket_length(9, (4, 8))
    np.testing.assert_array_equal(bucket_index([1, 4, 5, 8, 3], (4, 8)), [0, 0, 1, 1, 0])


def test_too_long_sequence_raises():
    spec = BucketSpec(lengths=(16, 32), batch_size=4, max_tokens=1024)
    with pytest.raises(ValueError, match="51 tokens"):
        plan_batches([10, 51], spec, max_length=50)


def test_empty_input_plans_nothing():
    assert plan_batches([], BucketSpec(), max_length=512) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-3), "batch_size"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(lengths=()), "positive"),
        (dict(lengths=(16, 0)), "positive"),
        (dict(lengths=(32, 16)), "ascending"),
        (dict(lengths=(16, 16, 32)), "ascending"),
    ],
)
def test_bad_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BucketSpec(**kwargs)


def test_batch_pad():
    seqs = [[0, 5, 6, 2], [0, 7, 2], [0, 8, 9, 10, 11, 2]]
    batch = Batch(np.array([2, 0]), rows=4, length=8)
    ids, mask = batch.pad(seqs, pad_token_id=1)
    assert ids.shape == mask.shape == (4, 8)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(
        ids,
        [
            [0, 8, 9, 10, 11, 2, 1, 1],
            [0, 5, 6, 2, 1, 1, 1, 1],
            [1] * 8,
            [1] * 8,
        ],
    )
    np.testing.assert_array_equal(
        mask,
        [
            [1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0] * 8,
            [0] * 8,
        ],
    )


def test_pad_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="7 tokens does not fit bucket length 6"):
        pad([[0] * 7], rows=1, length=6, pad_token_id=1)
    with pytest.raises(ValueError, match="3 sequences do not fit a batch of 2 rows"):
        pad([[0], [0], [0]], rows=2, length=6, pad_token_id=1)


def test_pad_batch_of_a_plan_holds_every_sequence():
    rng = np.random.default_rng(7)
    seqs = [rng.integers(3, 50, size=int(rng.integers(2, 40))).tolist() for _ in range(37)]
    spec = BucketSpec(lengths=(8, 16, 32), batch_size=8, max_tokens=128)
    seen = 0
    for batch in plan_batches([len(s) for s in seqs], spec, max_length=40):
        ids, mask = batch.pad(seqs, pad_token_id=1)
        assert ids.shape == (batch.rows, batch.length)
        for row, index in enumerate(batch.indices):
            n = len(seqs[index])
            assert ids[row, :n].tolist() == seqs[index]
            assert np.all(ids[row, n:] == 1)
            assert mask[row].tolist() == [1] * n + [0] * (batch.length - n)
            seen += 1
        assert np.all(mask[len(batch.indices) :] == 0)
    assert seen == len(seqs)
