"""Configuration as typed, frozen dataclasses: the model's geometry and numerics (`model.py`) and
every knob of a training run (`run.py`), each default written once."""

from m3_jax.config.model import (
    ATTENTION_IMPLS,
    DTYPES,
    PRESETS,
    ModelConfig,
    base_size,
    bge_m3,
    tiny,
)
from m3_jax.config.run import (
    FSDP_RULES,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LossConfig,
    MeshConfig,
    ModelSource,
    OptimConfig,
    RetroMAEConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "ATTENTION_IMPLS",
    "DTYPES",
    "FSDP_RULES",
    "PRESETS",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LossConfig",
    "MeshConfig",
    "ModelConfig",
    "ModelSource",
    "OptimConfig",
    "RetroMAEConfig",
    "RunConfig",
    "TrainConfig",
    "base_size",
    "bge_m3",
    "tiny",
]
