"""`load_params`: params, model config and tokenizer from anything that holds a model.

Accepted sources, tried in this order:
- an m3_jax model directory (`m3_jax_config.json` + `params/`, e.g. a run's `export/` or `best/`);
- a training run directory (`checkpoints/` inside), `RUN/checkpoints` or `RUN/checkpoints/STEP`:
  the newest finished checkpoint, or `step`; only the params of the train state are read (of a
  RetroMAE run: its encoder with fresh heads, and its MLM head);
- a BGE-M3 PyTorch directory or a Hugging Face hub id (`BAAI/bge-m3`), through `convert.from_torch`.
`M3Embedder.from_pretrained`, the training loop's `model.init_from`, the PyTorch exporter and
evaluation all load through here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from m3_jax.config import ModelConfig
from m3_jax.convert.from_torch import import_checkpoint, random_heads
from m3_jax.model import Params
from m3_jax.run_dir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    PARAMS_DIR,
    STATE_ITEM,
    check_tokenizer_dir,
    checkpoint_steps,
    is_model_dir,
    is_retromae_tree,
    is_run_dir,
    locate_run,
    read_config,
    restore_mlm_head,
    restore_params,
    run_info_dir,
)


@dataclasses.dataclass(frozen=True)
class LoadedParams:
    config: ModelConfig  # with the caller's overrides; param_dtype float32 unless overridden
    params: Params  # float32 host numpy arrays
    tokenizer_dir: Path
    description: str  # for logs: "model dir X", "run X, step N" or "PyTorch checkpoint X"
    step: int | None = None  # the checkpoint step, for runs
    mlm_head: Params | None = None  # XLM-R's masked-LM head, where the source has one


def _is_run(path: Path) -> bool:
    run, _ = locate_run(path, None)
    return is_run_dir(run)


def load_params(
    source: str | os.PathLike,
    *,
    step: int | None = None,
    config_file: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    fresh_heads: bool = False,
    cache_dir: str | None = None,
    **config_overrides: Any,
) -> LoadedParams:
    """Reads a model from `source` (see the module docstring).

    step: a run's checkpoint step (None: the newest). config_file / tokenizer_dir: a model config
    or tokenizer other than the source's own (for runs that have none). fresh_heads, cache_dir:
    for PyTorch checkpoints (random colbert/sparse heads when their files are missing; the hub
    cache). config_overrides: ModelConfig fields to change (dtype, attention_impl, remat, ...).
    """
    path = Path(source).expanduser()
    if is_model_dir(path) and not is_run_dir(path):
        if step is not None:
            raise ValueError(f"{path} is a model directory (one set of params); drop step={step}")
        config = read_config(config_file or path / CONFIG_FILE).replace(**config_overrides)
        params = restore_params(path / PARAMS_DIR, config)
        return LoadedParams(
            config,
            params,
            Path(tokenizer_dir or path),
            f"model dir {path}",
            mlm_head=restore_mlm_head(path, config),
        )
    if path.is_dir() and _is_run(path):
        return _load_run(path, step, config_file, tokenizer_dir, config_overrides)
    if step is not None:
        raise ValueError(f"{source}: step={step} needs a training run directory")
    imported = import_checkpoint(
        source, fresh_heads=fresh_heads, cache_dir=cache_dir, **config_overrides
    )
    return LoadedParams(
        imported.config,
        imported.params,
        Path(tokenizer_dir or imported.src),
        f"PyTorch checkpoint {imported.src}",
        mlm_head=imported.mlm_head,
    )


def _load_run(
    path: Path,
    step: int | None,
    config_file: str | os.PathLike | None,
    tokenizer_dir: str | os.PathLike | None,
    config_overrides: dict[str, Any],
) -> LoadedParams:
    run, step = locate_run(path, step)
    steps = checkpoint_steps(run)
    if not steps:
        raise FileNotFoundError(
            f"{path}: a training run without finished checkpoints in {run / CHECKPOINT_DIR}"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{run / CHECKPOINT_DIR}: no checkpoint for step {step}; have {steps}")
    info = None if config_file and tokenizer_dir else run_info_dir(run)
    config = read_config(config_file or info / CONFIG_FILE).replace(**config_overrides)
    tokenizer = check_tokenizer_dir(tokenizer_dir or info, f"run {run}")
    state_dir = run / CHECKPOINT_DIR / str(step) / STATE_ITEM
    params = restore_params(state_dir, config, subtree="params", model_class=None)
    mlm_head = None
    if is_retromae_tree(params):
        # A RetroMAE run: its encoder, with fresh heads as in its export/, and the MLM head.
        mlm_head = params["lm_head"]
        params = {"encoder": params["encoder"], **random_heads(config, 0)}
    return LoadedParams(config, params, tokenizer, f"run {run}, step {step}", step, mlm_head)
