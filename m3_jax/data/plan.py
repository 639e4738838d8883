"""The training batch plan, from the prepared sets' counts alone: the buckets of static batch
shapes and the global batches of every epoch, computed lazily.

Every training batch has one of a few static shapes (`BatchShape`: global batch B, query length
Lq, passage length Lp, group size G, in-batch negatives or not) and comes from one dataset and
one length bucket (FlagEmbedding's same-dataset batching). As in FlagEmbedding's
`split_data_by_length.py`, an example's length is the longest of ALL its passages, so any
sampled group fits its bucket. A bucket's global batch size comes from a token budget or from
FlagEmbedding's per-device table, then from the dataset's FlagEmbedding fields (`batch_size`,
`type`); its group size from `type` and `train_group_size`; a dataset from a directory named
`*no_in_batch_neg` trains without in-batch negatives.

An epoch is a permutation of all full batches of all buckets, and within each bucket a
permutation of its examples cut into consecutive batches (the incomplete last one dropped), as
FlagEmbedding's `refresh_epoch` does; both permutations are grain's `index_shuffle`, evaluated
per batch and per row, so planning 10^9 examples takes no memory and no time. A dataset's
sampling weight w draws floor(w * examples / B) batches from each of its buckets per epoch:
w < 1 uses part of a fresh permutation, w > 1 runs through several.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from grain.experimental import index_shuffle

from m3_jax.bucketing import bucket_index, lengths_up_to
from m3_jax.config import DataConfig
from m3_jax.data.prepared import Manifest, PreparedDataset
from m3_jax.input_files import InputError

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
    """How a bucket's default global batch size is chosen (a dataset's own `batch_size` field,
    and the halving for symmetric types, apply on top: `TrainingDataset.batch_size`).

    token_budget: most query + passage tokens per global batch:
        floor(token_budget / (query_len + group_size * passage_len)).
    preset: "flag_embedding": FlagEmbedding's per-device table times `batch_multiple`; the
        table row is chosen by the run's group size `table_group_size` (FlagEmbedding's
        `train_group_size` argument), whatever the dataset's own group size.
    max_batch_size: an upper bound on the default global batch size.
    batch_multiple: global batch sizes are multiples of this (the number of data-parallel shards).
    Exactly one of `token_budget` and `preset` is set.
    """

    token_budget: int | None = None
    preset: str | None = None
    max_batch_size: int | None = None
    batch_multiple: int = 1
    table_group_size: int = 8

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
            max_batch_size=data.max_batch_size or None,
            batch_multiple=batch_multiple,
            table_group_size=data.group_size,
        )

    def batch_size(self, query_len: int, passage_len: int, group_size: int) -> int:
        m = self.batch_multiple
        if self.preset is not None:
            size = flag_embedding_batch_size(passage_len, self.table_group_size) * m
        else:
            per_row = query_len + group_size * passage_len
            # Round down so the budget holds, but never below one row per data-parallel shard.
            size = max(m, self.token_budget // per_row // m * m)
        if self.max_batch_size is not None:
            size = min(size, self.max_batch_size // m * m)
        return size


# Record types with a group size of their own, and the part of a type that halves the batch
# (FlagEmbedding's `_get_train_group_size` and `_get_file_batch_size`).
ONE_NEGATIVE_TYPE = "only_1neg"
CLASS_TYPE = "symmetric_class"
HALF_BATCH_TYPE_PART = "symmetric"


def file_group_size(dataset: PreparedDataset, group_size: int) -> int:
    """The group size of a dataset's batches: 2 for `only_1neg`; for `symmetric_class` one more
    than the negatives, at most `group_size` (FlagEmbedding reads the negatives of a batch's
    first record; we take the dataset's fewest, so all its batches have one static shape);
    `group_size` for any other type; without a type, the records' `train_group_size` if
    positive, else `group_size`."""
    if dataset.type == ONE_NEGATIVE_TYPE:
        return 2
    if dataset.type == CLASS_TYPE:
        return min(dataset.min_negatives + 1, group_size)
    if dataset.type is not None:
        return group_size
    if dataset.train_group_size is not None and dataset.train_group_size > 0:
        return dataset.train_group_size
    return group_size


def file_batch_size(dataset: PreparedDataset, default: int, batch_multiple: int) -> int:
    """FlagEmbedding's `_get_file_batch_size` on global sizes: the records' `batch_size`
    (per data-parallel shard) if set, else half the default for a `symmetric*` type, else the
    default (a multiple of `batch_multiple`)."""
    if dataset.batch_size is not None:
        return dataset.batch_size * batch_multiple
    if dataset.type is not None and HALF_BATCH_TYPE_PART in dataset.type:
        return max(1, default // batch_multiple // 2) * batch_multiple
    return default


@dataclasses.dataclass(frozen=True)
class TrainingDataset:
    """What FlagEmbedding trains as one dataset: one input file, or the files of one input
    directory below `data.small_threshold` examples, concatenated. `members` are (prepared
    set index, dataset) pairs; every global batch comes from one training dataset."""

    name: str
    members: tuple[tuple[int, PreparedDataset], ...]
    group_size: int
    in_batch_negatives: bool
    weight: float

    def batch_size(self, default: int, batch_multiple: int) -> int:
        # A merged set takes its members' smallest batch size, as FlagEmbedding does.
        return min(file_batch_size(d, default, batch_multiple) for _, d in self.members)


def training_datasets(
    manifests: Sequence[Manifest], data: DataConfig
) -> tuple[list[TrainingDataset], int]:
    """(the training datasets of the prepared sets, the examples `data.small_threshold` /
    `data.drop_threshold` leave out), checking that each dataset's records fill its groups.

    Files of one input directory with fewer than `small_threshold` examples are merged into one
    dataset, which is dropped below `drop_threshold` examples; a file given by itself below
    `small_threshold` is left out (FlagEmbedding's rules)."""
    weights = data.sampling_weights or (1.0,) * len(manifests)
    if len(weights) != len(manifests):
        raise ValueError(
            f"data.sampling_weights has {len(weights)} weights for {len(manifests)} "
            "data.train_files entries; give one per entry"
        )
    out: list[TrainingDataset] = []
    dropped = 0
    for source, (manifest, weight) in enumerate(zip(manifests, weights, strict=True)):
        small: dict[str, list[PreparedDataset]] = {}
        groups: list[tuple[str, list[PreparedDataset]]] = []
        for dataset in manifest.datasets:
            if dataset.records >= data.small_threshold:
                groups.append((Path(dataset.source).name, [dataset]))
            elif dataset.directory is None:
                dropped += dataset.records
            else:
                small.setdefault(dataset.directory, []).append(dataset)
        for directory, members in small.items():
            if sum(d.records for d in members) < data.drop_threshold:
                dropped += sum(d.records for d in members)
            else:
                groups.append((f"{Path(directory).name} (small files)", members))
        for name, members in groups:
            group_size = _merged_group_size(members, data.group_size)
            for dataset in members:
                _check_fills_groups(dataset, group_size, data)
            out.append(
                TrainingDataset(
                    name=f"{name} (set {source})",
                    members=tuple((source, d) for d in members),
                    group_size=group_size,
                    in_batch_negatives=not members[0].no_in_batch_neg,
                    weight=float(weight),
                )
            )
    return out, dropped


def _merged_group_size(members: Sequence[PreparedDataset], group_size: int) -> int:
    first, *rest = members
    size = file_group_size(first, group_size)
    for other in rest:
        if file_group_size(other, group_size) != size:
            raise InputError(
                f"{other.source}: group size {file_group_size(other, group_size)} (from its "
                f"type / train_group_size), but {first.source} has {size}; small files merged "
                "into one dataset (data.small_threshold) must agree on it"
            )
    return size


def _check_fills_groups(dataset: PreparedDataset, group_size: int, data: DataConfig) -> None:
    """InputError naming the first record that cannot fill a group as `data` asks."""
    if group_size > 1 and dataset.first_without_neg is not None:
        raise InputError(
            f"{dataset.first_without_neg}: field 'neg': missing or empty, but the dataset's "
            f"group size {group_size} needs {group_size - 1} negatives per query"
        )
    needs_scores = data.knowledge_distillation or data.sort_negatives_by_teacher
    if needs_scores and dataset.first_without_scores is not None:
        raise InputError(
            f"{dataset.first_without_scores}: field 'pos_scores'/'neg_scores': missing, but "
            "teacher scores are requested"
        )


class BatchShape(NamedTuple):
    """A compiled program's static batch: `batch_size` global queries of `query_len` tokens,
    each with `group_size` passages of `passage_len` tokens, scored with or without in-batch
    negatives."""

    batch_size: int
    query_len: int
    passage_len: int
    group_size: int
    in_batch_negatives: bool

    @property
    def label(self) -> str:
        """e.g. `b16_q32_p128_g8`, with `_no_in_batch_neg` when so (for logs and summaries)."""
        label = f"b{self.batch_size}_q{self.query_len}_p{self.passage_len}_g{self.group_size}"
        return label + ("" if self.in_batch_negatives else "_no_in_batch_neg")


@dataclasses.dataclass(frozen=True)
class Segment:
    """`count` examples of split `split` of prepared set `source`."""

    source: int
    split: str
    count: int


@dataclasses.dataclass(frozen=True)
class TrainBucket:
    """The examples of one training dataset that share a static batch `shape`. Its examples
    are the concatenation of `segments` (prepared buckets, in order); an epoch draws
    floor(weight * examples / batch_size) batches from it."""

    dataset: str
    shape: BatchShape
    weight: float
    segments: tuple[Segment, ...]

    @property
    def batch_size(self) -> int:
        return self.shape.batch_size

    @property
    def examples(self) -> int:
        return sum(s.count for s in self.segments)

    @property
    def batches(self) -> int:
        return int(self.weight * self.examples) // self.batch_size

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

    A prepared bucket goes to the training bucket of its dataset that holds its longest passage
    after the run's truncation (`data.passage_max_len`, `data.passage_buckets`); the query length
    of a bucket is its longest query, truncated, rounded up to a multiple of 8. A bucket too
    small for one global batch passes its examples to the dataset's next larger bucket instead
    of losing them."""
    lengths = lengths_up_to(data.passage_buckets, data.passage_max_len)
    datasets, unused = training_datasets(manifests, data)
    buckets: list[TrainBucket] = []
    for dataset in datasets:
        segments: dict[int, list[Segment]] = {}
        query_lens: dict[int, int] = {}
        for source, prepared in dataset.members:
            for b in prepared.buckets:
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
            default = sizing.batch_size(query_len, int(passage_len), dataset.group_size)
            batch_size = dataset.batch_size(default, sizing.batch_multiple)
            if sum(s.count for s in members) < batch_size:
                carried, carried_query = members, query
                continue
            carried, carried_query = [], 0
            shape = BatchShape(
                batch_size,
                query_len,
                int(passage_len),
                dataset.group_size,
                dataset.in_batch_negatives,
            )
            bucket = TrainBucket(dataset.name, shape, dataset.weight, tuple(members))
            if bucket.batches:
                buckets.append(bucket)
            else:  # a weight below 1 leaves less than one batch
                unused += bucket.examples
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
    slices of permutations of the bucket's examples, a fresh one for every pass over them
    (more than one pass per epoch with a sampling weight above 1)."""
    n = bucket.examples
    positions = []
    for r in rows:
        slot = batch * bucket.batch_size + r
        key = _seed(seed, epoch, bucket_index_, slot // n)
        positions.append(index_shuffle(slot % n, max_index=n - 1, seed=key, rounds=4))
    return np.asarray(positions, dtype=np.int64)
