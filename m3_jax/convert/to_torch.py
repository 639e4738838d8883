"""m3_jax params → PyTorch BGE-M3 tensors (the inverse of from_torch, same mapping table)."""

from __future__ import annotations

import numpy as np

from m3_jax.config import ModelConfig
from m3_jax.convert.layout import get_path, tensor_mappings
from m3_jax.model_dir import Params, check_params

ENCODER = "encoder"


def torch_state_dicts(config: ModelConfig, params: Params) -> dict[str, dict[str, np.ndarray]]:
    """{'encoder': XLMRobertaModel state dict, 'colbert_linear.pt': ..., 'sparse_linear.pt': ...}
    as float32 numpy arrays in PyTorch layout ([out, in] linear weights)."""
    check_params(params, config, "params")
    out: dict[str, dict[str, np.ndarray]] = {ENCODER: {}}
    for m in tensor_mappings(config):
        value = m.to_torch(np.asarray(get_path(params, m.path), np.float32))
        file, sep, key = m.torch_name.partition(":")
        if sep:
            out.setdefault(file, {})[key] = value
        else:
            out[ENCODER][m.torch_name] = value
    return out
