"""The training batch plan, from the prepared sets' counts alone: the buckets of static batch
shapes and the global batches of every epoch, computed lazily.

Every training batch has one of a few shapes (global batch B, query length Lq, passage length
Lp) and comes from one dataset and one length bucket (FlagEmbedding's same-dataset batching). As
in FlagEmbedding's `split_data_by_length.py`, an example's length is the longest of ALL its
passages, so any sampled group fits its bucket. Each bucket's global batch size comes from a
token budget or from FlagEmbedding's per-device table.

An epoch is a permutation of all full batches of all buckets, and within each bucket a
permutation of its examples cut into consecutive batches (the incomplete last one dropped), as
FlagEmbedding's `refresh_epoch` does; both permutations are grain's `index_shuffle`, evaluated
per batch and per row, so planning 10^9 examples takes no memory and no time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from grain.experimental import index_shuffle

from m3_jax.bucketing import bucket_index, lengths_up_to
from m3_jax.config import DataConfig
from m3_jax.data.prepared import Manifest

QUERY_LEN_MULTIPLE = 8

# FlagEmbedding's `get_file_batch_size` (the batch sizes BGE-M3 was fine-tuned and pre-trained
# with): per-device batch sizes for the passage length ranges [lower, next lower) of
# `split_data_by_length.py`, with group size 8 (fine-tuning) and 1 (unsupervised pre-training).
FLAG_EMBEDDING_LOWER_BOUNDS = (0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000)
FLAG_EMBEDDING_BATCH_SIZES = {
    8: (48, 32, 20, 18, 14, 14, 12, 10, 8),
    1: (700, 570, 388, 288, 224, 180, 157, 128, 104),
}


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def flag_embedding_batch_size(passage_len: int, group_size: int) -> int:
    """FlagEmbedding's per-device batch size for a bucket whose longest passage is `passage_len`
    (the table row whose range holds it: 512 -> the 500-1000 row -> 32 with G=8)."""
    if group_size not in FLAG_EMBEDDING_BATCH_SIZES:
        raise ValueError(
            f"FlagEmbedding's batch-size table has group sizes "
            f"{sorted(FLAG_EMBEDDING_BATCH_SIZES)} only, got group_size={group_size}; "
            "use a token budget instead"
        )
    row = int(np.searchsorted(FLAG_EMBEDDING_LOWER_BOUNDS, passage_len, side="right")) - 1
    return FLAG_EMBEDDING_BATCH_SIZES[group_size][row]


@dataclasses.dataclass(frozen=True)
class BatchSizing:
    """How a bucket's global batch size is chosen.

    token_budget: most query + passage tokens per global batch:
        floor(token_budget / (query_len + group_size * passage_len)).
    preset: "flag_embedding": FlagEmbedding's per-device table times `batch_multiple`.
    max_batch_size: an upper bound on the global batch size.
    batch_multiple: global batch sizes are multiples of this (the number of data-parallel shards).
    Exactly one of `token_budget` and `preset` is set.
    """

    token_budget: int | None = None
    preset: str | None = None
    max_batch_size: int | None = None
    batch_multiple: int = 1

    def __post_init__(self) -> None:
        if (self.token_budget is None) == (self.preset is None):
            raise ValueError("set exactly one of BatchSizing.token_budget and BatchSizing.preset")
        if self.preset is not None and self.preset != "flag_embedding":
            raise ValueError(f"unknown batch-size preset {self.preset!r}; known: 'flag_embedding'")
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError(f"token_budget must be positive, got {self.token_budget}")
        if self.batch_multiple <= 0:
            raise ValueError(f"batch_multiple must be positive, got {self.batch_multiple}")
        if self.max_batch_size is not None and self.max_batch_size < self.batch_multiple:
            raise ValueError(
                f"max_batch_size {self.max_batch_size} is below batch_multiple {self.batch_multiple}"
            )

    @classmethod
    def from_data(cls, data: DataConfig, batch_multiple: int) -> BatchSizing:
        """The sizing `data` asks for; `batch_multiple` is `data.batch_multiple` resolved (-1
        means the data-parallel size, which only the mesh knows)."""
        preset = data.batch_size_preset
        return cls(
            token_budget=None if preset is not None else data.token_budget,
            preset=preset,
            max_batch_size=data.max_batch_size,
            batch_multiple=batch_multiple,
        )

    def batch_size(self, query_len: int, passage_len: int, group_size: int) -> int:
        m = self.batch_multiple
        if self.preset is not None:
            size = flag_embedding_batch_size(passage_len, group_size) * m
        else:
            per_row = query_len + group_size * passage_len
            # Round down so the budget holds, but never below one row per data-parallel shard.
            size = max(m, self.token_budget // per_row // m * m)
        if self.max_batch_size is not None:
            size = min(size, self.max_batch_size // m * m)
        return size


@dataclasses.dataclass(frozen=True)
class Segment:
    """`count` examples of split `split` of prepared set `source`."""

    source: int
    split: str
    count: int


@dataclasses.dataclass(frozen=True)
class TrainBucket:
    """The examples of one dataset that share a static batch shape: `batch_size` queries
    (global) of `query_len` tokens, each with a group of passages of `passage_len` tokens.
    Its examples are the concatenation of `segments` (prepared buckets, in order)."""

    dataset: str
    query_len: int
    passage_len: int
    batch_size: int
    segments: tuple[Segment, ...]

    @property
    def examples(self) -> int:
        return sum(s.count for s in self.segments)

    @property
    def batches(self) -> int:
        return self.examples // self.batch_size

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment index, index in that segment's split) of each example position."""
        ends = np.cumsum([s.count for s in self.segments])
        which = np.searchsorted(ends, positions, side="right")
        starts = np.concatenate([[0], ends[:-1]])
        return which, positions - starts[which]


def plan_buckets(
    manifests: Sequence[Manifest], data: DataConfig, sizing: BatchSizing
) -> tuple[tuple[TrainBucket, ...], int]:
    """(the buckets that fill at least one global batch, the examples left out).

    A prepared bucket goes to the training bucket that holds its longest passage after the
    run's truncation (`data.passage_max_len`, `data.passage_buckets`); the query length of a
    bucket is its longest query, truncated, rounded up to a multiple of 8. A bucket too small
    for one global batch passes its examples to the dataset's next larger bucket instead of
    losing them."""
    lengths = lengths_up_to(data.passage_buckets, data.passage_max_len)
    buckets: list[TrainBucket] = []
    unused = 0
    for source, manifest in enumerate(manifests):
        for dataset in manifest.datasets:
            segments: dict[int, list[Segment]] = {}
            query_lens: dict[int, int] = {}
            for b in dataset.buckets:
                longest = min(b.max_passage_len, data.passage_max_len)
                j = int(bucket_index([longest], lengths)[0])
                segments.setdefault(j, []).append(Segment(source, b.split, b.examples))
                query = min(b.max_query_len, data.query_max_len)
                query_lens[j] = max(query_lens.get(j, 0), query)
            carried: list[Segment] = []
            carried_query = 0
            for j, passage_len in enumerate(lengths):
                members = carried + segments.get(j, [])
                query = max(carried_query, query_lens.get(j, 0))
                if not members:
                    continue
                query_len = round_up(query, QUERY_LEN_MULTIPLE)
                batch_size = sizing.batch_size(query_len, int(passage_len), data.group_size)
                if sum(s.count for s in members) < batch_size:
                    carried, carried_query = members, query
                    continue
                carried, carried_query = [], 0
                name = f"{Path(dataset.source).name} (set {source})"
                buckets.append(
                    TrainBucket(name, query_len, int(passage_len), batch_size, tuple(members))
                )
            unused += sum(s.count for s in carried)
    return tuple(buckets), unused


def _seed(*parts: int) -> int:
    """A 32-bit seed for index_shuffle from (seed, epoch, ...)."""
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def batch_of_step(
    buckets: Sequence[TrainBucket], seed: int, epoch: int, step: int
) -> tuple[int, int]:
    """(bucket index, batch index within the bucket) of global batch `step` of epoch `epoch`."""
    ends = np.cumsum([b.batches for b in buckets])
    total = int(ends[-1])
    if not 0 <= step < total:
        raise ValueError(f"step {step} is outside the epoch's {total} batches")
    shuffled = index_shuffle(step, max_index=total - 1, seed=_seed(seed, epoch), rounds=4)
    bucket = int(np.searchsorted(ends, shuffled, side="right"))
    return bucket, shuffled - (0 if bucket == 0 else int(ends[bucket - 1]))


def batch_positions(
    bucket: TrainBucket, bucket_index_: int, seed: int, epoch: int, batch: int, rows: range
) -> np.ndarray:
    """The example positions (within `bucket`) of rows `rows` of its batch `batch`: consecutive
    slices of a permutation of the bucket's examples, one permutation per epoch."""
    key = _seed(seed, epoch, bucket_index_)
    n = bucket.examples
    return np.asarray(
        [
            index_shuffle(batch * bucket.batch_size + r, max_index=n - 1, seed=key, rounds=4)
            for r in rows
        ],
        dtype=np.int64,
    )
