"""Pure RetroMAE pre-training steps, the counterpart of `step.py` for `RetroMAEModel`.

`train_step(state, batch, lr) -> (state, metrics)` takes the batch of `m3_jax.retromae`
(`retromae_sums` lists its fields). It runs under the same `sharded.jit_train_step` as
fine-tuning: params by the logical-axis rules, rows over the data-parallel axes. With
`sub_batch_size` the texts go through encoder, decoder and MLM head in sub-batches under
`jax.checkpoint` (split-batch: one sub-batch's activations at a time); the losses are sums and
label counts added over sub-batches, so the loss and gradients equal the unsplit ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m3_jax.config import RetroMAEConfig
from m3_jax.data.mlm_masks import mask_budget
from m3_jax.data.plan import BatchShape
from m3_jax.model import Params
from m3_jax.retromae import losses_from_sums, retromae_sums
from m3_jax.training.optim import apply_update
from m3_jax.training.state import TrainState
from m3_jax.training.step import split_rows, sub_batch_count

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class RetroMAEStepConfig:
    retromae: RetroMAEConfig  # masking (the encoder's most labels per text) and loss blocks
    sub_batch_size: int | None  # rows per device per model call; None = all at once
    dropout: bool
    data_shards: int  # blocks the rows are split into over devices (data-parallel size)


def loss_fn(
    params: Params,
    graphdef: nnx.GraphDef,
    batch: Batch,
    rng: jax.Array | None,
    config: RetroMAEStepConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss and its parts ("encoder", "decoder", "loss") of one batch."""
    length = batch["input_ids"].shape[1]
    r = config.retromae
    sums_of = functools.partial(
        retromae_sums,
        max_predictions=mask_budget(length, r.encoder_mask_ratio, r.max_masked_tokens),
        chunk_tokens=r.loss_chunk_tokens,
    )

    def run(rows: Batch, rng: jax.Array | None) -> dict[str, jax.Array]:
        return sums_of(nnx.merge(graphdef, params), rows, dropout_rng=rng)

    rows = batch["input_ids"].shape[0]
    calls = 1
    if config.sub_batch_size is not None:
        calls = sub_batch_count(rows, config.sub_batch_size, config.data_shards)
    if calls == 1:
        return losses_from_sums(run(batch, rng))

    def one(args):
        index, sub_batch = args
        sub_rng = None if rng is None else jax.random.fold_in(rng, index)
        return jax.checkpoint(run)(sub_batch, sub_rng)

    split = {k: split_rows(v, calls) for k, v in batch.items()}
    sums = jax.lax.map(one, (jnp.arange(calls), split))
    return losses_from_sums(jax.tree.map(lambda x: x.sum(0), sums))


def train_step(
    state: TrainState,
    batch: Batch,
    lr: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: RetroMAEStepConfig,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer update at learning rate `lr`; metrics hold the loss parts, lr, grad norm
    and the token count."""
    rng = state.dropout_key() if config.dropout else None
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, parts), grads = grad_fn(state.params, graphdef, batch, rng, config)
    params, opt_state = apply_update(tx, grads, state.opt_state, state.params, lr)
    metrics = {
        **{f"loss/{k}": v for k, v in parts.items()},
        "lr": lr,
        "grad_norm": optax.tree.norm(grads),
        "tokens": batch["attention_mask"].sum(),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_loss(
    state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef, config: RetroMAEStepConfig
) -> dict[str, jax.Array]:
    """Loss parts without dropout or an update."""
    _, parts = loss_fn(state.params, graphdef, batch, None, config)
    return parts


def batch_spec(shape: BatchShape, config: RetroMAEConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """The global RetroMAE batch of a bucket (`TextMasker`'s output for its texts): one text of
    `shape.passage_len` tokens per row."""
    rows, length = shape.batch_size, shape.passage_len
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    masks = min(length, config.decoder_masks)
    return {
        "input_ids": tokens,
        "attention_mask": tokens,
        "encoder_input_ids": tokens,
        "encoder_labels": tokens,
        "decoder_mask_set": jax.ShapeDtypeStruct((rows, masks, length), jnp.bool_),
        "decoder_mask_choice": tokens,
    }
