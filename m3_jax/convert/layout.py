"""The one mapping between PyTorch tensor names and m3_jax parameter paths: BGE-M3 (the
XLMRobertaModel state dict plus the two head files), the masked-LM head of
`XLMRobertaForMaskedLM` checkpoints such as `xlm-roberta-large` (what RetroMAE pre-training
trains), and the XLM-R cross-encoder rerankers (`XLMRobertaForSequenceClassification`).

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
MLM_HEAD_PREFIX = "lm_head."
# The MLM head's output projection is the word-embedding table (tied), and transformers keeps
# its bias twice (`lm_head.bias` is `lm_head.decoder.bias`): these copies are not imported.
MLM_TIED = ("lm_head.decoder.weight", "lm_head.decoder.bias")
COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    torch_name: str  # key in the encoder state dict, or "colbert_linear.pt:weight" for heads
    path: tuple[str | int, ...]  # path in the m3_jax params pytree
    to_m3: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: tuple[int, ...]  # the tensor's shape in the PyTorch checkpoint


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _linear(torch_name: str, out_dim: int, in_dim: int, path: tuple) -> list[TensorMapping]:
    """An `nn.Linear(in_dim, out_dim)` (weight [out, in], bias [out]) ↔ a Dense kernel and bias."""
    return [
        TensorMapping(
            f"{torch_name}weight", (*path, "kernel"), _transpose, _transpose, (out_dim, in_dim)
        ),
        TensorMapping(f"{torch_name}bias", (*path, "bias"), _same, _same, (out_dim,)),
    ]


def tensor_mappings(config: ModelConfig) -> list[TensorMapping]:
    """BGE-M3: the XLMRobertaModel state dict, then the colbert and sparse head files."""
    maps = encoder_mappings(config)
    for head_file, ours, out_dim in (
        (COLBERT_FILE, "colbert_linear", config.colbert_out_dim),
        (SPARSE_FILE, "sparse_linear", 1),
    ):
        maps += _linear(f"{head_file}:", out_dim, config.hidden_size, (ours,))
    return maps


def mlm_head_mappings(
    config: ModelConfig, prefix: str = MLM_HEAD_PREFIX, path: tuple = ()
) -> list[TensorMapping]:
    """`XLMRobertaLMHead`: dense [E, E], GELU, LayerNorm, then the tied word embeddings plus a
    [vocab] bias; tensors named `prefix` + `dense.weight` etc., at `path` (by default the MLM
    head's own params tree, `RetroMAEModel`'s "lm_head")."""
    e = config.hidden_size
    return [
        *_linear(f"{prefix}dense.", e, e, (*path, "dense")),
        TensorMapping(
            f"{prefix}layer_norm.weight", (*path, "layer_norm", "scale"), _same, _same, (e,)
        ),
        TensorMapping(
            f"{prefix}layer_norm.bias", (*path, "layer_norm", "bias"), _same, _same, (e,)
        ),
        TensorMapping(f"{prefix}bias", (*path, "bias"), _same, _same, (config.vocab_size,)),
    ]


def reranker_mappings(config: ModelConfig) -> list[TensorMapping]:
    """A cross-encoder: the state dict of `XLMRobertaForSequenceClassification` with one label
    (`roberta.` encoder, `classifier.dense`, `classifier.out_proj`)."""
    e = config.hidden_size
    maps = encoder_mappings(config, ENCODER_PREFIX)
    maps += _linear("classifier.dense.", e, e, ("classifier", "dense"))
    maps += _linear("classifier.out_proj.", 1, e, ("classifier", "out_proj"))
    return maps


def encoder_mappings(config: ModelConfig, prefix: str = "") -> list[TensorMapping]:
    """The XLM-R encoder's tensors, named `prefix` + the XLMRobertaModel state-dict key."""
    e = config.hidden_size
    emb = ("encoder", "embeddings")
    tables = (
        ("word_embeddings", config.vocab_size),
        ("position_embeddings", config.max_position_embeddings),
        ("token_type_embeddings", config.type_vocab_size),
    )
    maps = [
        TensorMapping(
            f"{prefix}embeddings.{name}.weight", (*emb, name, "embedding"), _same, _same, (rows, e)
        )
        for name, rows in tables
    ]
    for torch_name, ours in (("weight", "scale"), ("bias", "bias")):
        maps.append(
            TensorMapping(
                f"{prefix}embeddings.LayerNorm.{torch_name}",
                (*emb, "layer_norm", ours),
                _same,
                _same,
                (e,),
            )
        )
    for i in range(config.num_hidden_layers):
        maps += layer_mappings(config, f"{prefix}encoder.layer.{i}.", ("encoder", "layers", i))
    return maps


def layer_mappings(config: ModelConfig, prefix: str, path: tuple) -> list[TensorMapping]:
    """One post-LN transformer layer (transformers' `XLMRobertaLayer`, or RetroMAE's decoder
    layer, which has the same names), its tensors named `prefix` + `attention.self.query.weight`
    etc., at `path` in the params."""
    e, h, d = config.hidden_size, config.num_attention_heads, config.head_dim
    m = config.intermediate_size
    maps: list[TensorMapping] = []

    def add(torch_name, shape, sub_path, to_m3=_same, to_torch=_same):
        maps.append(
            TensorMapping(prefix + torch_name, (*path, *sub_path), to_m3, to_torch, tuple(shape))
        )

    for proj in ("query", "key", "value"):
        add(
            f"attention.self.{proj}.weight",
            (h * d, e),
            ("attention", proj, "kernel"),
            lambda w: w.T.reshape(e, h, d),
            lambda k: np.ascontiguousarray(k.reshape(e, h * d).T),
        )
        add(
            f"attention.self.{proj}.bias",
            (h * d,),
            ("attention", proj, "bias"),
            lambda b: b.reshape(h, d),
            lambda b: b.reshape(h * d),
        )
    add(
        "attention.output.dense.weight",
        (e, h * d),
        ("attention", "output", "kernel"),
        lambda w: w.T.reshape(h, d, e),
        lambda k: np.ascontiguousarray(k.reshape(h * d, e).T),
    )
    add("attention.output.dense.bias", (e,), ("attention", "output", "bias"))
    for torch_ln, our_ln in (
        ("attention.output.LayerNorm", "attention_layer_norm"),
        ("output.LayerNorm", "output_layer_norm"),
    ):
        add(f"{torch_ln}.weight", (e,), (our_ln, "scale"))
        add(f"{torch_ln}.bias", (e,), (our_ln, "bias"))
    for torch_dense, ours, out_dim, in_dim in (
        ("intermediate.dense", "intermediate", m, e),
        ("output.dense", "output", e, m),
    ):
        maps += _linear(f"{prefix}{torch_dense}.", out_dim, in_dim, (*path, ours))
    return maps


def set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree
