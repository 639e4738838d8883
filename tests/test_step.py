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

from m3_jax.config import LossConfig, OptimConfig, tiny
from m3_jax.model import graphdef as graphdef_of
from m3_jax.tiny import random_params
from m3_jax.training.optim import (
    apply_update,
    decay_mask,
    learning_rate_schedule,
    make_optimizer,
    trainable_labels,
)
from m3_jax.training.state import init_state
from m3_jax.training.step import StepConfig, encode, loss_fn, sub_batch_count, train_step

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
LOSS = LossConfig(temperature=0.05, num_shards=1)


def make_batch(seed: int, batch: int, group: int, lq: int, lp: int, teacher: bool = False):
    """Right-padded <s> … </s> <pad>… token ids; row 0 is full length, row 1 is short.

    Ids come from a small part of the vocab so queries and passages share tokens (sparse scores
    and their gradients are not all zero)."""
    rng = np.random.default_rng(seed)

    def texts(num, length):
        lengths = rng.integers(3, length + 1, num)
        lengths[0], lengths[1] = length, 3
        mask = np.arange(length)[None, :] < lengths[:, None]
        ids = rng.integers(4, 30, (num, length))
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
    config = StepConfig(LOSS, sub_batch_size=sub_batch_size, dropout=False, data_shards=1)

    def fn(params, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (parts, _)), grads = grad_fn(params, graphdef, batch, jnp.int32(0), None, config)
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

    assert primitives(None) == set() and primitives(B) == set()
    assert "scan" in primitives(2) and primitives(2) & {"remat2", "checkpoint"}


@pytest.mark.parametrize(
    "rows, sub_batch_size, shards, calls",
    [(4, 2, 1, 2), (4, 3, 1, 2), (20, 8, 1, 4), (48, 8, 1, 6), (40, 8, 2, 4), (7, 3, 1, 7)],
)
def test_sub_batch_count(rows, sub_batch_size, shards, calls):
    assert sub_batch_count(rows, sub_batch_size, shards) == calls
    assert (rows // shards) % calls == 0 and rows // shards // calls <= sub_batch_size


def test_sub_batch_count_errors():
    with pytest.raises(ValueError, match="must be positive"):
        sub_batch_count(4, 0)
    with pytest.raises(ValueError, match="5 rows do not split into 2 data shards"):
        sub_batch_count(5, 2, 2)


# The jitted train step -------------------------------------------------------------------------


def jit_train_step(model_config, step_config, optim_config=None):
    """train_step under jit, donating the state; with the initial state and the lr schedule."""
    params = random_params(model_config, 0)
    optim_config = optim_config or OptimConfig(lr=1e-3, warmup_steps=0)
    tx, schedule = make_optimizer(optim_config, 100, params)
    step_fn = jax.jit(
        functools.partial(
            train_step, graphdef=graphdef_of(model_config), tx=tx, config=step_config
        ),
        donate_argnums=0,
    )
    return step_fn, init_state(params, tx, seed=0), schedule


def scheduled_lr(schedule, state) -> np.float32:
    """The lr input the training loop gives `train_step` at `state`'s step."""
    return np.float32(schedule(int(state.step)))


DENSE_LOSS = dataclasses.replace(LOSS, unified=False)  # cheaper to compile than the full objective


@pytest.fixture(scope="module")
def train_runs():
    """A jitted, donating bf16-compute train step (dense loss, no dropout): six steps on batch A,
    then batches of another shape. One module-wide run: each program takes seconds to compile."""
    config = CFG_NO_DROPOUT.replace(dtype="bfloat16")
    step_fn, state, schedule = jit_train_step(
        config, StepConfig(DENSE_LOSS, None, dropout=False, data_shards=1)
    )
    out = types.SimpleNamespace(state0=copy_tree(state), schedule=schedule, sizes=[], metrics=[])
    donated = state
    batch_b = make_batch(2, 2, G, 16, 16)
    for batch in (BATCH_A,) * 6 + (batch_b, BATCH_A, batch_b):
        state, metrics = step_fn(state, batch, scheduled_lr(schedule, state))
        out.metrics.append(metrics)
        out.sizes.append(step_fn._cache_size())
    out.donated_deleted = all(x.is_deleted() for x in jax.tree.leaves(donated.params))
    out.state = state
    return out


def test_train_step_lowers_loss(train_runs):
    losses = [float(m["loss/loss"]) for m in train_runs.metrics[:6]]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.5 * losses[0], losses
    m = train_runs.metrics[0]
    health = {"health/sparse_active", "health/sparse_weight", "health/dense_cosine"}
    assert set(m) == {
        "loss/dense",
        "loss/loss",
        "lr",
        "grad_norm",
        "tokens",
        "health/colbert_cosine",
        *health,
    }
    assert float(m["lr"]) == pytest.approx(float(train_runs.schedule(0)))
    tokens = BATCH_A["query_mask"].sum() + BATCH_A["passage_mask"].sum()
    assert int(m["tokens"]) == int(tokens)
    assert int(train_runs.state.step) == 9


def test_train_step_donates_the_state(train_runs):
    assert train_runs.donated_deleted
    assert not any(x.is_deleted() for x in jax.tree.leaves(train_runs.state0.params))


def test_one_program_per_batch_shape(train_runs):
    # Batch shapes A (six times), B, A, B: two distinct shapes, two programs.
    assert train_runs.sizes == [1] * 6 + [2, 2, 2]


def test_bf16_compute_train_step(train_runs):
    for metrics in train_runs.metrics:
        assert np.isfinite(float(metrics["loss/loss"]))
        assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    # bf16 activations: close to, but not exactly, the fp32 dense loss of the same params/batch.
    loss = float(train_runs.metrics[0]["loss/loss"])
    _, fp32_parts, *_ = loss_grads_outputs(None)
    assert loss == pytest.approx(float(fp32_parts["dense"]), rel=0.05)
    assert loss != float(fp32_parts["dense"])
    for leaf in jax.tree.leaves(train_runs.state.params):
        assert leaf.dtype == jnp.float32
    assert tree_max_abs_diff(train_runs.state.params, train_runs.state0.params) > 0


def test_dropout_is_deterministic_from_state_and_step():
    step_fn, state0, schedule = jit_train_step(
        CFG, StepConfig(DENSE_LOSS, None, dropout=True, data_shards=1)
    )
    lr = scheduled_lr(schedule, state0)
    first, first_metrics = step_fn(copy_tree(state0), BATCH_A, lr)
    again, again_metrics = step_fn(copy_tree(state0), BATCH_A, lr)
    assert tree_max_abs_diff(again.params, first.params) == 0.0
    for name, value in first_metrics.items():
        np.testing.assert_array_equal(again_metrics[name], value, err_msg=name)
    loss = float(first_metrics["loss/loss"])
    # Without dropout (the same params, batch and step; dropout rates only act with an rng) the
    # loss differs; so does the dropout mask at another step or with another seed.
    _, no_dropout_parts, *_ = loss_grads_outputs(None)
    assert abs(loss - float(no_dropout_parts["dense"])) > 1e-4
    _, other_step = step_fn(copy_tree(state0.replace(step=jnp.int32(1))), BATCH_A, lr)
    assert abs(float(other_step["loss/loss"]) - loss) > 1e-4
    reseeded = state0.replace(rng=jax.random.key_data(jax.random.key(1)))
    _, other_seed = step_fn(copy_tree(reseeded), BATCH_A, lr)
    assert abs(float(other_seed["loss/loss"]) - loss) > 1e-4


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
    tx, schedule = make_optimizer(config, total_steps, params)
    opt_state = tx.init(params)
    update = jax.jit(functools.partial(apply_update, tx))
    new = params
    for step in range(steps):
        new, opt_state = update(_random_grads(params, step), opt_state, new, schedule(step))
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
    new, _ = jax.jit(functools.partial(apply_update, tx))(zeros, tx.init(params), params, 0.1)
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
    """With a constant gradient Adam's step is −lr_t·g/(|g| + eps) = −lr_t: the schedule's value."""
    params = {"encoder": {"w": {"kernel": jnp.zeros((3,))}}}
    config = OptimConfig(lr=0.1, warmup_steps=4, weight_decay=0.0, eps=1e-12)
    tx, schedule = make_optimizer(config, 12, params)
    opt_state = tx.init(params)
    grads = {"encoder": {"w": {"kernel": jnp.ones((3,))}}}
    update = jax.jit(functools.partial(apply_update, tx))
    for step in range(14):
        expected = _expected_lr(step, 0.1, 4, 12)
        assert schedule(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        new, opt_state = update(grads, opt_state, params, schedule(step))
        np.testing.assert_allclose(new["encoder"]["w"]["kernel"], -expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0, 10.0])
def test_gradient_clipping(max_grad_norm):
    """With eps ≫ |g|, Adam's first update is −lr·g/eps, so its norm shows the clipped gradient."""
    params = {  # zeros: the new params are the update itself, without rounding against 1
        "encoder": {"a": {"kernel": jnp.zeros((40, 3))}},
        "sparse_linear": {"bias": jnp.zeros(7)},
    }
    lr, eps = 1e-2, 1e4
    config = OptimConfig(
        lr=lr, warmup_steps=0, weight_decay=0.0, eps=eps, max_grad_norm=max_grad_norm
    )
    tx, _ = make_optimizer(config, 10, params)
    grads = _random_grads(params, 0)
    grads = jax.tree.map(lambda g: g * (5.0 / optax.tree.norm(grads)), grads)
    new, _ = jax.jit(functools.partial(apply_update, tx))(grads, tx.init(params), params, lr)
    norm = float(optax.tree.norm(new)) * eps / lr
    expected = 5.0 if max_grad_norm <= 0 else min(5.0, max_grad_norm)
    assert norm == pytest.approx(expected, rel=1e-3)
