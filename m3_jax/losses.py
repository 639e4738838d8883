"""The M3 training objective, as pure functions over score matrices.

Notation: B queries, G passages per query (1 positive then G-1 negatives), passages laid out
[q0: pos, neg, ..., q1: pos, neg, ...]. With in-batch negatives a score matrix is [B, B*G] and the
positive of row b is column b*G; without, it is [B, G] and the positive is column 0. Scores passed
to these functions are already divided by the temperature.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m3_jax import scores
from m3_jax.config import LossConfig
from m3_jax.config.run import KDLossType
from m3_jax.model import M3Output
from m3_jax.model.axes import BATCH_AXES


def positive_columns(batch_size: int, group_size: int, in_batch_negatives: bool) -> jax.Array:
    """[B] column of each row's positive: b*G with in-batch negatives, else 0."""
    if in_batch_negatives:
        return jnp.arange(batch_size) * group_size
    return jnp.zeros((batch_size,), jnp.int32)


def cross_entropy(scores: jax.Array, targets: jax.Array) -> jax.Array:
    """InfoNCE: mean_b −log softmax(scores)[b, targets[b]] (torch CrossEntropyLoss, mean)."""
    log_probs = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[:, None], axis=-1))


def soft_cross_entropy(scores: jax.Array, target_probs: jax.Array) -> jax.Array:
    """−mean_b Σ_j p_bj · log softmax(scores)_bj.

    FlagEmbedding calls this "kl_div"; it lacks KL's entropy term, which has no gradient.
    """
    log_probs = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(target_probs * log_probs, axis=-1))


def group_scores(scores: jax.Array, group_size: int, in_batch_negatives: bool) -> jax.Array:
    """Each query's own G passages: [B, B*G] → [B, G] (a [B, G] matrix is returned as is)."""
    if not in_batch_negatives:
        return scores
    batch = scores.shape[0]
    blocks = scores.reshape(batch, batch, group_size)
    return blocks[jnp.arange(batch), jnp.arange(batch)]


def m3_kd_loss(
    scores: jax.Array, teacher_probs: jax.Array, group_size: int, in_batch_negatives: bool
) -> jax.Array:
    """Teacher-weighted listwise loss (FlagEmbedding's `m3_kd_loss`).

    Σ_i mean_b T[b,i] · CE_b(S + M_i, target_b + i), where M_i masks (with the dtype's minimum)
    the row's own group members 0..i-1, so member i competes with later members and all other
    in-batch passages. teacher_probs: [B, G] = softmax(teacher scores), no temperature.
    """
    scores = scores.astype(jnp.float32)
    batch = scores.shape[0]
    first = positive_columns(batch, group_size, in_batch_negatives)
    rows = jnp.arange(batch)
    mask = jnp.zeros_like(scores)
    loss = jnp.zeros((), jnp.float32)
    for i in range(group_size):
        target = first + i
        log_probs = jax.nn.log_softmax(scores + mask, axis=-1)
        loss += jnp.mean(teacher_probs[:, i] * -log_probs[rows, target])
        mask = mask.at[rows, target].set(jnp.finfo(jnp.float32).min)
    return loss


def contrastive_loss(
    scores: jax.Array,
    group_size: int,
    in_batch_negatives: bool,
    teacher_probs: jax.Array | None = None,
    kd_loss_type: KDLossType = "m3_kd_loss",
) -> jax.Array:
    """One head's loss: InfoNCE without a teacher; with one, `m3_kd_loss`, or (`kl_div`) the
    soft cross-entropy on the query's own group plus InfoNCE on the full matrix."""
    targets = positive_columns(scores.shape[0], group_size, in_batch_negatives)
    if teacher_probs is None:
        return cross_entropy(scores, targets)
    if kd_loss_type == "m3_kd_loss":
        return m3_kd_loss(scores, teacher_probs, group_size, in_batch_negatives)
    if kd_loss_type == "kl_div":
        own = group_scores(scores, group_size, in_batch_negatives)
        return soft_cross_entropy(own, teacher_probs) + cross_entropy(scores, targets)
    raise ValueError(f"kd_loss_type={kd_loss_type!r}; expected 'm3_kd_loss' or 'kl_div'")


def self_distill_loss(student_scores: jax.Array, ensemble: jax.Array) -> jax.Array:
    """L' for one head: soft cross-entropy against softmax(stop_gradient(s_inter))."""
    teacher = jax.nn.softmax(jax.lax.stop_gradient(ensemble).astype(jnp.float32), axis=-1)
    return soft_cross_entropy(student_scores, teacher)


def unified_loss(
    dense_scores: jax.Array,
    sparse_scores: jax.Array | None,
    colbert_scores: jax.Array | None,
    config: LossConfig,
    *,
    group_size: int,
    teacher_scores: jax.Array | None = None,
    self_distill: bool | jax.Array | None = None,
    dense_loss: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The M3 objective over one set of local score matrices, weighted and with negatives as
    `config` says (its temperature is already applied to the scores).

    L  = (λ1·L_dense + L_inter + λ2·L_lex + λ3·L_mul) / 4
    L' = (λ1·L'_dense + λ2·L'_lex + λ3·L'_mul) / 3, self-distillation from s_inter
    loss = (L + L') / 2 when `self_distill` (a bool or a traced bool, e.g. step > start; None:
    `config.self_distill`), else L.
    With sparse_scores and colbert_scores None (unified fine-tuning off): loss = L_dense.

    teacher_scores: raw [B, G] reranker scores; their softmax (no temperature) replaces the hard
    labels in every L_* (`kd_loss_type`). dense_loss: a precomputed L_dense that replaces the
    local one (cross-device negatives: the dense term over the global batch).
    Returns (loss, parts) with every named component.
    """
    teacher_probs = None
    if teacher_scores is not None:
        teacher_probs = jax.nn.softmax(teacher_scores.astype(jnp.float32), axis=-1)
    if self_distill is None:
        self_distill = config.self_distill

    def head_loss(scores):
        return contrastive_loss(
            scores, group_size, config.in_batch_negatives, teacher_probs, config.kd_loss_type
        )

    l_dense = head_loss(dense_scores) if dense_loss is None else dense_loss
    if sparse_scores is None and colbert_scores is None:
        return l_dense, {"dense": l_dense, "loss": l_dense}
    if sparse_scores is None or colbert_scores is None:
        raise ValueError("unified fine-tuning needs both sparse_scores and colbert_scores")

    # s_inter = w1·s_dense + w2·s_lex + w3·s_mul, unnormalised (the scores are already over τ).
    inter = scores.weighted_sum(
        [dense_scores, sparse_scores, colbert_scores], config.ensemble_weights, normalize=False
    )
    parts = {
        "dense": l_dense,
        "sparse": head_loss(sparse_scores),
        "colbert": head_loss(colbert_scores),
        "ensemble": head_loss(inter),
    }
    w_dense, w_sparse, w_colbert = config.loss_weights
    loss = (
        w_dense * parts["dense"]
        + parts["ensemble"]
        + w_sparse * parts["sparse"]
        + w_colbert * parts["colbert"]
    ) / 4
    parts["distill_dense"] = self_distill_loss(dense_scores, inter)
    parts["distill_sparse"] = self_distill_loss(sparse_scores, inter)
    parts["distill_colbert"] = self_distill_loss(colbert_scores, inter)
    distill = (
        w_dense * parts["distill_dense"]
        + w_sparse * parts["distill_sparse"]
        + w_colbert * parts["distill_colbert"]
    ) / 3
    parts["contrastive"] = loss
    parts["distill"] = distill
    parts["loss"] = jnp.where(jnp.asarray(self_distill), (loss + distill) / 2, loss)
    return parts["loss"], parts


def dense_row_blocks(rows: int, row_block: int) -> tuple[int, int]:
    """(blocks, rows per block): the fewest equal blocks of at most `row_block` rows (0: one
    block) that hold `rows`; the last is padded by fewer rows than there are blocks."""
    blocks = 1 if row_block <= 0 else -(-rows // row_block)
    return blocks, -(-rows // blocks)


def _dense_nll_sum(
    q_dense: jax.Array,
    p_dense: jax.Array,
    first_row: jax.Array | int,
    group_size: int,
    temperature: float,
    row_block: int,
) -> jax.Array:
    """Σ_i −log softmax(q·pᵀ/τ)[i, (first_row + i)·G] over the rows of q_dense, the rows of the
    batch from `first_row` on, scored against all of p_dense.

    Rows go in the blocks of `dense_row_blocks`, padded with rows that count for nothing, under
    `jax.checkpoint`: the forward and the backward pass each hold one [block, len(p_dense)]
    block of scores, never the whole matrix.
    """
    rows = q_dense.shape[0]
    blocks, block = dense_row_blocks(rows, row_block)
    padded = blocks * block
    valid = jnp.arange(padded) < rows
    targets = jnp.where(valid, (first_row + jnp.arange(padded)) * group_size, 0)
    q_blocks = jnp.pad(q_dense, ((0, padded - rows), (0, 0))).reshape(blocks, block, -1)

    @jax.checkpoint
    def block_sum(args):
        q_block, target, keep = args
        logits = scores.dense_matrix(q_block, p_dense) / temperature
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, target[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(keep, nll, 0.0))

    sums = jax.lax.map(
        block_sum, (q_blocks, targets.reshape(blocks, block), valid.reshape(blocks, block))
    )
    return sums.sum()


def blocked_dense_loss(
    q_dense: jax.Array,
    p_dense: jax.Array,
    group_size: int,
    temperature: float,
    row_block: int,
) -> jax.Array:
    """InfoNCE over the whole batch, `cross_entropy(dense_matrix(q, p) / τ, b·G)`, without the
    [B, B*G] matrix: at the paper's stage-2 batch (B = 67,200) it would be 18 GB in fp32.

    Under a mesh with the data-parallel axes (`jax.set_mesh`), each device scores its own query
    rows against all passages (all-gathered: [B*G, D] is small) in blocks of at most
    `row_block` rows (`_dense_nll_sum`), and the row sums meet in a psum. Without a mesh, the
    same blocks run here.
    """
    rows, passages = q_dense.shape[0], p_dense.shape[0]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return _dense_nll_sum(q_dense, p_dense, 0, group_size, temperature, row_block) / rows
    devices = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if rows % devices or passages % devices:
        raise ValueError(
            f"{rows} queries and {passages} passages must split evenly over the {devices} "
            "data-parallel devices"
        )

    def device_sum(q_local, p_local):
        p_all = jax.lax.all_gather(p_local, BATCH_AXES, tiled=True)
        first_row = jax.lax.axis_index(BATCH_AXES) * q_local.shape[0]
        local = _dense_nll_sum(q_local, p_all, first_row, group_size, temperature, row_block)
        return jax.lax.psum(local, BATCH_AXES)

    rows_spec = P(BATCH_AXES, None)
    total = jax.shard_map(device_sum, in_specs=(rows_spec, rows_spec), out_specs=P())(
        q_dense, p_dense
    )
    return total / rows


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
    """x in the forward pass; `scale`·∂ in the backward pass."""
    return scale * x + jax.lax.stop_gradient((1.0 - scale) * x)


# Model-level objective ----------------------------------------------------------------------


def _shards(x: jax.Array, num_shards: int) -> jax.Array:
    """[N, ...] → [W, N / W, ...]: row blocks of consecutive queries (or their passages)."""
    if x.shape[0] % num_shards:
        raise ValueError(f"{x.shape[0]} rows do not split into {num_shards} shards")
    return x.reshape(num_shards, x.shape[0] // num_shards, *x.shape[1:])


def _per_shard(pair_fn, num_queries_args: int, in_batch_negatives: bool, group_size: int):
    """Maps a single-pair score over shards: [W, b] x [W, b*G] → [W, b, b*G] (or [W, b, G])."""

    def shard_fn(*args):
        q_args, p_args = args[:num_queries_args], args[num_queries_args:]
        over_passages = jax.vmap(pair_fn, in_axes=(None,) * num_queries_args + (0,) * len(p_args))
        if in_batch_negatives:
            return jax.vmap(over_passages, in_axes=(0,) * num_queries_args + (None,) * len(p_args))(
                *q_args, *p_args
            )
        groups = [x.reshape(-1, group_size, *x.shape[1:]) for x in p_args]
        return jax.vmap(over_passages)(*q_args, *groups)

    return jax.vmap(shard_fn)


def _dense_pair(q: jax.Array, p: jax.Array) -> jax.Array:
    return jnp.dot(q, p, precision=jax.lax.Precision.HIGHEST)


def group_size_of(q: M3Output, p: M3Output) -> int:
    """G, from the static shapes: B queries come with B*G passages."""
    queries, passages = q.dense.shape[0], p.dense.shape[0]
    if passages % queries:
        raise ValueError(f"{passages} passages do not form groups for {queries} queries")
    return passages // queries


def _num_shards(config: LossConfig) -> int:
    if config.num_shards < 1:
        raise ValueError(
            f"loss.num_shards={config.num_shards}: resolve -1 to the data-parallel size before "
            "computing the loss (the training loop does)"
        )
    return config.num_shards


def local_score_matrices(
    q: M3Output, p: M3Output, q_ids: jax.Array, p_ids: jax.Array, config: LossConfig
) -> dict[str, jax.Array]:
    """Temperature-scaled score matrices within each of W = num_shards query groups.

    q: outputs for B queries, p: for B*G passages. Returns [W, B/W, B/W*G] matrices ([W, B/W, G]
    without in-batch negatives) for "dense", and for "sparse" and "colbert" when unified.
    """
    w = _num_shards(config)
    group_size = group_size_of(q, p)
    heads = {"dense": (_dense_pair, (q.dense,), (p.dense,))}
    if config.unified:
        heads["sparse"] = (
            scores.sparse_pair,
            scores.sparse_lexicon(q_ids, q.sparse),
            scores.sparse_lexicon(p_ids, p.sparse),
        )
        heads["colbert"] = (
            scores.colbert_pair,
            (q.colbert, q.colbert_mask),
            (p.colbert, p.colbert_mask),
        )
    out = {}
    for name, (pair_fn, q_args, p_args) in heads.items():
        fn = _per_shard(pair_fn, len(q_args), config.in_batch_negatives, group_size)
        args = [_shards(x, w) for x in (*q_args, *p_args)]
        out[name] = fn(*args) / config.temperature
    return out


def m3_loss(
    q: M3Output,
    p: M3Output,
    q_ids: jax.Array,
    p_ids: jax.Array,
    config: LossConfig,
    *,
    step: jax.Array | int = 0,
    teacher_scores: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The M3 loss of a global batch: `unified_loss` on each shard's local groups, averaged over
    shards (as DDP averages ranks), with the dense term over the global batch when
    `cross_device_negatives` (its gradient scaled by 1/W with `ddp_dense_grad_scale`).

    Without teacher scores, a dense term over the whole batch (cross-device negatives, or a
    single shard) is `blocked_dense_loss`, which never builds the [B, B*G] matrix. With them,
    the cross-device term keeps the full matrix and a single shard its local one: m3_kd_loss and
    kl_div are not blocked, as distillation runs at fine-tuning batches, where [B, B*G] is small.
    """
    local = local_score_matrices(q, p, q_ids, p_ids, config)
    w = _num_shards(config)
    group_size = group_size_of(q, p)
    local_teacher = None if teacher_scores is None else _shards(teacher_scores, w)
    dense_loss = None
    cross_device = config.cross_device_negatives and config.in_batch_negatives and w > 1
    if teacher_scores is None and config.in_batch_negatives and (cross_device or w == 1):
        dense_loss = blocked_dense_loss(
            q.dense, p.dense, group_size, config.temperature, config.dense_row_block
        )
    elif teacher_scores is not None and cross_device:
        global_dense = scores.dense_matrix(q.dense, p.dense) / config.temperature
        teacher_probs = jax.nn.softmax(teacher_scores.astype(jnp.float32), axis=-1)
        dense_loss = contrastive_loss(
            global_dense, group_size, True, teacher_probs, config.kd_loss_type
        )
    if cross_device and config.ddp_dense_grad_scale:
        dense_loss = scale_gradient(dense_loss, 1.0 / w)
    self_distill = config.self_distill and config.unified
    distill_on = jnp.logical_and(self_distill, jnp.asarray(step) > config.self_distill_start_step)

    def shard_loss(dense, sparse, colbert, teacher):
        return unified_loss(
            dense,
            sparse,
            colbert,
            config,
            group_size=group_size,
            teacher_scores=teacher,
            self_distill=distill_on,
            dense_loss=dense_loss,
        )

    losses, parts = jax.vmap(shard_loss)(
        local["dense"], local.get("sparse"), local.get("colbert"), local_teacher
    )
    return losses.mean(), jax.tree.map(jnp.mean, parts)
