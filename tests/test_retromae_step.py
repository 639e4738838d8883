"""The RetroMAE train step (m3_jax.training.retromae_step): on an 8-device mesh it equals the
single-device step, split-batch equals the unsplit loss and gradients, and training lowers the
loss. Batches come from the host sampler (m3_jax.data.mlm_masks)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from m3_jax import sharding
from m3_jax.config import OptimConfig, RetroMAEConfig, tiny
from m3_jax.data.mlm_masks import collate, sample_text_masks
from m3_jax.model import RetroMAEModel
from m3_jax.model import graphdef as graphdef_of
from m3_jax.tiny import random_params
from m3_jax.training import sharded
from m3_jax.training.optim import make_optimizer
from m3_jax.training.retromae_step import RetroMAEStepConfig, loss_fn, train_step
from m3_jax.training.state import init_state

VOCAB = 120
ROWS, LENGTH = 8, 24
CFG = tiny(vocab_size=VOCAB, num_hidden_layers=1, attention_chunk_size=8)
MASKING = RetroMAEConfig(decoder_masks=6, loss_chunk_tokens=40)
STEP = RetroMAEStepConfig(MASKING, sub_batch_size=None, dropout=False, data_shards=1)


def make_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    texts, masks = [], []
    for n in rng.integers(6, LENGTH + 1, ROWS):
        ids = rng.integers(4, VOCAB - 1, n)
        ids[0], ids[-1] = 0, 2
        special = np.zeros(n, bool)
        special[[0, -1]] = True
        texts.append(ids)
        masks.append(
            sample_text_masks(
                ids, special, MASKING, mask_token_id=VOCAB - 1, vocab_size=VOCAB,
                continuation=None, rng=rng,
            )
        )  # fmt: skip
    return collate(texts, masks, LENGTH, MASKING, pad_token_id=1)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=1, model_class=RetroMAEModel)


@pytest.fixture(scope="module")
def batch():
    return make_batch(0)


def close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_split_batch_equals_unsplit(params, batch):
    model = graphdef_of(CFG, RetroMAEModel)

    def value_and_grad(config):
        fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(1, 4))
        return fn(params, model, batch, None, config)

    (loss, parts), grads = value_and_grad(STEP)
    split = dataclasses.replace(STEP, sub_batch_size=3)  # 8 rows → 4 calls of 2
    (split_loss, split_parts), split_grads = value_and_grad(split)
    close(split_parts, parts)
    close(split_grads, grads, atol=1e-5)
    assert np.isfinite(float(loss)) and float(parts["decoder"]) > 0


def test_sharded_step_equals_single_device_step(params, batch):
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, eps=1.0), 10, params)
    mesh = sharding.make_mesh(2, 2, 2)
    layout = sharded.state_shardings(CFG, tx, mesh, sharding.FSDP_RULES, RetroMAEModel)
    model = graphdef_of(CFG, RetroMAEModel)
    config = dataclasses.replace(STEP, data_shards=4, sub_batch_size=1)
    state = sharded.initial_state(sharding.put_global(params, layout.params), tx, 0, layout)
    step_fn = sharded.jit_train_step(model, tx, config, layout, mesh, train_step)
    lr = np.float32(schedule(0))
    with jax.set_mesh(mesh):
        new_state, metrics = step_fn(
            state, sharding.put_global(batch, sharding.batch_sharding(mesh)), lr
        )
    plain = functools.partial(train_step, graphdef=model, tx=tx, config=STEP)
    want_state, want_metrics = jax.jit(plain)(init_state(params, tx, 0), batch, lr)
    np.testing.assert_allclose(metrics["loss/loss"], want_metrics["loss/loss"], rtol=1e-5)
    close(new_state.params, want_state.params, atol=1e-5)
    assert int(metrics["tokens"]) == int(batch["attention_mask"].sum())


def test_training_lowers_both_losses(params, batch):
    tx, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=0), 30, params)
    step = jax.jit(
        functools.partial(train_step, graphdef=graphdef_of(CFG, RetroMAEModel), tx=tx, config=STEP)
    )
    state = init_state(params, tx, 0)
    first = None
    for i in range(30):
        state, metrics = step(state, batch, np.float32(schedule(i)))
        first = first or {k: float(v) for k, v in metrics.items()}
    for part in ("loss/encoder", "loss/decoder"):
        assert float(metrics[part]) < 0.7 * first[part], (part, first[part], metrics[part])
