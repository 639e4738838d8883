"""An m3_jax model directory: `m3_jax_config.json`, orbax `params/`, and the tokenizer files.

This is what `tools/convert_from_pytorch.py` and training exports write, and what
`M3Embedder.from_pretrained` reads fastest (no torch needed).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from m3_jax.config import ModelConfig
from m3_jax.model import M3Model
from m3_jax.tokenization import TOKENIZER_FILES

CONFIG_FILE = "m3_jax_config.json"
PARAMS_DIR = "params"

Params = dict[str, Any]


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


@functools.lru_cache(maxsize=16)
def abstract_param_state(config: ModelConfig) -> nnx.State:
    """The nnx.Param state of an abstract `M3Model(config)`: shapes, dtypes and sharding metadata.
    Cached, since tracing the full model takes seconds; callers derive new trees from it."""
    abstract = nnx.eval_shape(lambda: M3Model(config, rngs=nnx.Rngs(0)))
    return nnx.state(abstract, nnx.Param)


def abstract_params(config: ModelConfig) -> Params:
    """The params pytree of `M3Model(config)` as ShapeDtypeStructs, without allocating it."""
    return nnx.to_pure_dict(abstract_param_state(config))


def check_params(params: Params, config: ModelConfig, source: str) -> None:
    """Errors naming every missing, unexpected or wrongly shaped parameter."""
    expected = {
        jax.tree_util.keystr(path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(config))
    }
    got = {
        jax.tree_util.keystr(path): np.shape(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    problems = [f"missing {k}" for k in sorted(set(expected) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(expected))]
    problems += [
        f"{k} has shape {got[k]}, expected {expected[k]}"
        for k in sorted(set(got) & set(expected))
        if tuple(got[k]) != tuple(expected[k])
    ]
    if problems:
        raise ValueError(
            f"{source}: parameters do not fit the model config:\n  " + "\n  ".join(problems)
        )


def model_from_params(config: ModelConfig, params: Params) -> M3Model:
    """An M3Model holding `params` (cast to config.param_dtype), after a full shape check."""
    check_params(params, config, "params")
    abstract = nnx.eval_shape(lambda: M3Model(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    dtype = jnp.dtype(config.param_dtype)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
    return nnx.merge(graphdef, state)


def save_model_dir(
    out: str | Path, config: ModelConfig, params: Params, tokenizer_source: str | Path | None
) -> Path:
    """Writes an m3_jax model directory; `out` must not exist or be empty."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output directory")
    check_params(params, config, str(out))
    # Multi-process: every process checks the directory before any of them writes, then all
    # join orbax's collective save; process 0 writes the small files.
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_model_dir {out}")
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((out / PARAMS_DIR).absolute(), params)
    if jax.process_index() == 0:
        config.save_json(out / CONFIG_FILE)
        if tokenizer_source is not None:
            copy_tokenizer_files(tokenizer_source, out)
    return out


def copy_tokenizer_files(src: str | Path, out: str | Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(out) / name)
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"{src}: no tokenizer files found (looked for {TOKENIZER_FILES})")
    return copied


def load_model_dir(path: str | Path, **config_overrides: Any) -> tuple[ModelConfig, Params]:
    """(config with overrides applied, params as numpy-backed arrays) from an m3_jax directory."""
    path = Path(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path}: not an m3_jax model directory (no {CONFIG_FILE})")
    if not (path / PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"{path}: {PARAMS_DIR}/ is missing")
    config = ModelConfig.load_json(path / CONFIG_FILE).replace(**config_overrides)
    target = abstract_params(config.replace(param_dtype="float32"))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore((path / PARAMS_DIR).absolute(), target)
    return config, params
