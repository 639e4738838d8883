"""m3_jax.training: split-batch encoding, the jitted train step, the optimizer and dropout.

A tiny random model; every distinct jitted program costs a few seconds of compilation on CPU, so
the expensive runs happen once in module fixtures and the tests check their results.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from m3_jax.config import tiny
from m3_jax.losses import LossConfig
from m3_jax.model.m3 import M3Model
from m3_jax.tiny import random_params
from m3_jax.training.optim import (
    OptimConfig,
    decay_mask,
    learning_rate_schedule,
    make_optimizer,
    trainable_labels,
)
from m3_jax.training.state import init_state
from m3_jax.training.step import StepConfig, encode, loss_fn, train_step

VOCAB = 200
B, G, LQ, LP = 4, 2, 8, 12
# One layer: compilation, not compute, dominates these tests.
CFG = tiny(
    vocab_size=VOCAB,
    num_hidden_layers=1,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)
CFG_NO_DROPOUT = CFG.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LOSS = LossConfig(group_size=G, temperature=0.05)


def graphdef_of(config) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: M3Model(config, rngs=nnx.Rngs(0))))[0]


def make_batch(seed: int, batch: int, group: int, lq: int, lp: int, teacher: bool = False):
    """Right-padded <s> … </s> <pad>… token ids; row 0 is full length, row 1 is short."""
    rng = np.random.default_rng(seed)

    def texts(num, length):
        lengths = rng.integers(3, length + 1, num)
        lengths[0], lengths[1] = length, 3
        mask = np.arange(length)[None, :] < lengths[:, None]
        ids = rng.integers(4, VOCAB, (num, length))
        ids[:, 0] = 0
        ids[np.arange(num), lengths - 1] = 2
        return jnp.asarray(np.where(mask, ids, 1), jnp.int32), jnp.asarray(mask, jnp.int32)

    q_ids, q_mask = texts(batch, lq)
    p_ids, p_mask = texts(batch * group, lp)
    out = dict(query_ids=q_ids, query_mask=q_mask, passage_ids=p_ids, passage_mask=p_mask)
    if teacher:
        out["teacher_scores"] = jnp.asarray(rng.normal(0.0, 2.0, (batch, group)), jnp.float32)
    return out


BATCH_A = make_batch(1, B, G, LQ, LP, teacher=True)


def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def tree_max_abs_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


# Split-batch (sub-batch) encoding --------------------------------------------------------------


@functools.cache
def loss_grads_outputs(sub_batch_size):
    """Loss, parts, gradients and encoder outputs without dropout, with or without sub-batches."""
    graphdef = graphdef_of(CFG_NO_DROPOUT)
    config = StepConfig(LOSS, sub_batch_size=sub_batch_size, dropout=False)

    def fn(params, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, parts), grads = grad_fn(params, graphdef, batch, jnp.int32(0), None, config)
        q = encode(graphdef, params, batch["query_ids"], batch["query_mask"], None, sub_batch_size)
        p = encode(
            graphdef, params, batch["passage_ids"], batch["passage_mask"], None, sub_batch_size
        )
        return loss, parts, grads, q, p

    return jax.jit(fn)(random_params(CFG_NO_DROPOUT, 0), BATCH_A)


def test_split_batch_gradients_equal_unsplit():
    loss, parts, grads, _, _ = loss_grads_outputs(None)
    split_loss, split_parts, split_grads, _, _ = loss_grads_outputs(2)
    np.testing.assert_allclose(split_loss, loss, rtol=1e-5)
    for name in parts:
        np.testing.assert_allclose(split_parts[name], parts[name], rtol=1e-5, err_msg=name)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
    assert scale > 0
    assert tree_max_abs_diff(split_grads, grads) <= 1e-5 * scale
    # Every parameter gets a gradient (the heads included), so the comparison covers them all.
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        if "position_embeddings" not in jax.tree_util.keystr(path):
            assert np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)


def test_split_batch_encode_equals_unsplit():
    *_, q, p = loss_grads_outputs(None)
    *_, split_q, split_p = loss_grads_outputs(2)
    for full, split in ((q, split_q), (p, split_p)):
        for name in ("dense", "sparse", "colbert"):
            np.testing.assert_allclose(
                getattr(split, name), getattr(full, name), rtol=1e-5, atol=1e-6, err_msg=name
            )
        np.testing.assert_array_equal(split.colbert_mask, full.colbert_mask)


def test_split_batch_uses_checkpointed_sub_batches():
    graphdef = graphdef_of(CFG_NO_DROPOUT)
    params = random_params(CFG_NO_DROPOUT, 0)
    batch = make_batch(0, B, G, LQ, LP)

    def primitives(sub_batch_size):
        jaxpr = jax.make_jaxpr(
            lambda p: encode(
                graphdef, p, batch["query_ids"], batch["query_mask"], None, sub_batch_size
            )
        )(params)
        return set(re.findall(r"\b(scan|remat2|checkpoint)\[", str(jaxpr)))

    assert primitives(None) == set()
    assert "scan" in primitives(2) and primitives(2) & {"remat2", "checkpoint"}
    with pytest.raises(ValueError, match="sub_batch_size=3"):
        encode(graphdef, params, batch["query_ids"], batch["query_mask"], None, 3)


# The jitted train step -------------------------------------------------------------------------


def jit_train_step(model_config, step_config, optim_config=None, donate=True):
    params = random_params(model_config, 0)
    optim_config = optim_config or OptimConfig(lr=1e-3, warmup_steps=0)
    tx, schedule = make_optimizer(optim_config, 100, params)
    step_fn = jax.jit(
        functools.partial(
            train_step,
            graphdef=graphdef_of(model_config),
            tx=tx,
            schedule=schedule,
            config=step_config,
        ),
        donate_argnums=0 if donate else (),
    )
    return step_fn, init_state(params, tx, seed=0), schedule


@pytest.fixture(scope="module")
def dropout_runs():
    """Steps of a jitted, donating train step with dropout on batch A (with teacher scores)."""
    step_fn, state0, schedule = jit_train_step(CFG, StepConfig(LOSS, dropout=True))
    out = types.SimpleNamespace(step_fn=step_fn, state0=state0, schedule=schedule)
    donated = copy_tree(state0)
    out.first, out.first_metrics = step_fn(donated, BATCH_A)
    out.donated_deleted = all(x.is_deleted() for x in jax.tree.leaves(donated.params))
    state, out.losses = out.first, [float(out.first_metrics["loss/loss"])]
    for _ in range(5):
        state, metrics = step_fn(state, BATCH_A)
        out.losses.append(float(metrics["loss/loss"]))
    out.final_step = int(state.step)
    return out


def test_train_step_lowers_loss(dropout_runs):
    losses = dropout_runs.losses
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 4, losses
    assert dropout_runs.final_step == 6
    m = dropout_runs.first_metrics
    assert float(m["lr"]) == pytest.approx(float(dropout_runs.schedule(0)))
    assert float(m["grad_norm"]) > 0
    tokens = BATCH_A["query_mask"].sum() + BATCH_A["passage_mask"].sum()
    assert int(m["tokens"]) == int(tokens)
    for name in ("dense", "sparse", "colbert", "ensemble", "distill", "loss"):
        assert np.isfinite(float(m[f"loss/{name}"])), name


def test_train_step_donates_the_state(dropout_runs):
    assert dropout_runs.donated_deleted
    assert not any(x.is_deleted() for x in jax.tree.leaves(dropout_runs.state0.params))


def test_dropout_is_deterministic_from_state_and_step(dropout_runs):
    step_fn, state0 = dropout_runs.step_fn, dropout_runs.state0
    again, again_metrics = step_fn(copy_tree(state0), BATCH_A)
    assert tree_max_abs_diff(again.params, dropout_runs.first.params) == 0.0
    for name, value in dropout_runs.first_metrics.items():
        np.testing.assert_array_equal(again_metrics[name], value, err_msg=name)
    loss = float(dropout_runs.first_metrics["loss/loss"])
    # Without dropout the loss differs (same params, batch and step); so does the dropout mask
    # at another step or with another seed.
    no_dropout_loss, *_ = loss_grads_outputs(None)
    assert abs(loss - float(no_dropout_loss)) > 1e-4
    _, other_step = step_fn(copy_tree(state0.replace(step=jnp.int32(1))), BATCH_A)
    assert abs(float(other_step["loss/loss"]) - loss) > 1e-4
    reseeded = state0.replace(rng=jax.random.key_data(jax.random.key(1)))
    _, other_seed = step_fn(copy_tree(reseeded), BATCH_A)
    assert abs(float(other_seed["loss/loss"]) - loss) > 1e-4


def test_one_program_per_batch_shape():
    """A cheap (dense-only, no dropout) step fed two batch shapes compiles two programs."""
    step_fn, state, _ = jit_train_step(
        CFG_NO_DROPOUT, StepConfig(dataclasses.replace(LOSS, unified=False), dropout=False)
    )
    batch_b = make_batch(2, 2, G, 16, 16)
    sizes = []
    for batch in (BATCH_A, BATCH_A, batch_b, BATCH_A, batch_b, BATCH_A):
        state, metrics = step_fn(state, batch)
        assert np.isfinite(float(metrics["loss/loss"]))
        sizes.append(step_fn._cache_size())
    assert sizes == [1, 1, 2, 2, 2, 2]
    assert int(state.step) == 6


def test_bf16_compute_train_step():
    config = CFG_NO_DROPOUT.replace(dtype="bfloat16")
    step_fn, state, _ = jit_train_step(config, StepConfig(LOSS, dropout=False), donate=False)
    new_state, metrics = step_fn(state, BATCH_A)
    loss = float(metrics["loss/loss"])
    assert np.isfinite(loss) and np.isfinite(float(metrics["grad_norm"]))
    # bf16 activations: close to, but not exactly, the fp32 loss of the same params and batch.
    fp32_loss = float(loss_grads_outputs(None)[0])
    assert loss == pytest.approx(fp32_loss, rel=0.05)
    assert loss != fp32_loss
    for leaf in jax.tree.leaves(new_state.params):
        assert leaf.dtype == jnp.float32
    assert tree_max_abs_diff(new_state.params, state.params) > 0


# The optimizer ---------------------------------------------------------------------------------


# The model's parameter tree with tiny leaves: optimizer tests compile one small program each.
MICRO = tiny(
    vocab_size=8,
    hidden_size=4,
    num_attention_heads=1,
    intermediate_size=4,
    max_position_embeddings=8,
    num_hidden_layers=1,
)


def _params():
    return jax.tree.map(jnp.asarray, random_params(MICRO, 0))


def _random_grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    grads = [jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in leaves]
    return jax.tree.unflatten(treedef, grads)


def _run_optimizer(config: OptimConfig, params, steps: int = 3, total_steps: int = 10):
    tx, _ = make_optimizer(config, total_steps, params)
    opt_state = tx.init(params)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    new = params
    for seed in range(steps):
        new, opt_state = update(new, opt_state, _random_grads(params, seed))
    return new


def test_decay_mask():
    mask = decay_mask(_params())
    enc = mask["encoder"]
    layer = enc["layers"][0]
    assert enc["embeddings"]["word_embeddings"]["embedding"]
    assert enc["embeddings"]["position_embeddings"]["embedding"]
    assert layer["attention"]["query"]["kernel"] and layer["intermediate"]["kernel"]
    assert mask["colbert_linear"]["kernel"] and mask["sparse_linear"]["kernel"]
    for norm in (enc["embeddings"]["layer_norm"], layer["attention_layer_norm"]):
        assert not norm["scale"] and not norm["bias"]
    assert not layer["attention"]["query"]["bias"] and not layer["output"]["bias"]
    assert not mask["colbert_linear"]["bias"] and not mask["sparse_linear"]["bias"]


def test_weight_decay_skips_bias_and_scale():
    """With zero gradients the only update is decoupled decay: p ← p·(1 − lr·wd) where it applies."""
    params = _params()
    config = OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, max_grad_norm=0.0)
    tx, _ = make_optimizer(config, 10, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    mask = decay_mask(params)
    for (path, old), updated, decays in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(new),
        jax.tree.leaves(mask),
        strict=True,
    ):
        expected = np.asarray(old) * (1 - 0.1 * 0.5) if decays else np.asarray(old)
        np.testing.assert_allclose(updated, expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_fix_encoder_trains_only_the_heads():
    params = _params()
    labels = trainable_labels(params, OptimConfig(fix_encoder=True))
    assert set(jax.tree.leaves(labels["encoder"])) == {"frozen"}
    new = _run_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, fix_encoder=True), params)
    for path, old in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        updated = new
        for key in path:
            updated = updated[key.key]
        if name.startswith("['encoder']"):
            np.testing.assert_array_equal(updated, old, err_msg=name)
        else:
            assert np.all(np.asarray(updated) != np.asarray(old)), name


def test_fix_position_embedding_freezes_only_positions():
    params = _params()
    new = _run_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, fix_position_embedding=True), params)
    for path, old in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        updated = new
        for key in path:
            updated = updated[key.key]
        if "position_embeddings" in name:
            np.testing.assert_array_equal(updated, old, err_msg=name)
        else:
            assert np.any(np.asarray(updated) != np.asarray(old)), name


def _expected_lr(step, lr, warmup, total):
    if step < warmup:
        return lr * step / warmup
    return lr * max(0.0, (total - step) / (total - warmup))


@pytest.mark.parametrize("warmup_ratio,warmup_steps", [(0.1, None), (0.0, 4), (0.0, None)])
def test_learning_rate_schedule(warmup_ratio, warmup_steps):
    lr, total = 2e-5, 100
    config = OptimConfig(lr=lr, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps)
    warmup = warmup_steps if warmup_steps is not None else int(warmup_ratio * total)
    schedule = learning_rate_schedule(config, total)
    for step in (0, 1, 2, 3, 4, 5, 9, 10, 11, 50, 99, 100, 130):
        expected = _expected_lr(step, lr, warmup, total)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12), step


def test_optimizer_applies_the_schedule():
    """With a constant gradient Adam's update is −lr_t·g/(|g| + eps): the schedule's value."""
    params = {"encoder": {"w": {"kernel": jnp.zeros((3,))}}}
    config = OptimConfig(lr=0.1, warmup_steps=4, weight_decay=0.0, eps=1e-12)
    tx, schedule = make_optimizer(config, 12, params)
    opt_state = tx.init(params)
    grads = {"encoder": {"w": {"kernel": jnp.ones((3,))}}}
    for step in range(14):
        updates, opt_state = tx.update(grads, opt_state, params)
        expected = -_expected_lr(step, 0.1, 4, 12)
        np.testing.assert_allclose(updates["encoder"]["w"]["kernel"], expected, rtol=1e-4, atol=1e-9)
        assert float(schedule(step)) == pytest.approx(-expected, abs=1e-9)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0, 10.0])
def test_gradient_clipping(max_grad_norm):
    """With eps ≫ |g|, Adam's first update is −lr·g/eps, so its norm shows the clipped gradient."""
    params = {"encoder": {"a": {"kernel": jnp.ones((40, 3))}}, "sparse_linear": {"bias": jnp.ones(7)}}
    lr, eps = 1e-2, 1e4
    config = OptimConfig(
        lr=lr, warmup_steps=0, weight_decay=0.0, eps=eps, max_grad_norm=max_grad_norm
    )
    tx, _ = make_optimizer(config, 10, params)
    grads = _random_grads(params, 0)
    grads = jax.tree.map(lambda g: g * (5.0 / optax.tree.norm(grads)), grads)
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = float(optax.tree.norm(updates)) * eps / lr
    expected = 5.0 if max_grad_norm <= 0 else min(5.0, max_grad_norm)
    assert norm == pytest.approx(expected, rel=1e-3)
