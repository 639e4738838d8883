"""Cross-encoder rerankers between the PyTorch layout and m3_jax params.

The PyTorch layout is transformers' `XLMRobertaForSequenceClassification` with one label, as
bge-reranker-base / -large / -v2-m3 ship it: `config.json` and `model.safetensors` (or
`pytorch_model.bin`) with the encoder under `roberta.` and the head under `classifier.dense.*` /
`classifier.out_proj.*` (see `layout.reranker_mappings`), plus the tokenizer files. Import checks
keys and shapes as strictly as the embedder's; export writes the same layout back, so
`AutoModelForSequenceClassification` and FlagEmbedding's `FlagReranker` load it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from m3_jax.config import ModelConfig
from m3_jax.convert.from_torch import (
    params_from_state,
    read_hf_config,
    read_state_dict,
    resolve_source,
)
from m3_jax.convert.layout import ENCODER_PREFIX, IGNORED_PREFIXES, get_path, reranker_mappings
from m3_jax.convert.to_torch import (
    HF_CONFIG_FILE,
    SAFETENSORS_FILE,
    check_out_dir,
    hf_config,
    staged_dir,
    write_json,
)
from m3_jax.model import Params, RerankerModel, check_params, params_in_layout, per_layer
from m3_jax.run_dir import copy_tokenizer_files

ARCHITECTURE = "XLMRobertaForSequenceClassification"


def _num_labels(hf: dict[str, Any]) -> int:
    if "id2label" in hf:
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))  # transformers' PretrainedConfig default


def reranker_config(hf: dict[str, Any], src: Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a one-label sequence-classification `config.json`."""
    labels = _num_labels(hf)
    if labels != 1:
        raise ValueError(
            f"{src / HF_CONFIG_FILE}: a reranker has one output label, this model has {labels} "
            "(id2label); expected a cross-encoder such as BAAI/bge-reranker-v2-m3"
        )
    return ModelConfig.from_hf_config(hf, **overrides)


def load_reranker(
    source: str | os.PathLike, *, cache_dir: str | None = None, **config_overrides: Any
) -> tuple[ModelConfig, Params, Path]:
    """(config, float32 params, resolved source dir) from a directory or hub id in the
    `XLMRobertaForSequenceClassification` layout."""
    src = resolve_source(source, cache_dir)
    config = reranker_config(read_hf_config(src), src, **config_overrides)
    # Buffers older transformers versions saved (roberta.embeddings.position_ids) are not weights.
    ignored = tuple(ENCODER_PREFIX + p for p in IGNORED_PREFIXES)
    state = {k: v for k, v in read_state_dict(src).items() if not k.startswith(ignored)}
    params = params_from_state(state, reranker_mappings(config), src, ARCHITECTURE)
    check_params(params, config.replace(scan_layers=False), str(src), RerankerModel)
    return config, params_in_layout(params, config.scan_layers), src


def export_reranker(
    config: ModelConfig,
    params: Params,
    out: str | os.PathLike,
    *,
    tokenizer_source: str | os.PathLike,
    weights_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Writes the `XLMRobertaForSequenceClassification` layout (config.json, model.safetensors,
    tokenizer files) to `out`, staged in a temporary sibling and renamed when complete."""
    out = Path(out)
    check_out_dir(out, overwrite)
    config, params = per_layer(config, params)
    check_params(params, config, "params", RerankerModel)
    from safetensors.numpy import save_file

    state = {
        m.torch_name: m.to_torch(np.asarray(get_path(params, m.path), np.float32)).astype(
            weights_dtype
        )
        for m in reranker_mappings(config)
    }
    values = hf_config(config, weights_dtype)
    values.update(architectures=[ARCHITECTURE], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    with staged_dir(out) as tmp:
        # transformers refuses safetensors files without format metadata.
        save_file(state, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        write_json(tmp / HF_CONFIG_FILE, values)
        copy_tokenizer_files(tokenizer_source, tmp)
    return out
