"""The RetroMAE objective (FlagEmbedding's `RetroMAEForPretraining`), as a pure function.

loss = encoder MLM + decoder MLM, each transformers' `CrossEntropyLoss` mean over its labelled
tokens:
- encoder: the masked copy's hidden states at the masked positions (labels >= 0) through the
  tied MLM head, against the original tokens;
- decoder: `RetroMAEModel.decode` of the encoder's [CLS] state over every position, against every
  original token except the text's first (<s>) and last (</s>); padding is never a label.

The MLM head's logits ([tokens, 250002] floats: 8 GB for one 8192-token text) are computed
`chunk_tokens` tokens at a time under `jax.checkpoint`, forward and backward, so no more than one
block is ever held.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from m3_jax.model.retromae import RetroMAEModel

IGNORE_LABEL = -100  # transformers' CrossEntropyLoss ignore_index


def mlm_cross_entropy(
    hidden: jax.Array, labels: jax.Array, logits_fn: Callable, chunk_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """(sum of −log softmax(logits_fn(hidden))[label], count) over tokens with a label >= 0.
    hidden: [N, hidden], labels: [N]."""
    count = jnp.sum(labels >= 0)
    size = min(chunk_tokens, hidden.shape[0])
    num_chunks = -(-hidden.shape[0] // size)
    pad = num_chunks * size - hidden.shape[0]
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    labels = jnp.pad(labels, (0, pad), constant_values=IGNORE_LABEL)

    @jax.checkpoint
    def one_chunk(args):
        h, y = args
        log_probs = jax.nn.log_softmax(logits_fn(h), axis=-1)
        picked = jnp.take_along_axis(log_probs, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
        return -jnp.sum(jnp.where(y >= 0, picked, 0.0))

    chunks = (hidden.reshape(num_chunks, size, -1), labels.reshape(num_chunks, size))
    return jax.lax.map(one_chunk, chunks).sum(), count


def decoder_labels(input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[batch, L]: the original ids, IGNORE_LABEL at each text's first and last token and at
    padding (the reference collator's labels)."""
    real = attention_mask.astype(bool)
    position = jnp.arange(input_ids.shape[1])
    last = real.sum(-1, keepdims=True) - 1
    keep = real & (position > 0) & (position != last)
    return jnp.where(keep, input_ids, IGNORE_LABEL)


def gather_labelled(labels: jax.Array, max_predictions: int) -> tuple[jax.Array, jax.Array]:
    """([batch, P] positions of the labelled tokens (labels >= 0), [batch, P] their labels),
    P = min(max_predictions, L): a static number of MLM-head rows. Slots past a text's last
    label get IGNORE_LABEL; labels past the P-th of a text are dropped (the mask sampler never
    makes more than max_predictions)."""
    size = min(max_predictions, labels.shape[1])
    positions = jax.vmap(lambda y: jnp.nonzero(y >= 0, size=size, fill_value=0)[0])(labels)
    used = jnp.arange(size) < jnp.sum(labels >= 0, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(labels, positions, axis=1)
    return positions, jnp.where(used, picked, IGNORE_LABEL)


def retromae_sums(
    model: RetroMAEModel,
    batch: dict[str, jax.Array],
    *,
    max_predictions: int,
    chunk_tokens: int,
    dropout_rng: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The summed cross-entropies and label counts of the encoder and the decoder over one batch
    (sums add up over sub-batches; `losses_from_sums` makes the loss):
    input_ids, attention_mask [B, L]: the original texts;
    encoder_input_ids, encoder_labels [B, L]: the masked copy and its labels (the original id
        at masked positions, IGNORE_LABEL elsewhere), at most `max_predictions` per text;
    decoder_mask_set [B, M, L] (True = hidden), decoder_mask_choice [B, L]: the decoder's masks.
    """
    rngs = [None, None] if dropout_rng is None else list(jax.random.split(dropout_rng))
    mask = batch["attention_mask"]
    hidden = model.encoder(batch["encoder_input_ids"], mask, dropout_rng=rngs[0])
    width = hidden.shape[-1]

    positions, labels = gather_labelled(batch["encoder_labels"], max_predictions)
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1).reshape(-1, width)
    enc_sum, enc_count = mlm_cross_entropy(
        picked, labels.reshape(-1), model.mlm_logits, chunk_tokens
    )
    decoded = model.decode(
        hidden[:, 0],
        batch["input_ids"],
        mask,
        batch["decoder_mask_set"],
        batch["decoder_mask_choice"],
        rngs[1],
    )
    dec_sum, dec_count = mlm_cross_entropy(
        decoded.reshape(-1, width),
        decoder_labels(batch["input_ids"], mask).reshape(-1),
        model.mlm_logits,
        chunk_tokens,
    )
    return {
        "encoder_sum": enc_sum,
        "encoder_count": enc_count,
        "decoder_sum": dec_sum,
        "decoder_count": dec_count,
    }


def losses_from_sums(sums: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(encoder + decoder loss, {"encoder", "decoder", "loss"}): each a mean over its labels."""
    parts = {
        name: sums[f"{name}_sum"] / jnp.maximum(sums[f"{name}_count"], 1)
        for name in ("encoder", "decoder")
    }
    parts["loss"] = parts["encoder"] + parts["decoder"]
    return parts["loss"], parts


def retromae_loss(
    model: RetroMAEModel,
    batch: dict[str, jax.Array],
    *,
    max_predictions: int,
    chunk_tokens: int,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(encoder + decoder loss, its parts) of one batch (`retromae_sums` lists the fields)."""
    sums = retromae_sums(
        model,
        batch,
        max_predictions=max_predictions,
        chunk_tokens=chunk_tokens,
        dropout_rng=dropout_rng,
    )
    return losses_from_sums(sums)
