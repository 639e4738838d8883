"""The training batch plan from manifest counts: buckets, batch sizes, the lazy epoch plan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from m3_jax.config import DataConfig
from m3_jax.data.plan import (
    BatchSizing,
    batch_of_step,
    batch_positions,
    file_batch_size,
    file_group_size,
    flag_embedding_batch_size,
    plan_buckets,
)
from m3_jax.data.prepared import SCHEMA_VERSION, Manifest, PreparedBucket, PreparedDataset
from m3_jax.input_files import InputError


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
    # The row follows the run's group size (FlagEmbedding's train_group_size argument), not a
    # dataset's own (only_1neg trains groups of 2 at the G=8 batch sizes).
    assert sizing.batch_size(32, 512, 2) == 32 * 24
    unsupervised = BatchSizing(preset="flag_embedding", batch_multiple=24, table_group_size=1)
    assert unsupervised.batch_size(32, 8192, 1) == 104 * 24
    with pytest.raises(ValueError, match="group_size=4"):
        BatchSizing(preset="flag_embedding", table_group_size=4).batch_size(32, 512, 4)


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


def test_max_batch_size_zero_is_no_cap():
    # The config's 0 (an int, so a command line can set it) means no cap at all.
    table = dict(batch_size_preset="flag_embedding", group_size=1)
    uncapped = BatchSizing.from_data(DataConfig(**table, max_batch_size=0), batch_multiple=96)
    assert uncapped.max_batch_size is None
    assert uncapped.batch_size(32, 256, 1) == 700 * 96  # the paper's 67,200
    capped = BatchSizing.from_data(DataConfig(**table), batch_multiple=96)
    assert capped.batch_size(32, 256, 1) == 960  # the default cap, 1024, to a multiple of 96
    with pytest.raises(ValueError, match="max_batch_size must be >= 0"):
        DataConfig(max_batch_size=-1)


def prepared_dataset(d: int, buckets: list[tuple[int, int, int, int]], **fields) -> PreparedDataset:
    """Dataset d of buckets [(passage_len, examples, max_query, max_passage), ...]; `fields`
    override the FlagEmbedding fields (type, batch_size, ...)."""
    values = dict(
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
        min_negatives=7,
        buckets=tuple(PreparedBucket(b[0], f"d{d}_len{b[0]}", *b[1:]) for b in buckets),
    )
    return PreparedDataset(**{**values, **fields})


def manifest(*datasets: list[tuple[int, int, int, int]] | PreparedDataset) -> Manifest:
    """A manifest of datasets, each a PreparedDataset or its buckets (see prepared_dataset)."""
    return Manifest(
        schema_version=SCHEMA_VERSION,
        settings={},
        inputs=(),
        datasets=tuple(
            d if isinstance(d, PreparedDataset) else prepared_dataset(i, d)
            for i, d in enumerate(datasets)
        ),
        passages=0,
        query_tokens=0,
        passage_tokens=0,
    )


DATA = DataConfig(group_size=2, query_max_len=64, passage_max_len=512, passage_buckets=(128, 256))


def shapes(buckets):
    return [(b.dataset, b.shape.query_len, b.shape.passage_len, b.examples) for b in buckets]


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
    assert [(b.shape.passage_len, [s.split for s in b.segments]) for b in buckets] == [
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
    assert [(b.shape.passage_len, b.examples) for b in buckets] == [(128, 5), (512, 5)]
    assert unused == 0
    # The largest bucket has nowhere to pass a remainder to: too few examples are unused.
    buckets, unused = plan_buckets([manifest([(128, 5, 8, 100), (256, 3, 8, 200)])], DATA, sizing)
    assert [b.shape.passage_len for b in buckets] == [128] and unused == 3


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


# FlagEmbedding's per-dataset rules -----------------------------------------------------------


@pytest.mark.parametrize(
    "fields, group",
    [
        ({}, 8),
        ({"type": "normal"}, 8),
        ({"type": "only_1neg"}, 2),
        ({"type": "symmetric_class", "min_negatives": 3}, 4),
        ({"type": "symmetric_class", "min_negatives": 20}, 8),
        ({"type": "symmetric_sts"}, 8),
        ({"train_group_size": 4}, 4),
        # A type wins over train_group_size, as in FlagEmbedding's _get_train_group_size.
        ({"type": "normal", "train_group_size": 4}, 8),
        ({"train_group_size": 0}, 8),
    ],
)
def test_group_size_rules(fields, group):
    assert file_group_size(prepared_dataset(0, [(128, 1, 8, 8)], **fields), 8) == group


@pytest.mark.parametrize(
    "fields, size",
    [
        ({}, 48),
        ({"type": "normal"}, 48),
        ({"type": "symmetric_sts"}, 24),  # half the per-shard size, times the multiple
        ({"type": "symmetric_class"}, 24),
        ({"batch_size": 5}, 20),  # the records' batch_size is per data-parallel shard
        ({"batch_size": 5, "type": "symmetric_sts"}, 20),
    ],
)
def test_batch_size_rules(fields, size):
    # A default global batch of 48 over 4 shards (12 per shard).
    assert file_batch_size(prepared_dataset(0, [(128, 1, 8, 8)], **fields), 48, 4) == size


def test_bucket_shapes_follow_each_datasets_rules():
    sizing = BatchSizing(token_budget=10**9, max_batch_size=8, batch_multiple=2)
    data = DataConfig(group_size=4, query_max_len=64, passage_max_len=512, passage_buckets=(128,))
    m = manifest(
        prepared_dataset(0, [(128, 40, 8, 100)]),
        prepared_dataset(1, [(128, 40, 8, 100)], type="only_1neg"),
        prepared_dataset(2, [(128, 40, 8, 100)], type="symmetric_sts"),
        prepared_dataset(3, [(128, 40, 8, 100)], batch_size=3, train_group_size=3),
        prepared_dataset(4, [(128, 40, 8, 100)], no_in_batch_neg=True),
    )
    buckets, _ = plan_buckets([m], data, sizing)
    assert [tuple(b.shape) for b in buckets] == [
        (8, 8, 128, 4, True),
        (8, 8, 128, 2, True),
        (4, 8, 128, 4, True),
        (6, 8, 128, 3, True),
        (8, 8, 128, 4, False),
    ]


def test_datasets_without_enough_negatives_are_refused_by_group_size():
    data = DataConfig(group_size=4, passage_buckets=(128,))
    sizing = BatchSizing(token_budget=10**9, max_batch_size=1)
    pairs = prepared_dataset(0, [(128, 4, 8, 8)], first_without_neg="/data/d0.jsonl:3")
    with pytest.raises(InputError, match=r"d0.jsonl:3: field 'neg'.*group size 4"):
        plan_buckets([manifest(pairs)], data, sizing)
    # Pairs train with group size 1 (in-batch negatives only).
    one = dataclasses.replace(data, group_size=1)
    assert plan_buckets([manifest(pairs)], one, sizing)[0][0].shape.group_size == 1


def in_directory(d: int, records: int, **fields) -> PreparedDataset:
    return prepared_dataset(
        d, [(128, records, 8, 100)], source=f"/data/dir/f{d}.jsonl", directory="/data/dir", **fields
    )


def test_small_files_of_a_directory_merge_with_the_smallest_batch_size():
    sizing = BatchSizing(token_budget=10**9, max_batch_size=8)
    data = DataConfig(group_size=2, passage_buckets=(128,), small_threshold=10, drop_threshold=12)
    m = manifest(
        in_directory(0, 30),
        in_directory(1, 6, batch_size=3),
        in_directory(2, 7),
        prepared_dataset(3, [(128, 9, 8, 100)]),  # a file by itself below the threshold: left out
    )
    buckets, unused = plan_buckets([m], data, sizing)
    assert [(b.dataset, b.examples, b.batch_size) for b in buckets] == [
        ("f0.jsonl (set 0)", 30, 8),
        ("dir (small files) (set 0)", 13, 3),
    ]
    assert unused == 9  # the left-out file (the incomplete last batches are not counted)
    # Merged below drop_threshold: dropped.
    dropped = dataclasses.replace(data, drop_threshold=14)
    buckets, unused = plan_buckets([m], dropped, sizing)
    assert [b.dataset for b in buckets] == ["f0.jsonl (set 0)"] and unused == 9 + 13
    # Merged files must agree on their group size.
    clash = manifest(in_directory(0, 5), in_directory(1, 5, type="only_1neg"))
    data = dataclasses.replace(data, group_size=8, drop_threshold=0)
    with pytest.raises(InputError, match="f1.jsonl: group size 2 .*f0.jsonl has 8.*must agree"):
        plan_buckets([clash], data, sizing)


def test_sampling_weights_scale_each_sets_batches_per_epoch():
    sizing = BatchSizing(token_budget=10**9, max_batch_size=4)
    data = DataConfig(group_size=2, passage_buckets=(128,), sampling_weights=(2.0, 0.5))
    a = manifest([(128, 10, 8, 100)])
    b = manifest([(128, 20, 8, 100)])
    buckets, _ = plan_buckets([a, b], data, sizing)
    assert [b.batches for b in buckets] == [5, 2]  # floor(2*10/4), floor(0.5*20/4)
    batches = epoch(buckets, seed=0, epoch_index=0)
    doubled = np.concatenate([p for i, p in batches if i == 0])
    # Twice through the 10 examples: each exactly twice.
    assert sorted(doubled.tolist()) == sorted(list(range(10)) * 2)
    halved = np.concatenate([p for i, p in batches if i == 1])
    assert len(set(halved.tolist())) == 8
    with pytest.raises(ValueError, match="2 weights for 1"):
        plan_buckets([a], data, sizing)
