"""Longer inputs for an XLM-R model: its learned position table extended by tiling.

XLM-R has 514 position rows: rows 0 and 1 (pad_token_id) are never a real token's position,
rows 2..513 hold positions 1..512. BGE-M3 has 8194 rows (8192 tokens). The paper does not say
how bge-m3-retromae was initialised before RetroMAE pre-training at 8192 tokens; here the new
rows repeat the learned ones (row 2 + j gets learned row 2 + j mod 512), rows 0-1 are kept, and
every other tensor is unchanged, so inputs that fit the old table encode exactly as before and
longer ones start from a periodic position code that pre-training then adapts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from m3_jax.config import ModelConfig
from m3_jax.loading import load_params
from m3_jax.model import Params
from m3_jax.run_dir import save_model_dir
from m3_jax.tokenization import TOKENIZER_CONFIG_FILE

log = logging.getLogger(__name__)


def tiled_position_table(table: np.ndarray, rows: int, first_position_row: int) -> np.ndarray:
    """`rows` rows: rows below `first_position_row` as in `table`, the rest cycling through the
    learned rows `table[first_position_row:]`."""
    learned = table[first_position_row:]
    if rows < table.shape[0]:
        raise ValueError(f"cannot shrink a position table of {table.shape[0]} rows to {rows}")
    cycle = np.arange(rows - first_position_row) % learned.shape[0]
    return np.concatenate([table[:first_position_row], learned[cycle]]).astype(table.dtype)


def extend_positions(
    config: ModelConfig, params: Params, max_length: int
) -> tuple[ModelConfig, Params]:
    """(config, params) for inputs of up to `max_length` tokens (special tokens included)."""
    if max_length < config.max_length:
        raise ValueError(
            f"max length {max_length} is below the model's {config.max_length}; "
            "expected a longer one"
        )
    first = config.pad_token_id + 1
    rows = max_length + first
    embeddings = params["encoder"]["embeddings"]
    table = np.asarray(embeddings["position_embeddings"]["embedding"])
    new_embeddings = {
        **embeddings,
        "position_embeddings": {"embedding": tiled_position_table(table, rows, first)},
    }
    new_params = {**params, "encoder": {**params["encoder"], "embeddings": new_embeddings}}
    return config.replace(max_position_embeddings=rows), new_params


def set_tokenizer_max_length(model_dir: Path, max_length: int) -> None:
    """The tokenizer's `model_max_length` (what truncation defaults to) set to `max_length`."""
    path = model_dir / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return
    values = json.loads(path.read_text())
    values["model_max_length"] = max_length
    path.write_text(json.dumps(values, indent=2) + "\n")


def extend_model_positions(
    source: str | os.PathLike, out: str | os.PathLike, max_length: int
) -> Path:
    """Writes the m3_jax model directory `out`: `source` (any model `load_params` reads; an
    XLM-R checkpoint without BGE-M3's head files gets fresh heads, and keeps its MLM head) with
    its positions extended to `max_length` tokens."""
    loaded = load_params(source, fresh_heads=True)
    config, params = extend_positions(loaded.config, loaded.params, max_length)
    log.info(
        "position table %d -> %d rows",
        loaded.config.max_position_embeddings,
        config.max_position_embeddings,
    )
    out = save_model_dir(out, config, params, loaded.tokenizer_dir, mlm_head=loaded.mlm_head)
    set_tokenizer_max_length(out, max_length)
    return out
