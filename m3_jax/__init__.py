"""m3_jax: BGE-M3 (dense, sparse and multi-vector retrieval) in JAX/Flax."""

from m3_jax.config import ModelConfig
from m3_jax.inference import M3Embedder
from m3_jax.model import M3Model, M3Output

__all__ = ["M3Embedder", "M3Model", "M3Output", "ModelConfig"]
__version__ = "0.1.0"
