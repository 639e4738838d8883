"""RerankerModel: a cross-encoder, the XLM-R encoder plus RoBERTa's sequence-classification head.

The head of transformers' `XLMRobertaForSequenceClassification` (bge-reranker-base / -large /
-v2-m3): the last hidden state of `<s>` → dense (hidden → hidden) → tanh → out_proj
(hidden → 1). Its dropouts (before each projection) are identity at inference, and a reranker is
only run here, so the module has none. The single output is the raw relevance logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3_jax.config import ModelConfig
from m3_jax.model.encoder import Encoder
from m3_jax.model.layers import Dense


class ClassificationHead(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dt = dict(param_dtype=jnp.dtype(config.param_dtype), dtype=jnp.dtype(config.dtype))
        e, std = config.hidden_size, config.initializer_range
        self.dense = Dense((e,), (e,), ("embed",), (None,), stddev=std, rngs=rngs, **dt)
        self.out_proj = Dense((e,), (1,), ("embed",), (None,), stddev=std, rngs=rngs, **dt)

    def __call__(self, first_token: jax.Array) -> jax.Array:
        """[batch, hidden] → [batch] float32 logits."""
        logits = self.out_proj(jnp.tanh(self.dense(first_token)))
        return logits[:, 0].astype(jnp.float32)


class RerankerModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.classifier = ClassificationHead(config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids, attention_mask: [batch, length] `<s> query </s></s> passage </s>` pairs →
        [batch] float32 relevance logits."""
        hidden = self.encoder(input_ids, attention_mask)
        return self.classifier(hidden[:, 0])
