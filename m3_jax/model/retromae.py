"""RetroMAEModel: the XLM-R encoder, its tied masked-LM head, and RetroMAE's one-layer decoder.

RetroMAE (Xiao et al., EMNLP 2022) pre-trains the encoder so that its [CLS] state carries the
text: the encoder reads a lightly masked copy and predicts the masked tokens (MLM); a decoder of
one transformer layer then reconstructs every token of a heavily masked copy from that [CLS]
state ("enhanced decoding"):
- the query stream is the [CLS] state at every position, through the embedding block's
  positions, token type and LayerNorm (transformers' `inputs_embeds` path);
- keys and values are the [CLS] state at position 0 followed by the embeddings of the original,
  unmasked tokens at positions 1..;
- query i attends through its own mask: one of a set of sampled masks, with position i itself
  hidden as well, so no token sees itself.
The decoder layer has an encoder layer's geometry and parameter names (FlagEmbedding's
`BertLayerForDecoder`), so it converts with the same tensor mappings. Its output goes through the
same MLM head. Only the encoder is kept after pre-training.

Decoder masks are compact: `mask_set` [batch, masks, length] (True = hidden) and `mask_choice`
[batch, length] (which mask each query drew). The [length, length] matrix of each text is built
a block of `attention_chunk_size` queries at a time, so an 8192-token text never holds it whole.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3_jax.config import ModelConfig
from m3_jax.model.attention import masked_softmax_attention
from m3_jax.model.encoder import Encoder, EncoderLayer
from m3_jax.model.layers import Dense, LayerNorm, gelu, make_param

Params = dict[str, Any]


class MLMHead(nnx.Module):
    """`XLMRobertaLMHead`: dense, GELU, LayerNorm, then the word-embedding table (tied) + bias."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dt = dict(param_dtype=jnp.dtype(config.param_dtype), dtype=jnp.dtype(config.dtype))
        e = config.hidden_size
        self.dtype = jnp.dtype(config.dtype)
        self.dense = Dense(
            (e,), (e,), ("embed",), (None,), stddev=config.initializer_range, rngs=rngs, **dt
        )
        self.layer_norm = LayerNorm(e, config.layer_norm_eps, **dt)
        self.bias = make_param(None, (config.vocab_size,), ("vocab",), dt["param_dtype"], "zeros")

    def __call__(self, hidden: jax.Array, word_embeddings: jax.Array) -> jax.Array:
        """[..., hidden] states → [..., vocab] float32 logits."""
        x = self.layer_norm(gelu(self.dense(hidden)))
        logits = jnp.einsum(
            "...e,ve->...v",
            x,
            word_embeddings.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits + self.bias[...].astype(jnp.float32)


def decoder_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    mask_set: jax.Array,
    mask_choice: jax.Array,
    *,
    chunk_size: int,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Attention where query i sees key j iff j is a real token, j != i, and the mask query i
    drew (`mask_set[b, mask_choice[b, i]]`) leaves j visible. q, k, v: [batch, L, heads, dim];
    key_mask: [batch, L]; returns [batch, L, heads, dim]. Queries run in blocks of `chunk_size`."""
    batch, length, heads, head_dim = q.shape
    size = min(chunk_size, length)
    num_chunks = -(-length // size)
    padded = num_chunks * size
    q = jnp.pad(q, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
    choice = jnp.pad(mask_choice, ((0, 0), (0, padded - length)))
    q_chunks = q.reshape(batch, num_chunks, size, heads, head_dim).swapaxes(0, 1)
    choice_chunks = choice.reshape(batch, num_chunks, size).swapaxes(0, 1)
    keys = jnp.arange(length)

    def one_chunk(args):
        index, q_chunk, choice_chunk = args
        hidden = jax.vmap(lambda masks, drawn: masks[drawn])(mask_set, choice_chunk)  # [b, c, L]
        rows = index * size + jnp.arange(size)
        allowed = ~hidden & key_mask[:, None, :].astype(bool) & (rows[:, None] != keys)[None]
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        return masked_softmax_attention(q_chunk, k, v, allowed, dropout_rate, rng)

    out = jax.lax.map(one_chunk, (jnp.arange(num_chunks), q_chunks, choice_chunks))
    return out.swapaxes(0, 1).reshape(batch, padded, heads, head_dim)[:, :length]


class RetroMAEModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.lm_head = MLMHead(config, rngs=rngs)
        self.decoder = EncoderLayer(config, rngs=rngs)

    def mlm_logits(self, hidden: jax.Array) -> jax.Array:
        """[..., hidden] → [..., vocab] float32 logits of the tied MLM head."""
        return self.lm_head(hidden, self.encoder.embeddings.word_embeddings.embedding[...])

    def decode(
        self,
        cls_hidden: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        mask_set: jax.Array,
        mask_choice: jax.Array,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Enhanced decoding (module docstring): [batch, hidden] [CLS] states and the original
        [batch, L] ids → [batch, L, hidden] decoder states, one per position to reconstruct."""
        rngs = [None] * 5 if dropout_rng is None else list(jax.random.split(dropout_rng, 5))
        embeddings, layer = self.encoder.embeddings, self.decoder
        cls = cls_hidden[:, None, :]
        context = jnp.concatenate(
            [cls.astype(jnp.dtype(self.config.dtype)), embeddings(input_ids, rngs[0])[:, 1:]], 1
        )
        query = embeddings.of_vectors(jnp.broadcast_to(cls, context.shape), rngs[1])
        attn = layer.attention
        heads = decoder_attention(
            attn.query(query),
            attn.key(context),
            attn.value(context),
            attention_mask,
            mask_set,
            mask_choice,
            chunk_size=self.config.attention_chunk_size,
            dropout_rate=attn.dropout_rate,
            dropout_rng=rngs[2],
        )
        return layer.residual_and_feed_forward(query, attn.output(heads), rngs[3:])


def retromae_params(
    config: ModelConfig, encoder: Params, mlm_head: Params | None, seed: int
) -> Params:
    """RetroMAEModel params from an encoder's and, where the source has one, its MLM head's
    (XLM-R's); the decoder layer, and a missing MLM head, start from the model's random init
    (N(0, initializer_range) weights, as FlagEmbedding's `_init_weights`)."""
    rngs, float32 = nnx.Rngs(seed), config.replace(param_dtype="float32")
    fresh = {"decoder": nnx.to_pure_dict(nnx.state(EncoderLayer(float32, rngs=rngs), nnx.Param))}
    if mlm_head is None:
        fresh["lm_head"] = nnx.to_pure_dict(nnx.state(MLMHead(float32, rngs=rngs), nnx.Param))
    fresh = jax.tree.map(np.asarray, fresh)
    return {"encoder": encoder, "lm_head": mlm_head, **fresh}
