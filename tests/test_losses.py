"""m3_jax.losses against an independent float64 numpy implementation of the M3 objective
(FlagEmbedding's `EncoderOnlyEmbedderM3Model` losses).

The numpy functions here (`ref_*`) are written from the spec, not from our code; the model-level
tests (tests/test_losses_model.py) reuse them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax import losses
from m3_jax.config import LossConfig

TOL = dict(rtol=1e-5, atol=1e-6)
F32_MIN = float(np.finfo(np.float32).min)
B, G = 3, 4


# Independent references (float64) --------------------------------------------------------------


def ref_log_softmax(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, np.float64)
    shifted = s - s.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def ref_softmax(s: np.ndarray) -> np.ndarray:
    return np.exp(ref_log_softmax(s))


def ref_ce(s: np.ndarray, targets: np.ndarray) -> float:
    """torch CrossEntropyLoss(reduction='mean')."""
    lp = ref_log_softmax(s)
    return float(-np.mean(lp[np.arange(len(s)), targets]))


def ref_soft_ce(s: np.ndarray, probs: np.ndarray) -> float:
    """−mean_b Σ_j p_bj log softmax(s)_bj (FlagEmbedding's "kl_div" distill loss)."""
    return float(-np.mean(np.sum(probs * ref_log_softmax(s), axis=-1)))


def ref_targets(batch: int, group: int, in_batch: bool) -> np.ndarray:
    """Positive of row b: column b*G with in-batch negatives, column 0 on the [B, G] matrix."""
    return np.arange(batch) * group if in_batch else np.zeros(batch, np.int64)


def ref_m3_kd(s: np.ndarray, teacher_probs: np.ndarray, group: int, in_batch: bool) -> float:
    """FlagEmbedding m3_kd_loss: Σ_i mean_b T[b,i]·CE_b(S + M, b*G+i), then M[b, b*G+i] = finfo.min."""
    s = np.asarray(s, np.float64)
    batch = len(s)
    rows = np.arange(batch)
    labels = ref_targets(batch, group, in_batch)
    mask = np.zeros_like(s)
    loss = 0.0
    for i in range(group):
        target = labels + i
        ce_rows = -ref_log_softmax(s + mask)[rows, target]
        loss += float(np.mean(teacher_probs[:, i] * ce_rows))
        mask[rows, target] = F32_MIN
    return loss


def ref_own_group(s: np.ndarray, group: int, in_batch: bool) -> np.ndarray:
    """[B, B*G] → [B, G]: row b's columns b*G .. b*G+G-1."""
    if not in_batch:
        return s
    return np.stack([s[b, b * group : (b + 1) * group] for b in range(len(s))])


def ref_head_loss(s, group, in_batch, teacher_probs=None, kd_type="m3_kd_loss") -> float:
    targets = ref_targets(len(s), group, in_batch)
    if teacher_probs is None:
        return ref_ce(s, targets)
    if kd_type == "m3_kd_loss":
        return ref_m3_kd(s, teacher_probs, group, in_batch)
    own = ref_own_group(s, group, in_batch)
    return ref_soft_ce(own, teacher_probs) + ref_ce(s, targets)


def ref_unified(
    dense,
    sparse,
    colbert,
    group,
    *,
    teacher_scores=None,
    self_distill=True,
    kd_type="m3_kd_loss",
    in_batch=True,
    dense_loss=None,
    ensemble_teacher=None,
) -> dict[str, float]:
    """Every named part of the M3 objective (the M3 paper's equations).

    ensemble_teacher: a fixed s_inter to take the self-distillation targets from (for finite
    differences with the teacher held constant); by default it is computed from the scores.
    """
    teacher = None if teacher_scores is None else ref_softmax(teacher_scores)

    def head(s):
        return ref_head_loss(s, group, in_batch, teacher, kd_type)

    l_dense = head(dense) if dense_loss is None else dense_loss
    if sparse is None:
        return {"dense": l_dense, "loss": l_dense}
    inter = dense + 0.3 * sparse + colbert
    parts = {"dense": l_dense, "sparse": head(sparse), "colbert": head(colbert)}
    parts["ensemble"] = head(inter)
    big_l = (parts["dense"] + parts["ensemble"] + 0.1 * parts["sparse"] + parts["colbert"]) / 4
    target = ref_softmax(inter if ensemble_teacher is None else ensemble_teacher)
    parts["distill_dense"] = ref_soft_ce(dense, target)
    parts["distill_sparse"] = ref_soft_ce(sparse, target)
    parts["distill_colbert"] = ref_soft_ce(colbert, target)
    big_l2 = (parts["distill_dense"] + 0.1 * parts["distill_sparse"] + parts["distill_colbert"]) / 3
    parts["contrastive"] = big_l
    parts["distill"] = big_l2
    parts["loss"] = (big_l + big_l2) / 2 if self_distill else big_l
    return parts


def assert_parts_close(parts, expected, tol=None):
    tol = tol or TOL
    assert set(parts) == set(expected), (sorted(parts), sorted(expected))
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(parts[name]), value, err_msg=name, **tol)


# Random inputs ---------------------------------------------------------------------------------


def random_scores(seed: int, in_batch: bool, batch: int = B, group: int = G, scale: float = 4.0):
    """Dense, sparse and colbert score matrices ([B, B*G] or [B, G]) and [B, G] teacher scores."""
    rng = np.random.default_rng(seed)
    cols = batch * group if in_batch else group
    mats = [rng.normal(0.0, scale, (batch, cols)).astype(np.float32) for _ in range(3)]
    teacher = rng.normal(0.0, 2.0, (batch, group)).astype(np.float32)
    return (*mats, teacher)


# Building blocks -------------------------------------------------------------------------------


@pytest.mark.parametrize("in_batch", [True, False])
def test_cross_entropy_targets(in_batch):
    dense, *_ = random_scores(0, in_batch)
    targets = losses.positive_columns(B, G, in_batch)
    np.testing.assert_array_equal(np.asarray(targets), ref_targets(B, G, in_batch))
    np.testing.assert_allclose(
        losses.cross_entropy(jnp.asarray(dense), targets),
        ref_ce(dense, ref_targets(B, G, in_batch)),
        **TOL,
    )


@pytest.mark.parametrize("in_batch", [True, False])
def test_m3_kd_loss(in_batch):
    dense, _, _, teacher = random_scores(1, in_batch)
    probs = ref_softmax(teacher)
    got = losses.m3_kd_loss(jnp.asarray(dense), jnp.asarray(probs, jnp.float32), G, in_batch)
    np.testing.assert_allclose(got, ref_m3_kd(dense, probs, G, in_batch), **TOL)
    # The masking matters: without it the loss is the plain teacher-weighted CE sum, which differs.
    targets = ref_targets(B, G, in_batch)
    unmasked = sum(
        np.mean(probs[:, i] * -ref_log_softmax(dense)[np.arange(B), targets + i]) for i in range(G)
    )
    assert abs(float(got) - unmasked) > 1e-3


def test_group_scores():
    dense, *_ = random_scores(2, True)
    np.testing.assert_array_equal(
        np.asarray(losses.group_scores(jnp.asarray(dense), G, True)), ref_own_group(dense, G, True)
    )


# The unified objective -------------------------------------------------------------------------

TEACHER_CASES = [(False, "m3_kd_loss"), (True, "m3_kd_loss"), (True, "kl_div")]


@functools.cache
def _jitted_unified(teacher: bool, kd_type: str, in_batch: bool):
    """unified_loss under jit with `self_distill` a traced jnp bool."""

    def fn(dense, sparse, colbert, teacher_scores, self_distill):
        return losses.unified_loss(
            dense,
            sparse,
            colbert,
            LossConfig(kd_loss_type=kd_type, in_batch_negatives=in_batch),
            group_size=G,
            teacher_scores=teacher_scores if teacher else None,
            self_distill=self_distill,
        )

    return jax.jit(fn)


@pytest.mark.parametrize("teacher,kd_type", TEACHER_CASES)
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("self_distill", [True, False, "traced"])
def test_unified_loss_matches_reference(teacher, kd_type, in_batch, self_distill):
    seed = 10 + 2 * TEACHER_CASES.index((teacher, kd_type)) + in_batch
    dense, sparse, colbert, teacher_scores = random_scores(seed, in_batch)
    flags = [True, False] if self_distill == "traced" else [self_distill]
    for flag in flags:
        if self_distill == "traced":
            fn = _jitted_unified(teacher, kd_type, in_batch)
            total, parts = fn(dense, sparse, colbert, teacher_scores, jnp.asarray(flag))
        else:
            total, parts = losses.unified_loss(
                jnp.asarray(dense),
                jnp.asarray(sparse),
                jnp.asarray(colbert),
                LossConfig(kd_loss_type=kd_type, in_batch_negatives=in_batch, self_distill=flag),
                group_size=G,
                teacher_scores=jnp.asarray(teacher_scores) if teacher else None,
            )
        expected = ref_unified(
            dense,
            sparse,
            colbert,
            G,
            teacher_scores=teacher_scores if teacher else None,
            self_distill=flag,
            kd_type=kd_type,
            in_batch=in_batch,
        )
        assert_parts_close(parts, expected)
        np.testing.assert_allclose(total, expected["loss"], **TOL)


@pytest.mark.parametrize("teacher", [False, True])
def test_dense_only_when_not_unified(teacher):
    dense, _, _, teacher_scores = random_scores(20, True)
    total, parts = losses.unified_loss(
        jnp.asarray(dense),
        None,
        None,
        LossConfig(),
        group_size=G,
        teacher_scores=jnp.asarray(teacher_scores) if teacher else None,
    )
    expected = ref_unified(dense, None, None, G, teacher_scores=teacher_scores if teacher else None)
    assert_parts_close(parts, expected)
    np.testing.assert_allclose(total, expected["loss"], **TOL)


def test_unified_needs_both_heads():
    dense, sparse, _, _ = random_scores(21, True)
    with pytest.raises(ValueError, match="both"):
        losses.unified_loss(
            jnp.asarray(dense), jnp.asarray(sparse), None, LossConfig(), group_size=G
        )


def test_precomputed_dense_loss_replaces_only_the_dense_term():
    """dense_loss (the cross-device term) replaces L_dense; s_inter and L'_dense keep local scores."""
    dense, sparse, colbert, _ = random_scores(22, True)
    total, parts = losses.unified_loss(
        jnp.asarray(dense),
        jnp.asarray(sparse),
        jnp.asarray(colbert),
        LossConfig(),
        group_size=G,
        dense_loss=jnp.asarray(7.5, jnp.float32),
    )
    expected = ref_unified(dense, sparse, colbert, G, dense_loss=7.5)
    assert_parts_close(parts, expected)
    np.testing.assert_allclose(total, expected["loss"], **TOL)


def test_unknown_kd_type():
    dense, _, _, teacher_scores = random_scores(23, True)
    with pytest.raises(ValueError, match="kd_loss_type"):
        LossConfig(kd_loss_type="kl")
    with pytest.raises(ValueError, match="kd_loss_type"):
        losses.contrastive_loss(
            jnp.asarray(dense), G, True, jnp.asarray(teacher_scores), kd_loss_type="kl"
        )


# Gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_batch", [True, False])
def test_self_distill_teacher_is_stop_gradient(in_batch):
    """∂L'/∂S_* with T = softmax(s_inter) held constant: (softmax(S_*) − T)·λ_* / (3B)."""
    dense, sparse, colbert, _ = random_scores(30, in_batch)

    def distill(d, s, c):
        config = LossConfig(in_batch_negatives=in_batch)
        _, parts = losses.unified_loss(d, s, c, config, group_size=G)
        return parts["distill"]

    grads = jax.grad(distill, argnums=(0, 1, 2))(
        jnp.asarray(dense), jnp.asarray(sparse), jnp.asarray(colbert)
    )
    target = ref_softmax(dense + 0.3 * sparse + colbert)
    for grad, scores, weight in zip(grads, (dense, sparse, colbert), (1.0, 0.1, 1.0), strict=True):
        expected = weight * (ref_softmax(scores) - target) / (3 * B)
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def _finite_difference(fn, arrays, eps=1e-4):
    """Central differences of a float64 scalar function of several arrays."""
    grads = []
    for k, array in enumerate(arrays):
        grad = np.zeros_like(array, np.float64)
        for index in np.ndindex(array.shape):
            plus = [a.astype(np.float64).copy() for a in arrays]
            minus = [a.astype(np.float64).copy() for a in arrays]
            plus[k][index] += eps
            minus[k][index] -= eps
            grad[index] = (fn(*plus) - fn(*minus)) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("teacher,kd_type", TEACHER_CASES)
def test_total_gradient_matches_finite_differences(teacher, kd_type):
    """The whole objective's gradient, with the self-distillation teacher held constant."""
    batch, group = 2, 2
    dense, sparse, colbert, teacher_scores = random_scores(31, True, batch, group, scale=2.0)
    teacher_scores = teacher_scores if teacher else None
    fixed_inter = dense.astype(np.float64) + 0.3 * sparse + colbert

    def ref_total(d, s, c):
        parts = ref_unified(
            d,
            s,
            c,
            group,
            teacher_scores=teacher_scores,
            kd_type=kd_type,
            ensemble_teacher=fixed_inter,
        )
        return parts["loss"]

    def total(d, s, c):
        return losses.unified_loss(
            d,
            s,
            c,
            LossConfig(kd_loss_type=kd_type),
            group_size=group,
            teacher_scores=None if teacher_scores is None else jnp.asarray(teacher_scores),
        )[0]

    grads = jax.grad(total, argnums=(0, 1, 2))(
        jnp.asarray(dense), jnp.asarray(sparse), jnp.asarray(colbert)
    )
    expected = _finite_difference(ref_total, [dense, sparse, colbert])
    for grad, exp in zip(grads, expected, strict=True):
        np.testing.assert_allclose(grad, exp, rtol=1e-3, atol=1e-6)


def test_scale_gradient():
    x = jnp.asarray(np.random.default_rng(40).normal(size=(5,)), jnp.float32)
    np.testing.assert_allclose(losses.scale_gradient(x, 0.25), x, rtol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(losses.scale_gradient(v, 0.25) ** 2))(x)
    np.testing.assert_allclose(grad, 0.25 * 2 * np.asarray(x), rtol=1e-6)
    grad_one = jax.grad(lambda v: jnp.sum(losses.scale_gradient(v, 1.0) ** 2))(x)
    np.testing.assert_allclose(grad_one, 2 * np.asarray(x), rtol=1e-6)
