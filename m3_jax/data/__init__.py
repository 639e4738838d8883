"""Training data: preparing jsonl into TFDS / ArrayRecord sets, the lazy batch plan, group
sampling and the grain input pipeline."""

from m3_jax.lazy_exports import lazy_exports

_EXPORTS = {
    "BatchSizing": "m3_jax.data.plan",
    "LoaderPosition": "m3_jax.data.pipeline",
    "Manifest": "m3_jax.data.prepared",
    "PrepareSettings": "m3_jax.data.prepare",
    "PreparedSet": "m3_jax.data.prepared",
    "Record": "m3_jax.data.records",
    "TrainBucket": "m3_jax.data.plan",
    "TrainLoader": "m3_jax.data.pipeline",
    "apply_instructions": "m3_jax.data.sampler",
    "iter_records": "m3_jax.data.records",
    "open_sources": "m3_jax.data.sources",
    "plan_buckets": "m3_jax.data.plan",
    "read_manifest": "m3_jax.data.prepared",
    "sample_group": "m3_jax.data.sampler",
    "to_global_batch": "m3_jax.data.pipeline",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
