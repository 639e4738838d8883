"""The training input pipeline: prepared sets -> bucketed, padded host batches -> global arrays.

A global batch is a pure function of (seed, epoch, step): which bucket and which examples come
from the lazy plan of (seed, epoch) (`m3_jax.data.plan`), and row r's group is sampled with
`default_rng((seed, epoch, step, r))`. Each process reads only its own rows from the ArrayRecord
files, so the data do not depend on the host count, and the loader position is two integers
(`LoaderPosition`) that a checkpoint stores as JSON. grain runs the batch building in background
threads, ahead of the training step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from m3_jax.bucketing import pad
from m3_jax.config import DataConfig
from m3_jax.data.plan import (
    BatchShape,
    BatchSizing,
    TrainBucket,
    batch_of_step,
    batch_positions,
    plan_buckets,
)
from m3_jax.data.prepared import PreparedSet
from m3_jax.data.sampler import sample_group
from m3_jax.input_files import InputError
from m3_jax.tokenization import truncate

HostBatch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class LoaderPosition:
    """Where the loader is: `step` is the index of the next batch in epoch `epoch`'s plan."""

    epoch: int = 0
    step: int = 0

    def to_json(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    @classmethod
    def from_json(cls, obj: Any) -> LoaderPosition:
        if not isinstance(obj, Mapping):
            raise ValueError(f"loader position: expected a JSON object, got {type(obj).__name__}")
        values = {}
        for field in ("epoch", "step"):
            value = obj.get(field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"loader position: field '{field}': expected a non-negative integer, "
                    f"got {value!r}"
                )
            values[field] = value
        return cls(**values)


# grain builds batches in this many background threads, this many batches ahead of the step.
NUM_THREADS = 2
PREFETCH = 4


# (host batch, one seed tuple per row: (seed, epoch, step, global row)) -> the batch a step takes.
BatchTransform = Callable[[HostBatch, list[tuple[int, ...]]], HostBatch]


class TrainLoader:
    """Host batches for process `process_index` of `process_count`, for any (epoch, step), read
    from prepared sets (`m3_jax.data.prepared`).

    data: what shapes the batches; seed: the plan's and the groups' seed; batch_multiple: global
    batch sizes are multiples of it (`data.batch_multiple` resolved; normally the number of
    data-parallel shards, and always a multiple of the process count); pad_id: the tokenizer's;
    transform: turns each host batch into what the step takes (RetroMAE's masks), drawing its
    randomness from the per-row seeds so that a resumed run sees the same batches.
    Nothing is read at construction: the plan comes from the manifests' counts.
    """

    def __init__(
        self,
        sources: Sequence[PreparedSet],
        data: DataConfig,
        *,
        seed: int,
        batch_multiple: int,
        pad_id: int,
        process_index: int = 0,
        process_count: int = 1,
        transform: BatchTransform | None = None,
    ) -> None:
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if batch_multiple % process_count:
            raise ValueError(
                f"batch_multiple {batch_multiple} is not a multiple of "
                f"process_count {process_count}, so a global batch cannot split evenly"
            )
        self.sources = list(sources)
        self.data = data
        self.seed = seed
        self.sizing = BatchSizing.from_data(data, batch_multiple)
        self.process_index = process_index
        self.process_count = process_count
        self.pad_id = pad_id
        self.transform = transform
        self.num_records = sum(d.records for s in sources for d in s.manifest.datasets)
        self.buckets, self.num_unused_examples = plan_buckets(
            [s.manifest for s in sources], data, self.sizing
        )
        self.steps_per_epoch = sum(b.batches for b in self.buckets)
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{self.num_records} records: no length bucket holds enough of them for one "
                f"global batch with {self.sizing}; lower the batch size or add data"
            )

    def bucket_shapes(self) -> list[BatchShape]:
        """Every static batch shape the plan produces (one compiled program each)."""
        return sorted({b.shape for b in self.buckets})

    def normalize(self, position: LoaderPosition) -> LoaderPosition:
        """The same position with a finished epoch written as the start of the next one."""
        if position.step > self.steps_per_epoch:
            raise ValueError(
                f"loader position step {position.step} is past the end of an epoch "
                f"({self.steps_per_epoch} batches); was the data or batch sizing changed?"
            )
        if position.step == self.steps_per_epoch:
            return LoaderPosition(position.epoch + 1, 0)
        return position

    def batch_shape(self, position: LoaderPosition) -> BatchShape:
        """The static shape of global batch `position`."""
        return self._bucket_of(self.normalize(position))[0].shape

    def _bucket_of(self, position: LoaderPosition) -> tuple[TrainBucket, int, int]:
        index, batch = batch_of_step(self.buckets, self.seed, position.epoch, position.step)
        return self.buckets[index], index, batch

    def host_batch(self, position: LoaderPosition) -> HostBatch:
        """This process's rows of global batch `position` ([b] = B / process_count queries, G
        and the lengths from `batch_shape(position)`):

        query_ids, query_mask: [b, Lq] int32; passage_ids, passage_mask: [b*G, Lp] int32, where
        row r's passages are rows r*G .. r*G+G-1 and the first is its positive; with teacher
        scores, teacher_scores: [b, G] float32. Padding is on the right with the pad id.
        """
        return self._shaped_batch(position)[1]

    def _shaped_batch(self, position: LoaderPosition) -> tuple[BatchShape, HostBatch]:
        position = self.normalize(position)
        bucket, index, batch = self._bucket_of(position)
        d = self.data
        count = bucket.batch_size // self.process_count
        rows = range(self.process_index * count, (self.process_index + 1) * count)
        positions = batch_positions(bucket, index, self.seed, position.epoch, batch, rows)
        examples = self._read_examples(bucket, positions)
        source = self.sources[bucket.segments[0].source]
        passage_ids, scores = [], []
        for row, example in zip(rows, examples, strict=True):
            rng = np.random.default_rng((self.seed, position.epoch, position.step, row))
            pos, neg = sample_group(
                len(example["pos"]),
                len(example["neg"]),
                bucket.shape.group_size,
                rng,
                neg_scores=example["neg_scores"],
                sort_negatives_by_teacher=d.sort_negatives_by_teacher,
            )
            passage_ids += [example["pos"][pos], *example["neg"][neg]]
            if d.knowledge_distillation:
                scores.append(
                    np.concatenate([example["pos_scores"][[pos]], example["neg_scores"][neg]])
                )
        queries = [truncate(e["query_ids"], d.query_max_len) for e in examples]
        passages = [truncate(ids, d.passage_max_len) for ids in source.passages(passage_ids)]
        batch_arrays = {}
        batch_arrays["query_ids"], batch_arrays["query_mask"] = pad(
            queries, len(queries), bucket.shape.query_len, self.pad_id
        )
        batch_arrays["passage_ids"], batch_arrays["passage_mask"] = pad(
            passages, len(passages), bucket.shape.passage_len, self.pad_id
        )
        if d.knowledge_distillation:
            batch_arrays["teacher_scores"] = np.stack(scores).astype(np.float32)
        if self.transform is not None:
            seeds = [(self.seed, position.epoch, position.step, row) for row in rows]
            batch_arrays = self.transform(batch_arrays, seeds)
        return bucket.shape, batch_arrays

    def _read_examples(self, bucket: TrainBucket, positions: np.ndarray) -> list[dict]:
        which, indices = bucket.locate(positions)
        examples: list[dict] = [{}] * len(positions)
        for k in np.unique(which):
            segment = bucket.segments[k]
            rows = np.flatnonzero(which == k)
            read = self.sources[segment.source].examples(segment.split, indices[rows])
            for row, example in zip(rows, read, strict=True):
                examples[row] = example
        return examples

    def _item(self, epoch: int, step: int) -> tuple[LoaderPosition, BatchShape, HostBatch]:
        shape, batch = self._shaped_batch(LoaderPosition(epoch, step))
        return self.normalize(LoaderPosition(epoch, step + 1)), shape, batch

    def iterate(
        self, start: LoaderPosition = LoaderPosition(), num_epochs: int | None = None
    ) -> Iterator[tuple[LoaderPosition, BatchShape, HostBatch]]:
        """(position after the batch, its shape, host batch) from `start` on, until epoch
        `num_epochs` (forever if None). Saving the yielded position and restarting from it
        continues with exactly the batches an uninterrupted run would have seen."""
        position = self.normalize(start)
        while num_epochs is None or position.epoch < num_epochs:
            epoch = position.epoch
            dataset = grain.MapDataset.range(position.step, self.steps_per_epoch).map(
                functools.partial(self._item, epoch)
            )
            options = grain.ReadOptions(num_threads=NUM_THREADS, prefetch_buffer_size=PREFETCH)
            iterator = iter(dataset.to_iter_dataset(options))
            try:
                yield from iterator
            finally:
                iterator.close()  # stops the prefetch threads at once if the caller stops early
            position = LoaderPosition(epoch + 1, 0)


def to_global_batch(
    host_batch: Mapping[str, np.ndarray],
    sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding],
    process_count: int | None = None,
) -> dict[str, jax.Array]:
    """Global arrays from every process's host batch; the batch axis (0) grows by process_count.

    `sharding` is one sharding for every key or one per key; it should split axis 0 over the
    data-parallel mesh axes. Row blocks of the same process stay together, so query r and its
    passages r*G..r*G+G-1 stay aligned in the global arrays.
    """
    process_count = jax.process_count() if process_count is None else process_count
    out = {}
    for key, local in host_batch.items():
        if isinstance(sharding, Mapping):
            if key not in sharding:
                raise KeyError(f"no sharding given for batch key {key!r}; have {sorted(sharding)}")
            key_sharding = sharding[key]
        else:
            key_sharding = sharding
        global_shape = (local.shape[0] * process_count, *local.shape[1:])
        out[key] = jax.make_array_from_process_local_data(key_sharding, local, global_shape)
    return out
