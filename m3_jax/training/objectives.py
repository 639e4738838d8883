"""What a run trains, `objective` in its config: the pieces of the training loop that differ.

- "m3": the contrastive M3 objective on query-passage groups (`step.py`): fine-tuning with
  self-knowledge distillation, and with `loss.unified=False` the dense-only unsupervised stage.
- "retromae": RetroMAE pre-training of the encoder on plain texts (`retromae_step.py`): the
  loader's passage rows (group size 1) become masked copies and decoder masks (`TextMasker`),
  and the exported model is the encoder with fresh colbert and sparse heads (the init of the
  later stages) plus the trained MLM head (`mlm_head/`).
Both run in the same loop, mesh rules, checkpoints, resume and evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from m3_jax.config import ModelConfig, RunConfig
from m3_jax.convert.from_torch import random_heads
from m3_jax.data.mlm_masks import TextMasker
from m3_jax.data.pipeline import BatchTransform
from m3_jax.model import M3Model, Params, RetroMAEModel
from m3_jax.model.abstract import ModelClass
from m3_jax.training import retromae_step, sharded, step
from m3_jax.training.retromae_step import RetroMAEStepConfig
from m3_jax.training.step import StepConfig


@dataclasses.dataclass(frozen=True)
class Objective:
    model_class: ModelClass
    train_step: Callable
    eval_loss: Callable
    # (run, model config, data-parallel size, in-batch negatives) -> the step's static config
    step_config: Callable[[RunConfig, ModelConfig, int, bool], Any]
    batch_spec: Callable  # BatchShape -> the global batch as ShapeDtypeStructs
    transform: BatchTransform | None  # the loader's host-batch transform
    # train-state params -> (the embedder's M3Model params, the MLM head or None)
    model_params: Callable[[Params], tuple[Params, Params | None]]


def m3_step_config(
    run: RunConfig, model_config: ModelConfig, dp: int, in_batch_negatives: bool
) -> StepConfig:
    loss = run.loss
    shards = dp if loss.num_shards < 0 else loss.num_shards
    # Datasets from `*no_in_batch_neg` directories score each query on its own group only.
    loss = dataclasses.replace(
        loss, num_shards=shards, in_batch_negatives=loss.in_batch_negatives and in_batch_negatives
    )
    return StepConfig(
        loss,
        run.train.sub_batch_size,
        run.train.dropout,
        data_shards=dp,
        special_token_ids=model_config.special_token_ids,
    )


def retromae_step_config(
    run: RunConfig, model_config: ModelConfig, dp: int, in_batch_negatives: bool
) -> RetroMAEStepConfig:
    del model_config, in_batch_negatives  # texts have no negatives
    return RetroMAEStepConfig(run.retromae, run.train.sub_batch_size, run.train.dropout, dp)


def make_objective(run: RunConfig, model_config: ModelConfig, tokenizer: Any) -> Objective:
    if run.objective == "retromae":
        heads = random_heads(model_config, run.seed)
        return Objective(
            RetroMAEModel,
            retromae_step.train_step,
            retromae_step.eval_loss,
            retromae_step_config,
            functools.partial(retromae_step.batch_spec, config=run.retromae),
            TextMasker(run.retromae, tokenizer),
            lambda params: ({"encoder": params["encoder"], **heads}, params["lm_head"]),
        )
    return Objective(
        M3Model,
        step.train_step,
        step.eval_loss,
        m3_step_config,
        functools.partial(sharded.batch_spec, with_teacher=run.data.knowledge_distillation),
        None,
        lambda params: (params, None),
    )
