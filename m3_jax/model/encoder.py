"""XLM-RoBERTa encoder in Flax NNX, numerically matching transformers' `XLMRobertaModel`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3_jax.config import ModelConfig
from m3_jax.model.attention import attention
from m3_jax.model.axes import constrain_batch
from m3_jax.model.layers import Dense, Embed, LayerNorm, dropout, gelu


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """Real tokens get positions pad+1, pad+2, ...; pads get pad (RoBERTa's rule)."""
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + pad_token_id


def _dtypes(config: ModelConfig) -> dict:
    return dict(param_dtype=jnp.dtype(config.param_dtype), dtype=jnp.dtype(config.dtype))


class Embeddings(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        std = config.initializer_range
        dt = _dtypes(config)
        self.pad_token_id = config.pad_token_id
        self.dropout_rate = config.hidden_dropout_prob
        self.word_embeddings = Embed(
            config.vocab_size, config.hidden_size, ("vocab", "embed"), stddev=std, rngs=rngs, **dt
        )
        self.position_embeddings = Embed(
            config.max_position_embeddings,
            config.hidden_size,
            (None, "embed"),
            stddev=std,
            rngs=rngs,
            **dt,
        )
        self.token_type_embeddings = Embed(
            config.type_vocab_size, config.hidden_size, (None, "embed"), stddev=std, rngs=rngs, **dt
        )
        self.layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, **dt)

    def __call__(self, input_ids: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        positions = roberta_position_ids(input_ids, self.pad_token_id)
        return self._embed(self.word_embeddings(input_ids), positions, dropout_rng)

    def of_vectors(self, vectors: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        """transformers' `inputs_embeds` path: [batch, length, hidden] vectors in place of word
        embeddings, at positions pad+1, pad+2, ... in every row (vectors carry no padding)."""
        positions = jnp.arange(vectors.shape[1], dtype=jnp.int32) + self.pad_token_id + 1
        positions = jnp.broadcast_to(positions, vectors.shape[:2])
        return self._embed(vectors.astype(self.word_embeddings.dtype), positions, dropout_rng)

    def _embed(self, x: jax.Array, positions: jax.Array, dropout_rng: jax.Array | None):
        x = (
            x
            + self.token_type_embeddings(jnp.zeros_like(positions))
            + self.position_embeddings(positions)
        )
        return dropout(self.layer_norm(x), self.dropout_rate, dropout_rng)


class SelfAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, h, d = config.hidden_size, config.num_attention_heads, config.head_dim
        kw = dict(stddev=config.initializer_range, rngs=rngs, **_dtypes(config))
        self.query = Dense((e,), (h, d), ("embed",), ("heads", "kv"), **kw)
        self.key = Dense((e,), (h, d), ("embed",), ("heads", "kv"), **kw)
        self.value = Dense((e,), (h, d), ("embed",), ("heads", "kv"), **kw)
        self.output = Dense((h, d), (e,), ("heads", "kv"), ("embed",), **kw)
        self.impl = config.attention_impl
        self.chunk_size = config.attention_chunk_size
        self.dropout_rate = config.attention_probs_dropout_prob

    def __call__(self, x: jax.Array, key_mask: jax.Array, dropout_rng: jax.Array | None):
        context = attention(
            self.query(x),
            self.key(x),
            self.value(x),
            key_mask,
            impl=self.impl,
            chunk_size=self.chunk_size,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
        )
        return self.output(context)


class EncoderLayer(nnx.Module):
    """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + W2·gelu(W1·x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        dt = _dtypes(config)
        kw = dict(stddev=config.initializer_range, rngs=rngs, **dt)
        self.attention = SelfAttention(config, rngs=rngs)
        self.attention_layer_norm = LayerNorm(e, config.layer_norm_eps, **dt)
        self.intermediate = Dense((e,), (m,), ("embed",), ("mlp",), **kw)
        self.output = Dense((m,), (e,), ("mlp",), ("embed",), **kw)
        self.output_layer_norm = LayerNorm(e, config.layer_norm_eps, **dt)
        self.dropout_rate = config.hidden_dropout_prob

    def __call__(self, x: jax.Array, key_mask: jax.Array, dropout_rng: jax.Array | None):
        rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
        return self.residual_and_feed_forward(x, self.attention(x, key_mask, rngs[0]), rngs[1:])

    def residual_and_feed_forward(
        self, x: jax.Array, attn: jax.Array, rngs: list[jax.Array | None]
    ) -> jax.Array:
        """Everything after the attention: LN(x + attn), then the FFN block with its residual
        (two dropout keys). RetroMAE's decoder layer shares it."""
        x = self.attention_layer_norm(x + dropout(attn, self.dropout_rate, rngs[0]))
        hidden = gelu(self.intermediate(x))
        return self.output_layer_norm(x + dropout(self.output(hidden), self.dropout_rate, rngs[1]))


def _apply_layer(layer: EncoderLayer, x, key_mask, dropout_rng):
    return layer(x, key_mask, dropout_rng)


_apply_layer_remat = nnx.remat(_apply_layer)


class Encoder(nnx.Module):
    """Embeddings followed by `num_hidden_layers` post-LN layers; returns the last hidden state.

    With `scan_layers` the layers are one EncoderLayer whose params carry a leading layer axis
    (`nnx.vmap` at init) and run as one `lax.scan`: XLA compiles one layer, and the optimizer
    sees one leaf per layer weight instead of one per layer and weight. Without it they are a
    list, one module per layer. `abstract.params_in_layout` converts between the two layouts;
    model directories and PyTorch checkpoints hold the per-layer one.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.embeddings = Embeddings(config, rngs=rngs)
        self.num_layers = config.num_hidden_layers
        self.remat = config.remat
        self.scan_layers = config.scan_layers
        if config.scan_layers:
            self.layers = _stacked_layers(config, rngs)
        else:
            self.layers = nnx.List(
                [EncoderLayer(config, rngs=rngs) for _ in range(self.num_layers)]
            )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids, attention_mask: [batch, length] → hidden states [batch, length, hidden]."""
        # Layers use fold_in(rng, 0..n-1); the embeddings take n (fold_in data must be >= 0).
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, self.num_layers)
        x = constrain_batch(self.embeddings(input_ids, rng))
        key_mask = attention_mask.astype(bool)
        apply = _apply_layer_remat if self.remat else _apply_layer
        if self.scan_layers:
            return self._scan(apply, x, key_mask, dropout_rng)
        for index, layer in enumerate(self.layers):
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
            x = constrain_batch(apply(layer, x, key_mask, rng))
        return x

    def _scan(self, apply, x, key_mask, dropout_rng):
        """The stacked layers as one `lax.scan`: step i merges layer i's slice of the params."""
        graphdef, stacked = nnx.split(self.layers)

        def body(x, inputs):
            index, state = inputs
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
            return constrain_batch(apply(nnx.merge(graphdef, state), x, key_mask, rng)), None

        x, _ = jax.lax.scan(body, x, (jnp.arange(self.num_layers), stacked))
        return x


def _stacked_layers(config: ModelConfig, rngs: nnx.Rngs) -> EncoderLayer:
    """`num_hidden_layers` layers as one module whose params have a leading layer axis (its
    logical axis None: every device holds all layers of its shard)."""

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def create(rngs: nnx.Rngs) -> EncoderLayer:
        return EncoderLayer(config, rngs=rngs)

    return create(rngs)
