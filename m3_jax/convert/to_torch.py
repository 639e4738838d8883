"""m3_jax params → a directory in the exact BGE-M3 release layout (the files of BAAI/bge-m3 on the Hugging Face hub).

Written files: `config.json` (transformers XLMRobertaModel), `model.safetensors` (and
`pytorch_model.bin` on request), `colbert_linear.pt` and `sparse_linear.pt` (nn.Linear state dicts,
fp32 or fp16 like the release), the tokenizer files, and the sentence-transformers files
(`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`), so FlagEmbedding's
`BGEM3FlagModel`, `XLMRobertaModel.from_pretrained` and `SentenceTransformer` all load it.

Tensors go through the one mapping table of `layout.py` (its `to_torch` transforms), one at a
time. The encoder safetensors file needs no torch; the head `.pt` files (and the optional `.bin`)
are torch pickles, so torch is imported only to write them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from m3_jax.config import ModelConfig
from m3_jax.convert.layout import COLBERT_FILE, SPARSE_FILE, get_path, tensor_mappings
from m3_jax.file_modes import apply_umask
from m3_jax.loading import load_params
from m3_jax.model import Params, check_params, per_layer
from m3_jax.run_dir import copy_tokenizer_files

ENCODER = "encoder"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
HF_CONFIG_FILE = "config.json"
EXPORT_DTYPES = ("float32", "float16")


def iter_torch_tensors(
    config: ModelConfig, params: Params
) -> Iterator[tuple[str, str, np.ndarray]]:
    """(file, key, float32 array in PyTorch layout) per tensor; file is 'encoder' for the
    XLMRobertaModel state dict, else the head file name ('colbert_linear.pt', 'sparse_linear.pt')."""
    for m in tensor_mappings(config):
        value = m.to_torch(np.asarray(get_path(params, m.path), np.float32))
        file, sep, key = m.torch_name.partition(":")
        yield (file, key, value) if sep else (ENCODER, m.torch_name, value)


def torch_state_dicts(config: ModelConfig, params: Params) -> dict[str, dict[str, np.ndarray]]:
    """{'encoder': XLMRobertaModel state dict, 'colbert_linear.pt': ..., 'sparse_linear.pt': ...}
    as float32 numpy arrays in PyTorch layout ([out, in] linear weights)."""
    config, params = per_layer(config, params)
    check_params(params, config, "params")
    out: dict[str, dict[str, np.ndarray]] = {}
    for file, key, value in iter_torch_tensors(config, params):
        out.setdefault(file, {})[key] = value
    return out


def hf_config(config: ModelConfig, dtype: str = "float32") -> dict:
    """config.json; transformers 4 reads `torch_dtype`, transformers 5 `dtype`."""
    values = config.to_hf_config()
    values["torch_dtype"] = dtype
    values["dtype"] = dtype
    return values


def sentence_transformers_files(config: ModelConfig) -> dict[str, dict | list]:
    """The release's sentence-transformers pipeline: Transformer → CLS pooling → Normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if config.normalize_embeddings:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    pooling = {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    return {
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        "sentence_bert_config.json": {"max_seq_length": config.max_length, "do_lower_case": False},
    }


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"writing {COLBERT_FILE}/{SPARSE_FILE} (and {BIN_FILE}) needs PyTorch: "
            "pip install 'm3_jax[torch]'"
        ) from e
    return torch


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; choose a new directory or pass overwrite=True "
            "(--overwrite) to replace it"
        )


def export_torch_dir(
    config: ModelConfig,
    params: Params,
    out: str | os.PathLike,
    *,
    tokenizer_source: str | os.PathLike,
    weights_dtype: str = "float32",
    head_dtype: str = "float32",
    write_bin: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes the BGE-M3 layout to `out` (written to a temporary sibling, then renamed, so a failed
    export never leaves a half-written model; with `overwrite` an existing `out` is replaced).

    weights_dtype: encoder tensors (and config.json's dtype); head_dtype: the two head files
    ("float16" is what the release ships). params: any arrays (numpy or jax), cast per tensor.
    """
    for name, value in (("weights_dtype", weights_dtype), ("head_dtype", head_dtype)):
        if value not in EXPORT_DTYPES:
            raise ValueError(f"{name}={value!r}; expected one of {EXPORT_DTYPES}")
    out = Path(out)
    check_out_dir(out, overwrite)
    config, params = per_layer(config, params)
    check_params(params, config, "params")
    torch = _torch()
    from safetensors.numpy import save_file

    with staged_dir(out) as tmp:
        encoder: dict[str, np.ndarray] = {}
        heads: dict[str, dict] = {COLBERT_FILE: {}, SPARSE_FILE: {}}
        tensors = iter_torch_tensors(config, params)
        total = len(tensor_mappings(config))
        for file, key, value in tqdm(tensors, total=total, desc="export", disable=not progress):
            if file == ENCODER:
                encoder[key] = value.astype(weights_dtype)
            else:
                heads[file][key] = torch.from_numpy(value.astype(head_dtype))
        # transformers refuses safetensors files without format metadata.
        save_file(encoder, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        if write_bin:
            torch.save({k: torch.from_numpy(v) for k, v in encoder.items()}, tmp / BIN_FILE)
        del encoder
        for file, state in heads.items():
            # nn.Linear.state_dict() order, as FlagEmbedding saves them.
            torch.save({"weight": state["weight"], "bias": state["bias"]}, tmp / file)
        write_json(tmp / HF_CONFIG_FILE, hf_config(config, weights_dtype))
        for name, content in sentence_transformers_files(config).items():
            write_json(tmp / name, content)
        copy_tokenizer_files(tokenizer_source, tmp)
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write into; on success it replaces `out` (so a failed
    export never leaves a half-written model), on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp and safetensors write private modes
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def convert_to_pytorch(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    config_file: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    **export_kwargs,
) -> Path:
    """Anything `load_params` reads (a model directory, a training run or one of its steps) →
    the BGE-M3 PyTorch layout."""
    check_out_dir(Path(out), export_kwargs.get("overwrite", False))
    src = load_params(source, step=step, config_file=config_file, tokenizer_dir=tokenizer_dir)
    return export_torch_dir(
        src.config, src.params, out, tokenizer_source=src.tokenizer_dir, **export_kwargs
    )
