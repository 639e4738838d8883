"""The training batch plan: which bucket each example is in, each bucket's static batch shape,
and the global batches of an epoch.

Every training batch has one of a few shapes (global batch B, query length Lq, passage length
Lp). As in FlagEmbedding's `split_data_by_length.py`, an example's length is the longest of ALL
its passages, so any sampled group fits its bucket (`m3_jax.bucketing` has the lengths and the
lookup). Each bucket has its own global batch size, from a token budget or from FlagEmbedding's
per-device table, and every batch of an epoch comes from a single bucket (`epoch_plan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3_jax.bucketing import bucket_index
from m3_jax.config import DataConfig
from m3_jax.data.records import Record
from m3_jax.data.sampler import apply_instructions
from m3_jax.tokenization import tokenize

QUERY_LEN_MULTIPLE = 8

# FlagEmbedding's `get_file_batch_size` (the batch sizes BGE-M3 was fine-tuned and pre-trained
# with): per-device batch sizes for the passage length ranges [lower, next lower) of
# `split_data_by_length.py`, with group size 8 (fine-tuning) and 1 (unsupervised pre-training).
FLAG_EMBEDDING_LOWER_BOUNDS = (0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000)
FLAG_EMBEDDING_BATCH_SIZES = {
    8: (48, 32, 20, 18, 14, 14, 12, 10, 8),
    1: (700, 570, 388, 288, 224, 180, 157, 128, 104),
}


@dataclasses.dataclass(frozen=True)
class TrainBucket:
    """A static batch shape: `batch_size` queries (global) of `query_len` tokens, each with a
    group of passages of `passage_len` tokens."""

    query_len: int
    passage_len: int
    batch_size: int


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """One global batch: indices into the records, all from bucket `bucket_index`."""

    bucket_index: int
    example_indices: np.ndarray


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


def assign_buckets(
    query_lens: np.ndarray,
    passage_lens: np.ndarray,
    *,
    lengths: Sequence[int],
    group_size: int,
    sizing: BatchSizing,
) -> tuple[np.ndarray, tuple[TrainBucket, ...]]:
    """Each example's bucket and the buckets' static shapes.

    query_lens, passage_lens: [N] token lengths (already truncated); `passage_lens` is the longest
    passage of each example. An example goes to the smallest `lengths` entry that holds it. The
    query length of a bucket is its longest query rounded up to a multiple of 8. A bucket too
    small for one global batch passes its examples to the next larger bucket instead of losing
    them. Returns ([N] int32 bucket index or -1 when an example is
    in no bucket that can fill a batch, the buckets that can).
    """
    query_lens, passage_lens = np.asarray(query_lens), np.asarray(passage_lens)
    if query_lens.shape != passage_lens.shape or query_lens.ndim != 1:
        raise ValueError(
            f"query_lens {query_lens.shape} and passage_lens {passage_lens.shape} must be [N]"
        )
    natural = bucket_index(passage_lens, lengths)
    example_buckets = np.full(len(passage_lens), -1, dtype=np.int32)
    buckets: list[TrainBucket] = []
    carried = np.zeros(0, dtype=np.int64)
    for j, passage_len in enumerate(lengths):
        members = np.concatenate([carried, np.flatnonzero(natural == j)])
        carried = np.zeros(0, dtype=np.int64)
        if members.size == 0:
            continue
        query_len = round_up(int(query_lens[members].max()), QUERY_LEN_MULTIPLE)
        batch_size = sizing.batch_size(query_len, int(passage_len), group_size)
        if members.size < batch_size:
            if j + 1 < len(lengths):
                carried = members
            continue
        example_buckets[members] = len(buckets)
        buckets.append(TrainBucket(query_len, int(passage_len), batch_size))
    return example_buckets, tuple(buckets)


def batches_per_epoch(example_buckets: np.ndarray, buckets: Sequence[TrainBucket]) -> int:
    counts = np.bincount(example_buckets[example_buckets >= 0], minlength=len(buckets))
    return int(sum(int(c) // b.batch_size for c, b in zip(counts, buckets, strict=True)))


def epoch_plan(
    example_buckets: np.ndarray, buckets: Sequence[TrainBucket], *, seed: int, epoch: int
) -> list[PlannedBatch]:
    """The epoch's global batches, a pure function of (seed, epoch) (FlagEmbedding refresh_epoch).

    Examples are shuffled within each bucket and cut into consecutive chunks of the bucket's
    batch size; an incomplete last chunk is dropped (static shapes), and the chunks are shuffled
    so the buckets interleave. Each example appears at most once per epoch.
    """
    rng = np.random.default_rng((seed, epoch))
    chunks: list[PlannedBatch] = []
    for index, bucket in enumerate(buckets):
        members = rng.permutation(np.flatnonzero(example_buckets == index))
        for start in range(0, members.size - bucket.batch_size + 1, bucket.batch_size):
            chunks.append(PlannedBatch(index, members[start : start + bucket.batch_size]))
    return [chunks[i] for i in rng.permutation(len(chunks))]


def measure_lengths(
    records: Sequence[Record],
    tokenizer: Any,
    data: DataConfig,
    *,
    chunk_size: int = 4096,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """([N] query lengths, [N] longest-passage lengths) in tokens, int32.

    The texts are measured as the loader will feed them: with instruction prefixes and special
    tokens, truncated to the max lengths. `progress` shows a tqdm bar (default: for > 10k texts).
    """
    queries: list[str] = []
    passages: list[str] = []
    owners: list[int] = []
    for index, record in enumerate(records):
        query, texts = apply_instructions(
            record.query, record.pos + record.neg, record.prompt, data
        )
        queries.append(query)
        passages.extend(texts)
        owners.extend([index] * len(texts))
    if progress is None:
        progress = len(queries) + len(passages) > 10_000
    query_lens = _token_lengths(
        tokenizer, queries, data.query_max_len, chunk_size, progress, "queries"
    )
    each = _token_lengths(
        tokenizer, passages, data.passage_max_len, chunk_size, progress, "passages"
    )
    passage_lens = np.zeros(len(records), dtype=np.int32)
    np.maximum.at(passage_lens, np.asarray(owners, dtype=np.int64), each)
    return query_lens, passage_lens


def _token_lengths(
    tokenizer: Any, texts: list[str], max_len: int, chunk_size: int, progress: bool, what: str
) -> np.ndarray:
    starts = range(0, len(texts), chunk_size)
    if progress:
        starts = tqdm(starts, desc=f"measuring {what}", unit="chunk")
    lengths = np.zeros(len(texts), dtype=np.int32)
    for start in starts:
        ids = tokenize(tokenizer, texts[start : start + chunk_size], max_len)
        lengths[start : start + len(ids)] = [len(x) for x in ids]
    return lengths
