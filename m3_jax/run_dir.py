"""The on-disk layout of m3_jax model directories and training run directories, and their params.

A model directory (what `convert from-pytorch`, a run's `export/` and `best/` are):
    m3_jax_config.json     ModelConfig fields
    params/                orbax pytree checkpoint of the float32 params
    mlm_head/              (optional) the masked-LM head of an XLM-R checkpoint, for RetroMAE
    tokenizer files        tokenizer.json / sentencepiece.bpe.model / tokenizer_config.json / ...
    best.json              (best/ only) the step and metrics that made it the best

A training run directory (`workdir`):
    checkpoints/STEP/state   orbax checkpoint of the train state (params, optimizer, step, rng)
    checkpoints/STEP/loader  the data loader position (JSON)
    unreadable_checkpoints/STEP  checkpoints that failed to restore while an older one did,
                             moved here on resume (kept for inspection; safe to delete)
    model_info/              m3_jax_config.json + tokenizer files, written when the run starts,
                             so that any checkpoint converts without the training config
    export/                  model directory of the final params
    best/                    model directory of the best evaluated params (when evaluating)
    metrics.jsonl            one JSON object per logged step and per evaluation
    summary.json             final step, losses, evaluations, best step, export path, timings
    tensorboard/             the same metrics as TensorBoard events (with tensorboardX)

Params are always read into float32 host numpy arrays (orbax partial restore with
`restore_type=np.ndarray`): a checkpoint written by a sharded run is assembled once on the host
and never placed whole on one device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from m3_jax.config import ModelConfig
from m3_jax.model import (
    M3Model,
    Params,
    RetroMAEModel,
    check_params,
    layers_stacked,
    params_in_layout,
    per_layer,
)
from m3_jax.model.abstract import ModelClass
from m3_jax.tokenization import TOKENIZER_FILES, has_tokenizer

# Model directory.
CONFIG_FILE = "m3_jax_config.json"
PARAMS_DIR = "params"
MLM_HEAD_DIR = "mlm_head"
BEST_INFO = "best.json"
# Run directory.
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
LOADER_ITEM = "loader"
UNREADABLE_DIR = "unreadable_checkpoints"
RUN_INFO_DIR = "model_info"
EXPORT_DIR = "export"
BEST_DIR = "best"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CHECKPOINT_DIR).is_dir()


# Writing ----------------------------------------------------------------------------------------


def copy_tokenizer_files(src: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            # Contents only: the copy gets the user's umask, not the source's mode.
            shutil.copyfile(Path(src) / name, Path(out) / name)
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"{src}: no tokenizer files found (looked for {TOKENIZER_FILES})")
    return copied


def save_model_dir(
    out: str | os.PathLike,
    config: ModelConfig,
    params: Params,
    tokenizer_source: str | os.PathLike | None,
    mlm_head: Params | None = None,
) -> Path:
    """Writes a model directory (with `mlm_head/` when `mlm_head` is given); `out` must not
    exist or be empty. Multi-process runs call it on every process (orbax's save is
    collective); process 0 writes the small files."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output directory")
    layout_config, params = per_layer(config, params)  # files hold one subtree per layer
    check_params(params, layout_config, str(out))
    if mlm_head is not None:
        check_params(mlm_head, layout_config, f"{out} MLM head", RetroMAEModel, "lm_head")
    # Every process checks the directory before any of them writes.
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_model_dir {out}")
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((out / PARAMS_DIR).absolute(), params)
        if mlm_head is not None:
            checkpointer.save((out / MLM_HEAD_DIR).absolute(), mlm_head)
    if jax.process_index() == 0:
        config.save_json(out / CONFIG_FILE)
        if tokenizer_source is not None:
            copy_tokenizer_files(tokenizer_source, out)
    return out


def write_run_info(
    workdir: str | os.PathLike, config: ModelConfig, tokenizer_dir: str | os.PathLike
) -> None:
    """Writes `WORKDIR/model_info/` (call once when the run starts)."""
    info = Path(workdir) / RUN_INFO_DIR
    info.mkdir(parents=True, exist_ok=True)
    config.replace(param_dtype="float32").save_json(info / CONFIG_FILE)
    copy_tokenizer_files(tokenizer_dir, info)


# Reading ----------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A model config file, with float32 param storage (how params are always read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config file is missing")
    return ModelConfig.load_json(path).replace(param_dtype="float32")


def checkpoint_steps(run: str | os.PathLike) -> list[int]:
    """Steps of a run with a finished checkpoint (orbax writes to a temporary name, then renames)."""
    root = Path(run) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(
        int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / STATE_ITEM).is_dir()
    )


def locate_run(path: str | os.PathLike, step: int | None) -> tuple[Path, int | None]:
    """Normalises RUN, RUN/checkpoints and RUN/checkpoints/STEP to (RUN, step)."""
    path = Path(path)
    if (path / STATE_ITEM).is_dir() and path.name.isdigit():
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is the checkpoint of step {path.name}, but step={step}")
        return path.parent.parent, int(path.name)
    if path.name == CHECKPOINT_DIR and not (path / CHECKPOINT_DIR).is_dir():
        return path.parent, step
    return path, step


def run_info_dir(run: str | os.PathLike) -> Path:
    """Where a run's model config and tokenizer are: `model_info/`, else `export/`."""
    run = Path(run)
    for candidate in (run / RUN_INFO_DIR, run / EXPORT_DIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"{run}: the run's model config is in neither {run / RUN_INFO_DIR / CONFIG_FILE} nor "
        f"{run / EXPORT_DIR / CONFIG_FILE}; pass it explicitly (--config FILE, a "
        f"{CONFIG_FILE})"
    )


def check_tokenizer_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not has_tokenizer(path):
        raise FileNotFoundError(
            f"{path}: no tokenizer files for {what}; pass the tokenizer directory explicitly "
            "(--tokenizer DIR)"
        )
    return path


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


def is_retromae_tree(params: Params) -> bool:
    """Whether a params tree is RetroMAEModel's (a RetroMAE run's train state)."""
    return {"lm_head", "decoder"} <= set(params)


def restore_mlm_head(model_dir: str | os.PathLike, config: ModelConfig) -> Params | None:
    """A model directory's MLM head (float32 host arrays), or None when it has none."""
    path = Path(model_dir) / MLM_HEAD_DIR
    if not path.is_dir():
        return None
    return restore_params(path, config, model_class=RetroMAEModel, part="lm_head")


def restore_params(
    path: str | os.PathLike,
    config: ModelConfig,
    subtree: str | None = None,
    model_class: ModelClass | None = M3Model,
    part: str | None = None,
) -> Params:
    """The params in an orbax pytree checkpoint (a model directory's `params/`, or the `params`
    entry of a train state with `subtree="params"`) as float32 host numpy arrays, after checking
    every name and shape against `model_class(config)` (or its subtree `part`; None: the model
    class whose params the checkpoint holds, `is_retromae_tree`); in the layer
    layout `config.scan_layers` says, whichever layout the checkpoint holds."""
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
    # A train state of a scan_layers run holds stacked layers, model directories per-layer ones.
    stacked = config.replace(scan_layers=layers_stacked(target))
    if model_class is None:  # a train state: the fine-tuning model's, or RetroMAE's
        model_class = RetroMAEModel if is_retromae_tree(target) else M3Model
    check_params(target, stacked, str(path), model_class, part)
    item = target if subtree is None else {subtree: target}
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32), item
    )
    with _quiet_item_metadata():
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    restored = restored[subtree] if subtree is not None else restored
    return params_in_layout(restored, config.scan_layers)
