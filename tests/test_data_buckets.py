"""The training batch plan from manifest counts: buckets, batch sizes, the lazy epoch plan."""

from __future__ import annotations

import numpy as np
import pytest

from m3_jax.config import DataConfig
from m3_jax.data.plan import (
    BatchSizing,
    batch_of_step,
    batch_positions,
    flag_embedding_batch_size,
    plan_buckets,
)
from m3_jax.data.prepared import Manifest, PreparedBucket, PreparedDataset


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


def manifest(*datasets: list[tuple[int, int, int, int]]) -> Manifest:
    """A manifest of datasets given as [(passage_len, examples, max_query, max_passage), ...]."""
    return Manifest(
        schema_version=1,
        settings={},
        inputs=(),
        datasets=tuple(
            PreparedDataset(
                index=d,
                source=f"/data/d{d}.jsonl",
                directory=None,
                records=sum(b[1] for b in buckets),
                no_in_batch_neg=False,
                first_without_neg=None,
                first_without_scores=None,
                type=None,
                batch_size=None,
                train_group_size=None,
                buckets=tuple(PreparedBucket(b[0], f"d{d}_len{b[0]}", *b[1:]) for b in buckets),
            )
            for d, buckets in enumerate(datasets)
        ),
        passages=0,
        query_tokens=0,
        passage_tokens=0,
    )


DATA = DataConfig(group_size=2, query_max_len=64, passage_max_len=512, passage_buckets=(128, 256))


def shapes(buckets):
    return [(b.dataset, b.query_len, b.passage_len, b.examples) for b in buckets]


def test_buckets_per_dataset_with_static_query_lengths():
    sizing = BatchSizing(token_budget=10**9, max_batch_size=1)
    m = manifest([(128, 5, 9, 100), (256, 3, 17, 200), (512, 2, 30, 500)], [(128, 4, 70, 120)])
    buckets, unused = plan_buckets([m], DATA, sizing)
    # Longest query of each bucket, truncated to query_max_len, rounded up to a multiple of 8.
    assert shapes(buckets) == [
        ("d0.jsonl (set 0)", 16, 128, 5),
        ("d0.jsonl (set 0)", 24, 256, 3),
        ("d0.jsonl (set 0)", 32, 512, 2),
        ("d1.jsonl (set 0)", 64, 128, 4),
    ]
    assert unused == 0 and all(b.batch_size == 1 for b in buckets)


def test_shorter_training_lengths_merge_prepared_buckets():
    # Prepared up to 512; trained at passage_max_len 200: the 256 and 512 buckets both hold
    # passages that now fit 200 tokens, and merge (in order) into one bucket.
    data = DataConfig(group_size=2, query_max_len=64, passage_max_len=200)
    sizing = BatchSizing(token_budget=10**9, max_batch_size=1)
    m = manifest([(128, 5, 8, 100), (256, 3, 8, 250), (512, 2, 8, 400)])
    buckets, _ = plan_buckets([m], data, sizing)
    assert [(b.passage_len, [s.split for s in b.segments]) for b in buckets] == [
        (128, ["d0_len128"]),
        (200, ["d0_len256", "d0_len512"]),
    ]
    which, index = buckets[1].locate(np.arange(5))
    assert which.tolist() == [0, 0, 0, 1, 1] and index.tolist() == [0, 1, 2, 0, 1]


def test_small_buckets_merge_upwards_and_the_last_is_dropped():
    sizing = BatchSizing(token_budget=10**9, max_batch_size=4)
    m = manifest([(128, 5, 8, 100), (256, 2, 8, 200), (512, 3, 8, 400)])
    buckets, unused = plan_buckets([m], DATA, sizing)
    # The 256 bucket (2 examples) cannot fill a batch of 4: its examples join the 512 bucket.
    assert [(b.passage_len, b.examples) for b in buckets] == [(128, 5), (512, 5)]
    assert unused == 0
    # The largest bucket has nowhere to pass a remainder to: too few examples are unused.
    buckets, unused = plan_buckets([manifest([(128, 5, 8, 100), (256, 3, 8, 200)])], DATA, sizing)
    assert [b.passage_len for b in buckets] == [128] and unused == 3


def plan_inputs():
    sizing = BatchSizing(token_budget=20000, batch_multiple=4)
    data = DataConfig(group_size=4, query_max_len=32, passage_max_len=512)
    m = manifest(
        [(128, 200, 30, 120), (256, 150, 30, 250), (512, 100, 30, 500)], [(128, 77, 10, 60)]
    )
    return plan_buckets([m], data, sizing)[0]


def epoch(buckets, seed, epoch_index):
    """[(bucket, [example positions])] of every batch of an epoch."""
    total = sum(b.batches for b in buckets)
    out = []
    for step in range(total):
        index, batch = batch_of_step(buckets, seed, epoch_index, step)
        rows = range(buckets[index].batch_size)
        out.append((index, batch_positions(buckets[index], index, seed, epoch_index, batch, rows)))
    return out


def test_epoch_plan_properties():
    buckets = plan_inputs()
    assert [b.batch_size for b in buckets] == [36, 16, 8, 36]
    batches = epoch(buckets, seed=3, epoch_index=0)
    assert len(batches) == sum(b.examples // b.batch_size for b in buckets)
    for index, bucket in enumerate(buckets):
        used = np.concatenate([p for i, p in batches if i == index])
        assert len(used) == len(set(used.tolist()))  # each example at most once
        assert used.min() >= 0 and used.max() < bucket.examples
        # Only the incomplete last batch of each bucket is left out.
        assert bucket.examples - len(used) < bucket.batch_size
    # Buckets interleave rather than running one after another.
    order = [i for i, _ in batches]
    assert order != sorted(order)
    with pytest.raises(ValueError, match="outside the epoch"):
        batch_of_step(buckets, 3, 0, len(batches))


def test_epoch_plan_reproducible_and_epochs_differ():
    buckets = plan_inputs()

    def flat(batches):
        return [(i, p.tolist()) for i, p in batches]

    a = flat(epoch(buckets, 3, 1))
    assert a == flat(epoch(buckets, 3, 1))
    assert a != flat(epoch(buckets, 3, 2))
    assert a != flat(epoch(buckets, 4, 1))
