"""The M3 model: XLM-R encoder (encoder.py), attention (attention.py), heads and M3Model."""

from m3_jax.model.encoder import Encoder, roberta_position_ids
from m3_jax.model.m3 import M3Model, M3Output

__all__ = ["Encoder", "M3Model", "M3Output", "roberta_position_ids"]
