"""The one mapping between PyTorch BGE-M3 tensor names and m3_jax parameter paths.

Torch `nn.Linear.weight` is [out, in]; our kernels are [in, out], with attention heads kept as a
separate axis ([embed, heads, head_dim] for q/k/v, [heads, head_dim, embed] for the output).
Both conversion directions use `TensorMapping.to_m3` / `to_torch`, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from m3_jax.config import ModelConfig

# Tensors a transformers checkpoint may carry that M3 never uses.
IGNORED_PREFIXES = ("pooler.", "lm_head.", "embeddings.position_ids")
ENCODER_PREFIX = "roberta."  # present in *ForMaskedLM checkpoints such as xlm-roberta-large
COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    torch_name: str  # key in the encoder state dict, or "colbert_linear.pt:weight" for heads
    path: tuple[str | int, ...]  # path in the m3_jax params pytree
    to_m3: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def tensor_mappings(config: ModelConfig) -> list[TensorMapping]:
    e, h, d = config.hidden_size, config.num_attention_heads, config.head_dim
    maps: list[TensorMapping] = []

    def add(torch_name, path, to_m3=_same, to_torch=_same):
        maps.append(TensorMapping(torch_name, tuple(path), to_m3, to_torch))

    emb = ("encoder", "embeddings")
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        add(f"embeddings.{name}.weight", (*emb, name, "embedding"))
    add("embeddings.LayerNorm.weight", (*emb, "layer_norm", "scale"))
    add("embeddings.LayerNorm.bias", (*emb, "layer_norm", "bias"))
    for i in range(config.num_hidden_layers):
        t, p = f"encoder.layer.{i}", ("encoder", "layers", i)
        for proj in ("query", "key", "value"):
            add(
                f"{t}.attention.self.{proj}.weight",
                (*p, "attention", proj, "kernel"),
                lambda w: w.T.reshape(e, h, d),
                lambda k: np.ascontiguousarray(k.reshape(e, h * d).T),
            )
            add(
                f"{t}.attention.self.{proj}.bias",
                (*p, "attention", proj, "bias"),
                lambda b: b.reshape(h, d),
                lambda b: b.reshape(h * d),
            )
        add(
            f"{t}.attention.output.dense.weight",
            (*p, "attention", "output", "kernel"),
            lambda w: w.T.reshape(h, d, e),
            lambda k: np.ascontiguousarray(k.reshape(h * d, e).T),
        )
        add(f"{t}.attention.output.dense.bias", (*p, "attention", "output", "bias"))
        for torch_ln, our_ln in (
            ("attention.output.LayerNorm", "attention_layer_norm"),
            ("output.LayerNorm", "output_layer_norm"),
        ):
            add(f"{t}.{torch_ln}.weight", (*p, our_ln, "scale"))
            add(f"{t}.{torch_ln}.bias", (*p, our_ln, "bias"))
        for torch_dense, ours in (
            ("intermediate.dense", "intermediate"),
            ("output.dense", "output"),
        ):
            add(f"{t}.{torch_dense}.weight", (*p, ours, "kernel"), _transpose, _transpose)
            add(f"{t}.{torch_dense}.bias", (*p, ours, "bias"))
    for head_file, ours in ((COLBERT_FILE, "colbert_linear"), (SPARSE_FILE, "sparse_linear")):
        add(f"{head_file}:weight", (ours, "kernel"), _transpose, _transpose)
        add(f"{head_file}:bias", (ours, "bias"))
    return maps


def set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree
