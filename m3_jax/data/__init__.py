"""Training data: jsonl records, group sampling, length buckets and the grain input pipeline."""

from m3_jax.data.buckets import (
    BatchSizing,
    PlannedBatch,
    TrainBucket,
    assign_buckets,
    epoch_plan,
    flag_embedding_batch_size,
    measure_lengths,
    passage_bucket_lengths,
)
from m3_jax.data.pipeline import LoaderPosition, LoaderSettings, TrainLoader, to_global_batch
from m3_jax.data.records import DataError, Record, read_records
from m3_jax.data.sampler import Group, apply_instructions, sample_group

__all__ = [
    "BatchSizing",
    "DataError",
    "Group",
    "LoaderPosition",
    "LoaderSettings",
    "PlannedBatch",
    "Record",
    "TrainBucket",
    "TrainLoader",
    "apply_instructions",
    "assign_buckets",
    "epoch_plan",
    "flag_embedding_batch_size",
    "measure_lengths",
    "passage_bucket_lengths",
    "read_records",
    "sample_group",
    "to_global_batch",
]
