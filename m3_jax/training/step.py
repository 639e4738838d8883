"""Pure training and evaluation steps.

`train_step(state, batch) -> (state, metrics)`: encode queries and passages, build the score
matrices, take the M3 loss, apply the optax update. With `sub_batch_size`, encoding runs in
sub-batches under `jax.checkpoint` (the paper's split-batch): activations of one sub-batch at a
time, embeddings of all, losses over the full batch, the same gradients as unsplit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m3_jax.config import LossConfig
from m3_jax.losses import m3_loss
from m3_jax.model import M3Output, Params
from m3_jax.model.axes import constrain_batch
from m3_jax.training.health import head_health
from m3_jax.training.optim import apply_update
from m3_jax.training.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step computes, from the run's `loss` and `train` sections and its mesh."""

    loss: LossConfig  # with num_shards resolved
    sub_batch_size: int | None  # rows per encoder call and data shard; None = all at once
    dropout: bool  # XLM-R dropout during training
    data_shards: int  # blocks the batch rows are split into over devices (data-parallel size)
    special_token_ids: tuple[int, ...] = ()  # not content: left out of the sparse head's health


def sub_batch_count(rows: int, sub_batch_size: int, shards: int = 1) -> int:
    """How many encoder calls encode `rows` (split into `shards` equal blocks) with at most
    `sub_batch_size` rows of each block per call, every block split evenly: the fewest calls
    whose count divides the block size."""
    if sub_batch_size < 1:
        raise ValueError(f"sub_batch_size must be positive, got {sub_batch_size}")
    if rows % shards:
        raise ValueError(f"{rows} rows do not split into {shards} data shards")
    per_shard = rows // shards
    calls = -(-per_shard // sub_batch_size)
    while per_shard % calls:
        calls += 1
    return calls


def encode(
    graphdef: nnx.GraphDef,
    params: Params,
    ids: jax.Array,
    mask: jax.Array,
    dropout_rng: jax.Array | None,
    sub_batch_size: int | None,
    data_shards: int = 1,
) -> M3Output:
    """M3Model outputs for [N, L] inputs; with `sub_batch_size`, in sequential sub-batches of at
    most that many rows from each of the `data_shards` row blocks (see `sub_batch_count`)."""

    def run(ids, mask, rng):
        return nnx.merge(graphdef, params)(ids, mask, dropout_rng=rng)

    rows = ids.shape[0]
    if sub_batch_size is None:
        return run(ids, mask, dropout_rng)
    calls = sub_batch_count(rows, sub_batch_size, data_shards)
    if calls == 1:
        return run(ids, mask, dropout_rng)

    def one(args):
        index, chunk_ids, chunk_mask = args
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        return jax.checkpoint(run)(chunk_ids, chunk_mask, rng)

    split = functools.partial(split_rows, calls=calls)
    out = jax.lax.map(one, (jnp.arange(calls), split(ids), split(mask)))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(rows, *x.shape[2:]), out)


def split_rows(x: jax.Array, calls: int) -> jax.Array:
    """[rows, ...] → [calls, rows / calls, ...] where call c takes rows c, c + calls, ...: as
    `calls` divides each data shard's block of rows, every device works on its own share of
    every call (and the rows of a call stay split over the data-parallel axes)."""
    rows = x.shape[0]
    return constrain_batch(x.reshape(rows // calls, calls, *x.shape[1:]).swapaxes(0, 1), 1)


def loss_fn(
    params: Params,
    graphdef: nnx.GraphDef,
    batch: Batch,
    step: jax.Array,
    rng: jax.Array | None,
    config: StepConfig,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, jax.Array]]]:
    """The loss, and as auxiliary outputs its parts and the heads' health (`health.py`)."""
    q_rng = p_rng = None
    if rng is not None:
        q_rng, p_rng = jax.random.split(rng)
    sub, shards = config.sub_batch_size, config.data_shards
    q = encode(graphdef, params, batch["query_ids"], batch["query_mask"], q_rng, sub, shards)
    p = encode(graphdef, params, batch["passage_ids"], batch["passage_mask"], p_rng, sub, shards)
    loss, parts = m3_loss(
        q,
        p,
        batch["query_ids"],
        batch["passage_ids"],
        config.loss,
        step=step,
        teacher_scores=batch.get("teacher_scores"),
    )
    health = head_health(
        q,
        p,
        batch["query_ids"],
        batch["passage_ids"],
        batch["query_mask"],
        batch["passage_mask"],
        config.special_token_ids,
    )
    return loss, (parts, health)


def train_step(
    state: TrainState,
    batch: Batch,
    lr: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: StepConfig,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer update at learning rate `lr` (an input, see `optim`); metrics hold every
    loss part, the heads' health, lr, grad norm and the token count."""
    rng = state.dropout_key() if config.dropout else None
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (parts, health)), grads = grad_fn(state.params, graphdef, batch, state.step, rng, config)
    params, opt_state = apply_update(tx, grads, state.opt_state, state.params, lr)
    metrics = {
        **{f"loss/{k}": v for k, v in parts.items()},
        **health,
        "lr": lr,
        "grad_norm": optax.tree.norm(grads),
        "tokens": batch["query_mask"].sum() + batch["passage_mask"].sum(),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_loss(
    state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef, config: StepConfig
) -> dict[str, jax.Array]:
    """Loss parts without dropout or an update."""
    _, (parts, _) = loss_fn(state.params, graphdef, batch, state.step, None, config)
    return parts
