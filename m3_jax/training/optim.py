"""The optax chain: global-norm clipping, AdamW without its learning rate, no weight decay on
biases and LayerNorm, and optionally frozen parameter groups; and the linear warm-up/decay
learning-rate schedule, evaluated on the host.

The learning rate is an input of the compiled train step (`train_step(state, batch, lr)`), not a
schedule inside it: one compiled program serves any `num_steps`, warm-up or peak lr, so a run
extended on resume, or relaunched with another lr, hits the persistent compilation cache."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from m3_jax.config import OptimConfig
from m3_jax.model import Params

HEAD_NAMES = ("colbert_linear", "sparse_linear")


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear 0 → lr over the warm-up, then linear lr → 0 at `total_steps` (HF's "linear"), as
    a function of the number of updates already applied."""
    warmup = config.warmup_steps
    if warmup is None:
        warmup = int(config.warmup_ratio * total_steps)
    warmup = max(0, min(warmup, total_steps))
    decay = max(total_steps - warmup, 1)

    def schedule(step: int) -> float:
        step = int(step)
        if step < warmup:
            return config.lr * step / warmup
        return config.lr * (1.0 - min(step - warmup, decay) / decay)

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def decay_mask(params: Params) -> Params:
    """True where weight decay applies: everything except biases and LayerNorm scales."""

    def decays(path, _):
        return _path_names(path)[-1] not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(decays, params)


def trainable_labels(params: Params, config: OptimConfig) -> Params:
    """'train' or 'frozen' per parameter, from fix_encoder / fix_position_embedding."""

    def label(path, _):
        names = _path_names(path)
        if config.fix_encoder and names[0] not in HEAD_NAMES:
            return "frozen"
        if config.fix_position_embedding and "position_embeddings" in names:
            return "frozen"
        return "train"

    return jax.tree_util.tree_map_with_path(label, params)


def apply_update(
    tx: optax.GradientTransformation,
    grads: Params,
    opt_state: optax.OptState,
    params: Params,
    lr: jax.Array | float,
) -> tuple[Params, optax.OptState]:
    """(params − lr · tx's update, tx's new state): one AdamW step at learning rate `lr`."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates)), opt_state


def make_optimizer(
    config: OptimConfig, total_steps: int, params: Params
) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """(tx, schedule): tx's updates are AdamW's before the learning rate, which `apply_update`
    applies as −schedule(step) · update (optax.adamw's order: Adam, decayed weights, then lr)."""
    chain = []
    if config.max_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(config.max_grad_norm))
    chain.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
    chain.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    tx = optax.chain(*chain)
    labels = trainable_labels(params, config)
    if any(v == "frozen" for v in jax.tree.leaves(labels)):
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, learning_rate_schedule(config, total_steps)
