"""The training input pipeline: records -> bucketed, tokenized, padded host batches -> global arrays.

A global batch is a pure function of (seed, epoch, step): the epoch's plan comes from
(seed, epoch), and row r's group is sampled with `default_rng((seed, epoch, step, r))`. Each process
builds only its own rows, so the data do not depend on the host count, and the loader position is
two integers (`LoaderPosition`) that a checkpoint stores as JSON. grain runs the batch building
in background threads, ahead of the training step.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from m3_jax.bucketing import lengths_up_to, pad
from m3_jax.config import DataConfig
from m3_jax.data.plan import (
    BatchSizing,
    PlannedBatch,
    assign_buckets,
    batches_per_epoch,
    epoch_plan,
    measure_lengths,
)
from m3_jax.data.records import Record
from m3_jax.data.sampler import apply_instructions, check_record_for_group, sample_group
from m3_jax.input_files import InputError
from m3_jax.tokenization import tokenize

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


class TrainLoader:
    """Host batches for process `process_index` of `process_count`, for any (epoch, step).

    data: what shapes the batches; seed: the plan's and the groups' seed; batch_multiple: global
    batch sizes are multiples of it (`data.batch_multiple` resolved; normally the number of
    data-parallel shards, and always a multiple of the process count).
    """

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Any,
        data: DataConfig,
        *,
        seed: int,
        batch_multiple: int,
        process_index: int = 0,
        process_count: int = 1,
        progress: bool | None = None,
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
        needs_scores = data.knowledge_distillation or data.sort_negatives_by_teacher
        for record in records:
            check_record_for_group(record, data.group_size, needs_scores=needs_scores)
        self.records = list(records)
        self.data = data
        self.seed = seed
        self.sizing = BatchSizing.from_data(data, batch_multiple)
        self.process_index = process_index
        self.process_count = process_count
        self.pad_id = int(tokenizer.pad_token_id)
        self.tokenizer = tokenizer
        # A transformers fast tokenizer sets truncation state on its shared Rust object before
        # each call, so concurrent calls with different max lengths would race.
        self._tokenizer_lock = threading.Lock()
        self._plans: dict[int, list[PlannedBatch]] = {}
        self._plan_lock = threading.Lock()
        self.query_lens, self.passage_lens = measure_lengths(
            self.records, tokenizer, data, progress=progress
        )
        self.example_buckets, self.buckets = assign_buckets(
            self.query_lens,
            self.passage_lens,
            lengths=lengths_up_to(data.passage_buckets, data.passage_max_len),
            group_size=data.group_size,
            sizing=self.sizing,
        )
        self.steps_per_epoch = batches_per_epoch(self.example_buckets, self.buckets)
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{len(self.records)} records: no length bucket holds enough of them for one "
                f"global batch with {self.sizing}; lower the batch size or add data"
            )

    @property
    def num_unused_examples(self) -> int:
        """Examples in no bucket, because their bucket could not fill one global batch."""
        return int((self.example_buckets < 0).sum())

    def bucket_shapes(self) -> list[tuple[int, int, int]]:
        """Every global (batch_size, query_len, passage_len) the plan produces, for compiling."""
        return [(b.batch_size, b.query_len, b.passage_len) for b in self.buckets]

    def plan(self, epoch: int) -> list[PlannedBatch]:
        """Epoch `epoch`'s global batches (cached: grain threads ask for the same epoch)."""
        with self._plan_lock:
            if epoch not in self._plans:
                if len(self._plans) >= 2:
                    self._plans.pop(min(self._plans))
                self._plans[epoch] = epoch_plan(
                    self.example_buckets, self.buckets, seed=self.seed, epoch=epoch
                )
            return self._plans[epoch]

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

    def host_batch(self, position: LoaderPosition) -> HostBatch:
        """This process's rows of global batch `position` ([b] = B / process_count queries):

        query_ids, query_mask: [b, Lq] int32; passage_ids, passage_mask: [b*G, Lp] int32, where
        row r's passages are rows r*G .. r*G+G-1 and the first is its positive; with teacher
        scores, teacher_scores: [b, G] float32. Padding is on the right with the tokenizer's pad id.
        """
        position = self.normalize(position)
        planned = self.plan(position.epoch)[position.step]
        bucket = self.buckets[planned.bucket_index]
        d = self.data
        rows = bucket.batch_size // self.process_count
        first = self.process_index * rows
        queries, passages, scores = [], [], []
        for row in range(first, first + rows):
            record = self.records[planned.example_indices[row]]
            rng = np.random.default_rng((self.seed, position.epoch, position.step, row))
            group = sample_group(
                record, d.group_size, rng, sort_negatives_by_teacher=d.sort_negatives_by_teacher
            )
            query, texts = apply_instructions(record.query, group.passages, record.prompt, d)
            queries.append(query)
            passages.extend(texts)
            if d.knowledge_distillation:
                scores.append(group.teacher_scores)
        with self._tokenizer_lock:
            query_tokens = tokenize(self.tokenizer, queries, d.query_max_len)
            passage_tokens = tokenize(self.tokenizer, passages, d.passage_max_len)
        # measure_lengths tokenized the same texts, so every sequence fits its bucket.
        batch = {}
        batch["query_ids"], batch["query_mask"] = pad(
            query_tokens, len(query_tokens), bucket.query_len, self.pad_id
        )
        batch["passage_ids"], batch["passage_mask"] = pad(
            passage_tokens, len(passage_tokens), bucket.passage_len, self.pad_id
        )
        if d.knowledge_distillation:
            batch["teacher_scores"] = np.stack(scores).astype(np.float32)
        return batch

    def _item(self, epoch: int, step: int) -> tuple[LoaderPosition, HostBatch]:
        batch = self.host_batch(LoaderPosition(epoch, step))
        return self.normalize(LoaderPosition(epoch, step + 1)), batch

    def iterate(
        self, start: LoaderPosition = LoaderPosition(), num_epochs: int | None = None
    ) -> Iterator[tuple[LoaderPosition, HostBatch]]:
        """(position after the batch, host batch) from `start` on, until epoch `num_epochs`
        (forever if None). Saving the yielded position and restarting from it continues with
        exactly the batches an uninterrupted run would have seen."""
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
