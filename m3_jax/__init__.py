"""m3_jax: BGE-M3 (dense, sparse and multi-vector retrieval) in JAX/Flax."""

from m3_jax.lazy_exports import lazy_exports

_EXPORTS = {
    "M3Embedder": "m3_jax.inference",
    "M3Model": "m3_jax.model",
    "M3Output": "m3_jax.model",
    "ModelConfig": "m3_jax.config",
    "Reranker": "m3_jax.reranker",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
