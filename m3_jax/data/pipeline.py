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

from m3_jax.data.buckets import (
    DEFAULT_PASSAGE_LENGTHS,
    BatchSizing,
    PlannedBatch,
    assign_buckets,
    batches_per_epoch,
    epoch_plan,
    measure_lengths,
    passage_bucket_lengths,
)
from m3_jax.data.records import DataError, Record
from m3_jax.data.sampler import (
    apply_instructions,
    check_instruction_format,
    check_record_for_group,
    sample_group,
)
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


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    """Everything that shapes the batches (apart from the records and the tokenizer).

    sizing: per-bucket global batch sizes; its `batch_multiple` must be a multiple of the
        process count (and is normally the number of data-parallel shards).
    bucket_lengths: candidate passage lengths, capped at `passage_max_len`.
    with_teacher_scores: add `teacher_scores` [b, G] to each batch (every record needs scores).
    sort_negatives_by_teacher: order each group's negatives by teacher score, descending
        (old FlagEmbedding; matters for the m3 KD loss).
    num_threads, prefetch: grain threads building batches ahead, and how many batches ahead.
    """

    sizing: BatchSizing
    seed: int = 0
    group_size: int = 8
    query_max_len: int = 32
    passage_max_len: int = 128
    bucket_lengths: tuple[int, ...] = DEFAULT_PASSAGE_LENGTHS
    merge_small_buckets: bool = True
    query_instruction: str | None = None
    passage_instruction: str | None = None
    instruction_format: str = "{}{}"
    with_teacher_scores: bool = False
    sort_negatives_by_teacher: bool = False
    num_threads: int = 2
    prefetch: int = 4

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"LoaderSettings.seed must be non-negative, got {self.seed}")
        for name in ("group_size", "query_max_len", "passage_max_len"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"LoaderSettings.{name} must be positive, got {getattr(self, name)}"
                )
        # <s> and </s> take two tokens; a shorter limit leaves no room for text.
        if min(self.query_max_len, self.passage_max_len) < 3:
            raise ValueError("query_max_len and passage_max_len must be at least 3")
        check_instruction_format(self.instruction_format)


class TrainLoader:
    """Host batches for process `process_index` of `process_count`, for any (epoch, step)."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Any,
        settings: LoaderSettings,
        *,
        process_index: int = 0,
        process_count: int = 1,
        progress: bool | None = None,
    ) -> None:
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if settings.sizing.batch_multiple % process_count:
            raise ValueError(
                f"batch_multiple {settings.sizing.batch_multiple} is not a multiple of "
                f"process_count {process_count}, so a global batch cannot split evenly"
            )
        needs_scores = settings.with_teacher_scores or settings.sort_negatives_by_teacher
        for record in records:
            check_record_for_group(record, settings.group_size, needs_scores=needs_scores)
        self.records = list(records)
        self.settings = settings
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
            self.records,
            tokenizer,
            query_max_len=settings.query_max_len,
            passage_max_len=settings.passage_max_len,
            query_instruction=settings.query_instruction,
            passage_instruction=settings.passage_instruction,
            instruction_format=settings.instruction_format,
            progress=progress,
        )
        self.example_buckets, self.buckets = assign_buckets(
            self.query_lens,
            self.passage_lens,
            lengths=passage_bucket_lengths(settings.passage_max_len, settings.bucket_lengths),
            group_size=settings.group_size,
            sizing=settings.sizing,
            merge_small=settings.merge_small_buckets,
        )
        self.steps_per_epoch = batches_per_epoch(self.example_buckets, self.buckets)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(self.records)} records: no length bucket holds enough of them for one "
                f"global batch with {settings.sizing}; lower the batch size or add data"
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
                    self.example_buckets, self.buckets, seed=self.settings.seed, epoch=epoch
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
        s = self.settings
        rows = bucket.batch_size // self.process_count
        first = self.process_index * rows
        queries, passages, scores = [], [], []
        for row in range(first, first + rows):
            record = self.records[planned.example_indices[row]]
            rng = np.random.default_rng((s.seed, position.epoch, position.step, row))
            group = sample_group(
                record, s.group_size, rng, sort_negatives_by_teacher=s.sort_negatives_by_teacher
            )
            query, texts = apply_instructions(
                record.query,
                group.passages,
                query_instruction=s.query_instruction,
                passage_instruction=s.passage_instruction,
                prompt=record.prompt,
                instruction_format=s.instruction_format,
            )
            queries.append(query)
            passages.extend(texts)
            if s.with_teacher_scores:
                scores.append(group.teacher_scores)
        with self._tokenizer_lock:
            query_tokens = tokenize(self.tokenizer, queries, s.query_max_len)
            passage_tokens = tokenize(self.tokenizer, passages, s.passage_max_len)
        batch = {}
        batch["query_ids"], batch["query_mask"] = self._pad(query_tokens, bucket.query_len)
        batch["passage_ids"], batch["passage_mask"] = self._pad(passage_tokens, bucket.passage_len)
        if s.with_teacher_scores:
            batch["teacher_scores"] = np.stack(scores).astype(np.float32)
        return batch

    def _pad(self, token_ids: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(token_ids), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(token_ids), length), dtype=np.int32)
        for row, seq in enumerate(token_ids):
            if len(seq) > length:
                # measure_lengths tokenized the same texts, so this means the tokenizer changed.
                raise RuntimeError(
                    f"a sequence of {len(seq)} tokens does not fit its bucket length {length}; "
                    "the tokenizer must be the one the loader measured lengths with"
                )
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask

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
            if self.settings.num_threads and self.settings.prefetch:
                options = grain.ReadOptions(
                    num_threads=self.settings.num_threads,
                    prefetch_buffer_size=self.settings.prefetch,
                )
                iterator = iter(dataset.to_iter_dataset(options))
            else:
                # In the caller's thread (older grain cannot make a pool of zero threads).
                iterator = iter(dataset[i] for i in range(len(dataset)))
            try:
                yield from iterator
            finally:
                # Stops the prefetch threads at once if the caller stops early (newer grain).
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
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
