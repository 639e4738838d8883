"""Import a PyTorch BGE-M3 checkpoint (HF / FlagEmbedding layout, local dir or hub id).

Reads `config.json`, `model.safetensors` or `pytorch_model.bin`, `colbert_linear.pt` and
`sparse_linear.pt`. Only safetensors and `torch.load(weights_only=True)` are used: no arbitrary
unpickling. torch is imported only when a `.bin`/`.pt` file must be read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from m3_jax.config import ModelConfig
from m3_jax.convert.layout import (
    COLBERT_FILE,
    ENCODER_PREFIX,
    IGNORED_PREFIXES,
    MLM_HEAD_PREFIX,
    MLM_TIED,
    SPARSE_FILE,
    TensorMapping,
    mlm_head_mappings,
    set_path,
    tensor_mappings,
)
from m3_jax.model import Params, check_params, init_params, params_in_layout
from m3_jax.run_dir import save_model_dir

log = logging.getLogger(__name__)

HUB_IGNORE_PATTERNS = ["flax_model.msgpack", "rust_model.ot", "tf_model.h5", "onnx/*", "imgs/*"]


def resolve_source(name_or_path: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local directory as is; anything else that looks like `org/name` via the HF hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_local = path.is_absolute() or text.startswith(".") or text.count("/") != 1
    if looks_local or path.exists():
        raise FileNotFoundError(
            f"{text}: no such model directory (and not a hub id like 'BAAI/bge-m3')"
        )
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(repo_id=text, cache_dir=cache_dir, ignore_patterns=HUB_IGNORE_PATTERNS)
    )


def _torch_load(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path.name} needs PyTorch: pip install 'm3_jax[torch]' "
            "(or provide model.safetensors for the encoder)"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: v.detach().float().numpy() for k, v in state.items()}


def read_state_dict(src: Path) -> dict[str, np.ndarray]:
    """The transformers state dict of `src` (model.safetensors, else pytorch_model.bin) as
    float32 numpy arrays."""
    if (src / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        return {k: v.astype(np.float32) for k, v in load_file(src / "model.safetensors").items()}
    if (src / "pytorch_model.bin").is_file():
        return _torch_load(src / "pytorch_model.bin")
    raise FileNotFoundError(f"{src}: no model.safetensors or pytorch_model.bin")


def read_hf_config(src: Path) -> dict[str, Any]:
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: config.json is missing")
    try:
        return json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{src / 'config.json'}:{e.lineno}: not valid JSON ({e.msg})") from e


def read_encoder_state(src: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the encoder tensors keyed by HF XLMRobertaModel names, the masked-LM head's `lm_head.*`
    tensors, empty unless `src` is an XLMRobertaForMaskedLM checkpoint), float32 numpy arrays."""
    state = read_state_dict(src)
    if state and all(k.startswith((ENCODER_PREFIX, MLM_HEAD_PREFIX)) for k in state):
        state = {k.removeprefix(ENCODER_PREFIX): v for k, v in state.items()}
    mlm_head = {k: v for k, v in state.items() if k.startswith(MLM_HEAD_PREFIX)}
    ignored = sorted(
        k for k in state if k.startswith(IGNORED_PREFIXES) and not k.startswith(MLM_HEAD_PREFIX)
    )
    if ignored:
        log.info("ignoring tensors M3 does not use: %s", ", ".join(ignored))
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}, mlm_head


def mlm_head_params(
    mlm_state: dict[str, np.ndarray], word_embeddings: np.ndarray, config: ModelConfig, src: Path
) -> Params:
    """The MLM head's params (paths of `RetroMAEModel.lm_head`) from its `lm_head.*` tensors.
    Its output projection must be the word-embedding table (transformers ties them)."""
    decoder = mlm_state.get(MLM_TIED[0])
    if decoder is not None and not np.array_equal(decoder, word_embeddings):
        raise ValueError(
            f"{src}: {MLM_TIED[0]} differs from the word embeddings; only a tied MLM head "
            "(transformers' default) is supported"
        )
    decoder_bias = mlm_state.get(MLM_TIED[1])
    if decoder_bias is not None and not np.array_equal(decoder_bias, mlm_state.get("lm_head.bias")):
        raise ValueError(f"{src}: {MLM_TIED[1]} differs from lm_head.bias")
    untied = {k: v for k, v in mlm_state.items() if k not in MLM_TIED}
    return params_from_state(untied, mlm_head_mappings(config), src, "XLM-R's MLM head")


def read_head_state(src: Path, fresh_heads: bool) -> dict[str, np.ndarray]:
    """`colbert_linear.pt:weight`-style keys; fp16 release files are upcast to float32."""
    present = [name for name in (COLBERT_FILE, SPARSE_FILE) if (src / name).is_file()]
    if not present:
        if fresh_heads:
            log.warning("%s: no head files; colbert and sparse heads are freshly initialised", src)
            return {}
        raise FileNotFoundError(
            f"{src}: {COLBERT_FILE} and {SPARSE_FILE} are missing; pass fresh_heads=True "
            "(--fresh-heads) to start the colbert and sparse heads from a random init"
        )
    if len(present) == 1:
        (absent,) = {COLBERT_FILE, SPARSE_FILE} - set(present)
        raise FileNotFoundError(
            f"{src}: found {present[0]} but {absent} is missing; both head files are needed"
        )
    state = {}
    for name in present:
        for key, value in _torch_load(src / name).items():
            state[f"{name}:{key}"] = value
    return state


@dataclasses.dataclass(frozen=True)
class ImportedCheckpoint:
    config: ModelConfig
    params: Params  # float32, the M3Model tree
    mlm_head: Params | None  # XLMRobertaForMaskedLM checkpoints: the `lm_head` tree, else None
    src: Path  # the resolved source directory


def load_bge_m3(
    source: str | os.PathLike,
    *,
    fresh_heads: bool = False,
    cache_dir: str | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> tuple[ModelConfig, Params, Path]:
    """(config, float32 params, resolved source dir) from a BGE-M3 PyTorch checkpoint."""
    imported = import_checkpoint(
        source, fresh_heads=fresh_heads, cache_dir=cache_dir, seed=seed, **config_overrides
    )
    return imported.config, imported.params, imported.src


def import_checkpoint(
    source: str | os.PathLike,
    *,
    fresh_heads: bool = False,
    cache_dir: str | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> ImportedCheckpoint:
    """A BGE-M3 PyTorch checkpoint, or an XLM-R one (`XLMRobertaModel`, or
    `XLMRobertaForMaskedLM` with its MLM head) with `fresh_heads`, as m3_jax params."""
    src = resolve_source(source, cache_dir)
    hf_config = read_hf_config(src)
    state, mlm_state = read_encoder_state(src)
    state.update(read_head_state(src, fresh_heads))
    colbert_weight = state.get(f"{COLBERT_FILE}:weight")
    if colbert_weight is not None and colbert_weight.ndim == 2:
        # FlagEmbedding's colbert_dim is a training argument, not saved: the head file tells it.
        config_overrides.setdefault("colbert_dim", int(colbert_weight.shape[0]))
    config = ModelConfig.from_hf_config(hf_config, **config_overrides)

    mappings = tensor_mappings(config)
    if fresh_heads and not any(":" in k for k in state):
        mappings = [m for m in mappings if ":" not in m.torch_name]
    params = params_from_state(state, mappings, src, "BGE-M3")
    if len(mappings) < len(tensor_mappings(config)):
        params.update(random_heads(config, seed))
    check_params(params, config.replace(scan_layers=False), str(src))
    mlm_head = None
    if mlm_state:
        word_embeddings = state["embeddings.word_embeddings.weight"]
        mlm_head = mlm_head_params(mlm_state, word_embeddings, config, src)
    return ImportedCheckpoint(config, params_in_layout(params, config.scan_layers), mlm_head, src)


def params_from_state(
    state: dict[str, np.ndarray], mappings: list[TensorMapping], src: Path, what: str
) -> Params:
    """The m3_jax params of a state dict that holds exactly the tensors of `mappings`, with their
    shapes; otherwise one error naming every missing, unknown and misshapen tensor."""
    expected = {m.torch_name for m in mappings}
    missing = sorted(expected - set(state))
    unknown = sorted(set(state) - expected)
    if missing or unknown:
        lines = [f"missing {k}" for k in missing] + [f"unknown {k}" for k in unknown]
        raise ValueError(f"{src}: checkpoint keys do not match {what}:\n  " + "\n  ".join(lines))
    wrong = [
        f"{m.torch_name} has shape {tuple(state[m.torch_name].shape)}, expected {m.torch_shape}"
        for m in mappings
        if tuple(state[m.torch_name].shape) != m.torch_shape
    ]
    if wrong:
        raise ValueError(
            f"{src}: checkpoint tensors do not fit the geometry in config.json:\n  "
            + "\n  ".join(wrong)
        )
    params: Params = {}
    for m in mappings:
        set_path(params, m.path, m.to_m3(state[m.torch_name]).astype(np.float32))
    return params


def random_heads(config: ModelConfig, seed: int) -> Params:
    """Randomly initialised colbert and sparse heads (float32 numpy), for checkpoints without."""
    heads_only = config.replace(num_hidden_layers=0, scan_layers=False, param_dtype="float32")
    full = init_params(heads_only, seed)
    heads = {k: full[k] for k in ("colbert_linear", "sparse_linear")}
    return jax.tree.map(lambda x: np.asarray(x, np.float32), heads)


def convert_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fresh_heads: bool = False,
    cache_dir: str | None = None,
) -> Path:
    """Writes an m3_jax model directory (config, orbax params, tokenizer; the MLM head of an
    XLMRobertaForMaskedLM checkpoint) from a PyTorch checkpoint."""
    imported = import_checkpoint(source, fresh_heads=fresh_heads, cache_dir=cache_dir)
    return save_model_dir(
        out, imported.config, imported.params, imported.src, mlm_head=imported.mlm_head
    )
