"""The training batch plan: buckets, batch sizes and the epoch plan (m3_jax/data/plan.py)."""

from __future__ import annotations

import numpy as np
import pytest

from m3_jax.config import DataConfig
from m3_jax.data.plan import (
    BatchSizing,
    TrainBucket,
    assign_buckets,
    batches_per_epoch,
    epoch_plan,
    flag_embedding_batch_size,
    measure_lengths,
)
from m3_jax.data.records import Record
from m3_jax.tokenization import load_tokenizer


@pytest.mark.parametrize(
    "length, g8, g1",
    [
        (128, 48, 700),
        (256, 48, 700),
        (499, 48, 700),
        (500, 32, 570),
        (512, 32, 570),
        (1024, 20, 388),
        (2048, 18, 288),
        (3000, 14, 224),
        (4096, 14, 180),
        (5000, 12, 157),
        (6144, 10, 128),
        (7000, 8, 104),
        (8192, 8, 104),
    ],
)
def test_flag_embedding_table(length, g8, g1):
    # FlagEmbedding's get_file_batch_size: per-device batch sizes by the bucket's longest passage.
    assert flag_embedding_batch_size(length, 8) == g8
    assert flag_embedding_batch_size(length, 1) == g1


def test_flag_embedding_preset_scales_by_multiple_and_rejects_other_groups():
    sizing = BatchSizing(preset="flag_embedding", batch_multiple=24)
    assert sizing.batch_size(32, 512, 8) == 32 * 24
    assert sizing.batch_size(32, 8192, 1) == 104 * 24
    with pytest.raises(ValueError, match="group_size=4"):
        sizing.batch_size(32, 512, 4)


def test_token_budget_batch_sizes():
    # floor(10000 / (16 + 8 * 128)) = 9, rounded down to a multiple of 4.
    assert BatchSizing(token_budget=10000, batch_multiple=4).batch_size(16, 128, 8) == 8
    assert BatchSizing(token_budget=10000).batch_size(16, 128, 8) == 9
    # Never below one row per shard, and capped by max_batch_size (rounded to the multiple).
    assert BatchSizing(token_budget=100, batch_multiple=8).batch_size(16, 512, 8) == 8
    capped = BatchSizing(token_budget=10**9, batch_multiple=8, max_batch_size=70)
    assert capped.batch_size(16, 128, 8) == 64
    with pytest.raises(ValueError, match="exactly one"):
        BatchSizing()
    with pytest.raises(ValueError, match="exactly one"):
        BatchSizing(token_budget=1, preset="flag_embedding")
    with pytest.raises(ValueError, match="below batch_multiple"):
        BatchSizing(token_budget=1000, batch_multiple=8, max_batch_size=4)


def test_assignment_and_static_query_length():
    passage_lens = np.array([10, 128, 129, 256, 300, 500, 512, 60])
    query_lens = np.array([5, 9, 17, 3, 30, 12, 8, 2])
    sizing = BatchSizing(token_budget=10**9, max_batch_size=1)
    example_buckets, buckets = assign_buckets(
        query_lens, passage_lens, lengths=(128, 256, 512), group_size=2, sizing=sizing
    )
    np.testing.assert_array_equal(example_buckets, [0, 0, 1, 1, 2, 2, 2, 0])
    # Longest query of each bucket, rounded up to a multiple of 8.
    assert buckets == (TrainBucket(16, 128, 1), TrainBucket(24, 256, 1), TrainBucket(32, 512, 1))


def test_small_buckets_merge_upwards_and_the_last_is_dropped():
    passage_lens = np.array([100] * 5 + [200] * 2 + [400] * 3)
    query_lens = np.full(10, 8)
    sizing = BatchSizing(token_budget=10**9, max_batch_size=4)
    kwargs = {"lengths": (128, 256, 512), "group_size": 2, "sizing": sizing}
    example_buckets, buckets = assign_buckets(query_lens, passage_lens, **kwargs)
    # The 256 bucket (2 examples) cannot fill a batch of 4: its examples join the 512 bucket.
    assert [b.passage_len for b in buckets] == [128, 512]
    np.testing.assert_array_equal(example_buckets, [0] * 5 + [1] * 5)
    # The largest bucket has nowhere to pass a remainder to: too few examples are unused.
    example_buckets, buckets = assign_buckets(query_lens[:8], passage_lens[:8], **kwargs)
    assert [b.passage_len for b in buckets] == [128]
    np.testing.assert_array_equal(example_buckets, [0] * 5 + [-1] * 3)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        assign_buckets(query_lens, passage_lens + 200, **kwargs)


def make_plan_inputs():
    rng = np.random.default_rng(0)
    passage_lens = rng.integers(10, 512, size=500)
    query_lens = rng.integers(4, 32, size=500)
    sizing = BatchSizing(token_budget=20000, batch_multiple=4)
    return assign_buckets(
        query_lens, passage_lens, lengths=(128, 256, 512), group_size=4, sizing=sizing
    )


def test_epoch_plan_properties():
    example_buckets, buckets = make_plan_inputs()
    assert [b.batch_size for b in buckets] == [36, 16, 8]
    plan = epoch_plan(example_buckets, buckets, seed=3, epoch=0)
    assert len(plan) == batches_per_epoch(example_buckets, buckets)
    seen = np.concatenate([b.example_indices for b in plan])
    assert len(seen) == len(set(seen.tolist()))  # each example at most once
    for batch in plan:
        assert len(batch.example_indices) == buckets[batch.bucket_index].batch_size
        assert (example_buckets[batch.example_indices] == batch.bucket_index).all()
    # Only the incomplete last chunk of each bucket is left out.
    counts = np.bincount(example_buckets, minlength=len(buckets))
    for index, bucket in enumerate(buckets):
        used = sum(len(b.example_indices) for b in plan if b.bucket_index == index)
        assert counts[index] - used < bucket.batch_size
    # Buckets interleave rather than running one after another.
    order = [b.bucket_index for b in plan]
    assert order != sorted(order)


def test_epoch_plan_reproducible_and_epochs_differ():
    example_buckets, buckets = make_plan_inputs()

    def flat(plan):
        return [(b.bucket_index, b.example_indices.tolist()) for b in plan]

    a = flat(epoch_plan(example_buckets, buckets, seed=3, epoch=1))
    assert a == flat(epoch_plan(example_buckets, buckets, seed=3, epoch=1))
    assert a != flat(epoch_plan(example_buckets, buckets, seed=3, epoch=2))
    assert a != flat(epoch_plan(example_buckets, buckets, seed=4, epoch=1))


def test_measure_lengths(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    long_text = " ".join(["abc def"] * 200)
    records = [
        Record("abc", ("abc",), ("abc def ghi", "a"), None, None, None, None, "m:1"),
        Record("abc", (long_text,), (), None, None, "xyz ", None, "m:2"),
    ]

    def count(text: str, limit: int) -> int:
        return min(len(tokenizer(text)["input_ids"]), limit)

    data = DataConfig(query_max_len=32, passage_max_len=64, passage_instruction="P: ")
    query_lens, passage_lens = measure_lengths(records, tokenizer, data)
    assert query_lens.dtype == np.int32 and passage_lens.dtype == np.int32
    # The prompt counts for record 2's query; the passage instruction for every passage.
    assert query_lens.tolist() == [count("abc", 32), count("xyz abc", 32)]
    assert passage_lens.tolist() == [count("P: abc def ghi", 64), 64]
