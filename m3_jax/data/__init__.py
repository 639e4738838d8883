"""Training data: preparing jsonl into TFDS / ArrayRecord sets, the lazy batch plan, group
sampling and the grain input pipeline."""

from m3_jax.data.pipeline import LoaderPosition, TrainLoader, to_global_batch
from m3_jax.data.plan import BatchSizing, TrainBucket, plan_buckets
from m3_jax.data.prepare import PrepareSettings
from m3_jax.data.prepared import Manifest, PreparedSet, read_manifest
from m3_jax.data.records import Record, iter_records
from m3_jax.data.sampler import apply_instructions, sample_group
from m3_jax.data.sources import open_sources

__all__ = [
    "BatchSizing",
    "LoaderPosition",
    "Manifest",
    "PrepareSettings",
    "PreparedSet",
    "Record",
    "TrainBucket",
    "TrainLoader",
    "apply_instructions",
    "iter_records",
    "open_sources",
    "plan_buckets",
    "read_manifest",
    "sample_group",
    "to_global_batch",
]
