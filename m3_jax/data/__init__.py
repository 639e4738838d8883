"""Training data: jsonl records, group sampling, the batch plan and the grain input pipeline."""

from m3_jax.data.pipeline import LoaderPosition, TrainLoader, to_global_batch
from m3_jax.data.plan import BatchSizing, PlannedBatch, TrainBucket, assign_buckets, epoch_plan
from m3_jax.data.records import Record, read_records
from m3_jax.data.sampler import Group, apply_instructions, sample_group

__all__ = [
    "BatchSizing",
    "Group",
    "LoaderPosition",
    "PlannedBatch",
    "Record",
    "TrainBucket",
    "TrainLoader",
    "apply_instructions",
    "assign_buckets",
    "epoch_plan",
    "read_records",
    "sample_group",
    "to_global_batch",
]
