"""Where exported params come from: an m3_jax model directory or a training run's checkpoint.

Accepted paths:
- a model directory (`m3_jax_config.json` + orbax `params/`), e.g. a run's `export/`;
- a training run directory (`checkpoints/`), at its newest or a chosen step;
- `RUN/checkpoints` or one step directory `RUN/checkpoints/STEP`.

A training checkpoint holds the whole train state (params, optimizer moments, step, rng); only
the params are read, straight from the files into host numpy arrays (orbax partial restore with
`restore_type=np.ndarray`). A checkpoint written from a sharded run is therefore assembled once,
on the host, and never placed on a device. The model config and tokenizer of a run come from
`RUN/model_info/` (`m3_jax_config.json` and the tokenizer files, written by `write_run_info`), else
from `RUN/export/`, else from explicit arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from m3_jax.config import ModelConfig
from m3_jax.model_dir import (
    CONFIG_FILE,
    PARAMS_DIR,
    Params,
    check_params,
    copy_tokenizer_files,
    is_model_dir,
)

CHECKPOINT_DIR = "checkpoints"  # training.loop.CHECKPOINT_DIR (not imported: no training deps)
EXPORT_DIR = "export"
STATE_ITEM = "state"  # checkpoint.STATE
RUN_INFO_DIR = "model_info"  # model config + tokenizer files of a run, no params


@dataclasses.dataclass(frozen=True)
class ParamsSource:
    config: ModelConfig  # param_dtype float32
    params: Params  # float32 numpy arrays
    tokenizer_dir: Path
    description: str  # for logs: "model dir X" or "run X, step N"
    step: int | None = None


def write_run_info(workdir: str | os.PathLike, config: ModelConfig, tokenizer_dir: str) -> None:
    """Writes `WORKDIR/model_info/` (`m3_jax_config.json` + tokenizer files), so that any checkpoint
    of the run converts without the training config (call once when the run starts)."""
    info = Path(workdir) / RUN_INFO_DIR
    info.mkdir(parents=True, exist_ok=True)
    config.replace(param_dtype="float32").save_json(info / CONFIG_FILE)
    copy_tokenizer_files(tokenizer_dir, info)


def checkpoint_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """Steps with a finished checkpoint (orbax writes to a temporary name, then renames)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / STATE_ITEM).is_dir()
    )


def _int_keys(tree):
    """Orbax metadata names dict keys as strings; our params index layers by int."""
    if isinstance(tree, dict):
        return {(int(k) if k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


class _NoStepMetadataWarning(logging.Filter):
    """Drops orbax's "Metadata file does not exist" for an item directory of a training checkpoint
    (`STEP/state`): the step's metadata lives one level up, and nothing is missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


@contextlib.contextmanager
def _quiet_item_metadata() -> Iterator[None]:
    logger, quiet = logging.getLogger("absl"), _NoStepMetadataWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def restore_numpy_tree(
    path: str | os.PathLike, config: ModelConfig, subtree: str | None = None
) -> Params:
    """The params in an orbax pytree checkpoint (or under one top-level key of it) as float32 host
    numpy arrays, after checking every name and shape against `config`."""
    path = Path(path).absolute()
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        with _quiet_item_metadata():
            tree = checkpointer.metadata(path).item_metadata.tree
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"{path}: not a readable orbax checkpoint ({e})") from e
    if subtree is not None:
        if not isinstance(tree, dict) or subtree not in tree:
            keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            raise ValueError(f"{path}: checkpoint has no '{subtree}' entry (found {keys})")
        tree = tree[subtree]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), _int_keys(tree))
    check_params(target, config, str(path))
    item = target if subtree is None else {subtree: target}
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32), item
    )
    with _quiet_item_metadata():
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    return restored[subtree] if subtree is not None else restored


def _run_dir_and_step(path: Path, step: int | None) -> tuple[Path, int | None]:
    """Normalises RUN, RUN/checkpoints and RUN/checkpoints/STEP to (RUN, step)."""
    if (path / STATE_ITEM).is_dir() and path.name.isdigit():
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is the checkpoint of step {path.name}, but step={step}")
        return path.parent.parent, int(path.name)
    if path.name == CHECKPOINT_DIR and not (path / CHECKPOINT_DIR).is_dir():
        return path.parent, step
    return path, step


def load_params_source(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    config_file: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> ParamsSource:
    """Reads params (float32 numpy), config and tokenizer location from a model or run directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    if is_model_dir(path) and not (path / CHECKPOINT_DIR).is_dir():
        if step is not None:
            raise ValueError(f"{path} is a model directory (one set of params); drop step={step}")
        config = _read_config(Path(config_file) if config_file else path / CONFIG_FILE)
        params = restore_numpy_tree(path / PARAMS_DIR, config)
        return ParamsSource(config, params, Path(tokenizer_dir or path), f"model dir {path}")

    run, step = _run_dir_and_step(path, step)
    steps = checkpoint_steps(run / CHECKPOINT_DIR)
    if not steps:
        raise FileNotFoundError(
            f"{path}: neither an m3_jax model directory ({CONFIG_FILE} + {PARAMS_DIR}/) nor a "
            f"training run with finished checkpoints in {run / CHECKPOINT_DIR}"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{run / CHECKPOINT_DIR}: no checkpoint for step {step}; have {steps}")
    config = _read_config(Path(config_file) if config_file else _run_file(run, CONFIG_FILE))
    tokenizer = Path(tokenizer_dir) if tokenizer_dir else _run_tokenizer(run)
    state_dir = run / CHECKPOINT_DIR / str(step) / STATE_ITEM
    params = restore_numpy_tree(state_dir, config, subtree="params")
    return ParamsSource(config, params, tokenizer, f"run {run}, step {step}", step)


def _read_config(path: Path) -> ModelConfig:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config file is missing")
    return ModelConfig.load_json(path).replace(param_dtype="float32")


def _run_file(run: Path, name: str) -> Path:
    for candidate in (run / RUN_INFO_DIR / name, run / EXPORT_DIR / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{run}: the run's model config is in neither {run / RUN_INFO_DIR / name} nor "
        f"{run / EXPORT_DIR / name}; "
        "pass it explicitly (--config FILE, a m3_jax_config.json)"
    )


def _run_tokenizer(run: Path) -> Path:
    for candidate in (run / RUN_INFO_DIR, run / EXPORT_DIR):
        if (candidate / "tokenizer_config.json").is_file() or (
            candidate / "sentencepiece.bpe.model"
        ).is_file():
            return candidate
    raise FileNotFoundError(
        f"{run}: no tokenizer files in {run / RUN_INFO_DIR} or {run / EXPORT_DIR}; "
        "pass the tokenizer directory explicitly (--tokenizer DIR)"
    )
