"""m3_jax.losses.local_score_matrices and m3_loss (model outputs → loss) against numpy.

Score matrices are rebuilt here from the reference definitions (the reference's: dense dot product,
max-pooled vocab vectors with the special ids zeroed, ColBERT mean-of-max over real rows); the
loss formulas come from the float64 references in tests/test_losses.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import TOL, assert_parts_close, ref_head_loss, ref_softmax, ref_unified

from m3_jax.config import LossConfig
from m3_jax.losses import local_score_matrices, m3_loss
from m3_jax.model import M3Output

B, G = 4, 3
LQ, LP, DIM = 6, 7, 8
VOCAB = 14
SPECIAL_IDS = (0, 1, 2, 3)  # cls, pad, eos, unk
TAU = 0.05


# Random model outputs --------------------------------------------------------------------------


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_outputs(rng: np.random.Generator, num: int, length: int) -> tuple[M3Output, np.ndarray]:
    """M3Output-like arrays for right-padded texts <s> … </s> <pad>…, and their token ids.

    Ids come from a small vocab (repeats within and across texts), with an occasional <unk>;
    sparse weights are ≥ 0, zero at pads and special ids and zero at some other tokens too.
    """
    lengths = rng.integers(3, length + 1, num)
    positions = np.arange(length)[None, :]
    mask = positions < lengths[:, None]
    ids = rng.integers(4, VOCAB, (num, length))
    ids[rng.random((num, length)) < 0.1] = 3
    ids[:, 0] = 0
    ids[np.arange(num), lengths - 1] = 2
    ids = np.where(mask, ids, 1).astype(np.int32)
    sparse = rng.uniform(0.0, 2.0, (num, length))
    sparse[rng.random((num, length)) < 0.25] = 0.0
    sparse[~mask | np.isin(ids, SPECIAL_IDS)] = 0.0
    colbert_mask = mask[:, 1:]
    colbert = _normalize(rng.normal(size=(num, length - 1, DIM))) * colbert_mask[..., None]
    out = M3Output(
        dense=jnp.asarray(_normalize(rng.normal(size=(num, DIM))), jnp.float32),
        sparse=jnp.asarray(sparse, jnp.float32),
        colbert=jnp.asarray(colbert, jnp.float32),
        colbert_mask=jnp.asarray(colbert_mask),
    )
    return out, ids


def make_batch(seed: int):
    rng = np.random.default_rng(seed)
    q, q_ids = random_outputs(rng, B, LQ)
    p, p_ids = random_outputs(rng, B * G, LP)
    teacher = rng.normal(0.0, 2.0, (B, G)).astype(np.float32)
    return q, p, q_ids, p_ids, teacher


# Independent references ------------------------------------------------------------------------


def ref_vocab_vector(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The reference's [V] sparse embedding: max over positions per id, special columns zeroed."""
    vec = np.zeros(VOCAB, np.float64)
    np.maximum.at(vec, ids, np.asarray(weights, np.float64))
    vec[list(SPECIAL_IDS)] = 0.0
    return vec


def ref_colbert(qv, q_mask, pv, p_mask) -> float:
    """Mean over real query rows of the max over real passage rows."""
    sim = np.asarray(qv, np.float64)[q_mask] @ np.asarray(pv, np.float64)[p_mask].T
    return float(sim.max(axis=1).mean())


def ref_pair_scores(q, p, q_ids, p_ids, i, j) -> dict[str, float]:
    """Temperature-scaled dense, sparse and colbert scores of query i against passage j."""
    qn = jax.tree.map(np.asarray, q)
    pn = jax.tree.map(np.asarray, p)
    dense = float(np.asarray(qn.dense[i], np.float64) @ pn.dense[j])
    sparse = float(
        ref_vocab_vector(q_ids[i], qn.sparse[i]) @ ref_vocab_vector(p_ids[j], pn.sparse[j])
    )
    colbert = ref_colbert(qn.colbert[i], qn.colbert_mask[i], pn.colbert[j], pn.colbert_mask[j])
    return {"dense": dense / TAU, "sparse": sparse / TAU, "colbert": colbert / TAU}


def ref_local_matrices(q, p, q_ids, p_ids, shards, in_batch) -> dict[str, np.ndarray]:
    """[W, B/W, B/W*G] (or [W, B/W, G]) matrices: shard s holds queries s*b.. and their passages."""
    b = B // shards
    cols = b * G if in_batch else G
    out = {name: np.zeros((shards, b, cols)) for name in ("dense", "sparse", "colbert")}
    for s in range(shards):
        for row in range(b):
            i = s * b + row
            first = s * b * G if in_batch else i * G
            for col in range(cols):
                for name, value in ref_pair_scores(q, p, q_ids, p_ids, i, first + col).items():
                    out[name][s, row, col] = value
    return out


def ref_m3_loss(q, p, q_ids, p_ids, config: LossConfig, step, teacher) -> dict[str, float]:
    """The M3 objective on each shard's local groups, averaged; the dense term global when
    cross-device."""
    w = config.num_shards
    b = B // w
    local = ref_local_matrices(q, p, q_ids, p_ids, w, config.in_batch_negatives)
    dense_loss = None
    if config.cross_device_negatives and config.in_batch_negatives and w > 1:
        global_dense = np.asarray(q.dense, np.float64) @ np.asarray(p.dense, np.float64).T / TAU
        probs = None if teacher is None else ref_softmax(teacher)
        dense_loss = ref_head_loss(global_dense, G, True, probs, config.kd_loss_type)
    distill_on = config.self_distill and config.unified and step > config.self_distill_start_step
    per_shard = []
    for s in range(w):
        per_shard.append(
            ref_unified(
                local["dense"][s],
                local["sparse"][s] if config.unified else None,
                local["colbert"][s] if config.unified else None,
                G,
                teacher_scores=None if teacher is None else teacher[s * b : (s + 1) * b],
                self_distill=distill_on,
                kd_type=config.kd_loss_type,
                in_batch=config.in_batch_negatives,
                dense_loss=dense_loss,
            )
        )
    return {name: float(np.mean([p[name] for p in per_shard])) for name in per_shard[0]}


def config(**overrides) -> LossConfig:
    return dataclasses.replace(LossConfig(temperature=TAU, num_shards=1), **overrides)


@functools.cache
def _jitted_m3_loss(cfg: LossConfig, with_teacher: bool):
    def fn(q, p, q_ids, p_ids, step, teacher):
        return m3_loss(
            q, p, q_ids, p_ids, cfg, step=step, teacher_scores=teacher if with_teacher else None
        )

    return jax.jit(fn)


def loss_and_parts(q, p, q_ids, p_ids, cfg, step=0, teacher=None):
    """m3_loss under jit (op-by-op dispatch of the vmapped score functions is slow)."""
    fn = _jitted_m3_loss(cfg, teacher is not None)
    return fn(q, p, q_ids, p_ids, jnp.asarray(step, jnp.int32), teacher)


# Score matrices --------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("in_batch", [True, False])
def test_local_score_matrices(shards, in_batch):
    q, p, q_ids, p_ids, _ = make_batch(0)
    cfg = config(num_shards=shards, in_batch_negatives=in_batch)
    got = jax.jit(local_score_matrices, static_argnums=4)(q, p, q_ids, p_ids, cfg)
    expected = ref_local_matrices(q, p, q_ids, p_ids, shards, in_batch)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, err_msg=name, **TOL)


def test_local_score_matrices_dense_only():
    q, p, q_ids, p_ids, _ = make_batch(1)
    got = local_score_matrices(q, p, q_ids, p_ids, config(unified=False, num_shards=2))
    assert set(got) == {"dense"}


# The loss --------------------------------------------------------------------------------------

# Shared by several tests (each distinct config is one compile): self-distillation from step 4.
BASE = dict(num_shards=2, self_distill_start_step=3)
ACTIVE_STEP = 10


@pytest.mark.parametrize(
    "overrides,kd_type",
    [
        (dict(num_shards=1), None),
        (BASE, None),
        (dict(BASE, cross_device_negatives=False), None),
        (BASE, "m3_kd_loss"),
        (dict(BASE, cross_device_negatives=False), "kl_div"),
        (dict(BASE, in_batch_negatives=False), "m3_kd_loss"),
    ],
    ids=["W1", "W2-cross", "W2-local", "W2-cross-m3kd", "W2-local-kldiv", "W2-no-in-batch-m3kd"],
)
def test_m3_loss_matches_reference(overrides, kd_type):
    q, p, q_ids, p_ids, teacher = make_batch(2)
    teacher = None if kd_type is None else teacher
    cfg = config(**overrides, kd_loss_type=kd_type or "m3_kd_loss")
    loss, parts = loss_and_parts(q, p, q_ids, p_ids, cfg, ACTIVE_STEP, teacher)
    expected = ref_m3_loss(q, p, q_ids, p_ids, cfg, ACTIVE_STEP, teacher)
    assert_parts_close(parts, expected)
    np.testing.assert_allclose(loss, expected["loss"], **TOL)


def test_cross_device_dense_term_is_global():
    """With W=2 the cross-device dense loss is the CE over the full [B, B*G] matrix, local without."""
    q, p, q_ids, p_ids, _ = make_batch(3)
    global_dense = np.asarray(q.dense, np.float64) @ np.asarray(p.dense, np.float64).T / TAU
    _, parts = loss_and_parts(q, p, q_ids, p_ids, config(**BASE), ACTIVE_STEP)
    np.testing.assert_allclose(parts["dense"], ref_head_loss(global_dense, G, True), **TOL)
    cfg = config(**BASE, cross_device_negatives=False)
    _, local_parts = loss_and_parts(q, p, q_ids, p_ids, cfg, ACTIVE_STEP)
    assert abs(float(local_parts["dense"]) - float(parts["dense"])) > 1e-3


def _dense_grads(cfg, q, p, q_ids, p_ids):
    """∂loss / ∂(q.dense, p.dense)."""

    def fn(q_dense, p_dense):
        q_out, p_out = q.replace(dense=q_dense), p.replace(dense=p_dense)
        return m3_loss(q_out, p_out, q_ids, p_ids, cfg, step=ACTIVE_STEP)[0]

    return [np.asarray(g) for g in jax.jit(jax.grad(fn, argnums=(0, 1)))(q.dense, p.dense)]


def test_ddp_dense_grad_scale():
    """Same loss values; the global dense term's gradient is 1/W of the true gradient (§5.3)."""
    shards = BASE["num_shards"]
    q, p, q_ids, p_ids, _ = make_batch(4)
    true_cfg = config(**BASE)
    ddp_cfg = config(**BASE, ddp_dense_grad_scale=True)
    _, true_parts = loss_and_parts(q, p, q_ids, p_ids, true_cfg, ACTIVE_STEP)
    _, ddp_parts = loss_and_parts(q, p, q_ids, p_ids, ddp_cfg, ACTIVE_STEP)
    assert_parts_close(ddp_parts, {k: float(v) for k, v in true_parts.items()})

    def global_ce(q_dense, p_dense):
        logits = jnp.matmul(q_dense, p_dense.T, precision="highest") / TAU
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(log_probs[jnp.arange(B), jnp.arange(B) * G])

    direct = [np.asarray(g) for g in jax.grad(global_ce, argnums=(0, 1))(q.dense, p.dense)]

    # Dense-only training: the gradient is the global CE's, and 1/W of it under DDP.
    dense_true = _dense_grads(dataclasses.replace(true_cfg, unified=False), q, p, q_ids, p_ids)
    dense_ddp = _dense_grads(dataclasses.replace(ddp_cfg, unified=False), q, p, q_ids, p_ids)
    for d, t, s in zip(direct, dense_true, dense_ddp, strict=True):
        np.testing.assert_allclose(t, d, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s, d / shards, rtol=1e-5, atol=1e-7)

    # Unified: only the dense term (weight 1/4 in L, then (L + L')/2) is rescaled.
    true_total = _dense_grads(true_cfg, q, p, q_ids, p_ids)
    ddp_total = _dense_grads(ddp_cfg, q, p, q_ids, p_ids)
    for d, t, s in zip(direct, true_total, ddp_total, strict=True):
        np.testing.assert_allclose(t - s, (1 - 1 / shards) / 8 * d, rtol=1e-4, atol=1e-6)


def test_self_distill_start_step():
    """At step <= start the loss is L (not halved); after it, (L + L')/2 (the step is traced)."""
    q, p, q_ids, p_ids, _ = make_batch(5)
    cfg = config(**BASE)
    start = cfg.self_distill_start_step
    losses = {}
    for step in (0, start, start + 1, ACTIVE_STEP):
        loss, parts = loss_and_parts(q, p, q_ids, p_ids, cfg, step)
        expected = ref_m3_loss(q, p, q_ids, p_ids, cfg, step, None)
        np.testing.assert_allclose(loss, expected["loss"], **TOL)
        if step <= start:
            np.testing.assert_allclose(loss, parts["contrastive"], **TOL)
        else:
            np.testing.assert_allclose(loss, (parts["contrastive"] + parts["distill"]) / 2, **TOL)
        losses[step] = float(loss)
    # L and (L + L')/2 are far apart here, so the switch is visible in m3_jax's own loss.
    assert abs(losses[start] - losses[start + 1]) > 1e-2
    off_cfg = config(**BASE, self_distill=False)
    off, _ = loss_and_parts(q, p, q_ids, p_ids, off_cfg, ACTIVE_STEP)
    np.testing.assert_allclose(off, losses[start], **TOL)


@pytest.mark.parametrize("cross_device", [True, False])
def test_not_unified_is_dense_only(cross_device):
    q, p, q_ids, p_ids, _ = make_batch(6)
    cfg = config(num_shards=2, unified=False, cross_device_negatives=cross_device)
    loss, parts = loss_and_parts(q, p, q_ids, p_ids, cfg)
    expected = ref_m3_loss(q, p, q_ids, p_ids, cfg, 0, None)
    assert set(expected) == {"dense", "loss"}
    assert_parts_close(parts, expected)
    np.testing.assert_allclose(loss, expected["dense"], **TOL)
