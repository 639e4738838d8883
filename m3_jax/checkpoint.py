"""Training checkpoints: orbax CheckpointManager holding the train state and the loader position.

Saves are asynchronous (device-to-host copy first, so the next step may donate the buffers),
the newest `keep` are kept, and restore reads onto an abstract target so shapes, dtypes and
shardings come from the current run. A step counts only once orbax has finished it (it writes
under a temporary name and renames), and resuming falls back past finished checkpoints that do
not restore (a file truncated by a full disk or a broken copy) to the newest one that does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from m3_jax.run_dir import LOADER_ITEM as LOADER
from m3_jax.run_dir import STATE_ITEM as STATE
from m3_jax.run_dir import UNREADABLE_DIR

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """No checkpoint of a run restores; the message names the directory and what to do."""


def make_manager(
    directory: str | Path, *, keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, loader_position: dict) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), LOADER: ocp.args.JsonSave(loader_position)}
        ),
    )


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
    """(state, loader position) of the newest checkpoint that restores, or None when there is
    none.

    Unfinished saves (orbax's temporary names) are never steps; they are named in a warning.
    Newer checkpoints that fail while an older one restores are damaged: each is logged with its
    reason and moved to the run's `unreadable_checkpoints/` (nothing is deleted; later saves take
    their step numbers again). When every checkpoint fails, the cause is more likely this run's
    settings (another model or optimizer), so nothing moves and CheckpointError says so.
    """
    directory = Path(manager.directory)
    unfinished = sorted(p.name for p in directory.glob(f"*{ocp.step.TMP_DIR_SUFFIX}*"))
    if unfinished:
        log.warning(
            "ignoring unfinished checkpoints in %s (saves cut short): %s",
            directory,
            ", ".join(unfinished),
        )
    failed: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardRestore(abstract_state),
                        LOADER: ocp.args.JsonRestore(),
                    }
                ),
            )
            reason = None
        # TensorStore, JSON and file errors alike: whatever it is, the step does not restore.
        except Exception as e:  # noqa: BLE001
            reason = one_line(e)
        if every_process_agrees(reason is None):
            if failed:
                set_aside(directory, failed)
                manager.reload()
            return restored[STATE], restored[LOADER]
        failed.append((step, reason or "another process could not restore it"))
        log.warning("checkpoint %s does not restore: %s", directory / str(step), failed[-1][1])
    if not failed:
        return None
    reasons = "; ".join(f"step {step}: {reason}" for step, reason in failed)
    raise CheckpointError(
        f"no checkpoint in {directory} restores ({reasons}). If the model or optimizer "
        "settings changed since they were saved, rerun with the old ones; to start afresh, "
        f"set another --config.workdir or move {directory} away"
    )


def one_line(error: Exception, limit: int = 300) -> str:
    """The first line of an error's message (TensorStore's run to a hundred lines)."""
    text = str(error).strip().split("\n", 1)[0]
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def every_process_agrees(ok: bool) -> bool:
    """True when `ok` on every process (each reads its own shards, so one may fail alone)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def set_aside(directory: Path, failed: list[tuple[int, str]]) -> None:
    """Moves the failed steps' directories to `../unreadable_checkpoints/` (process 0 moves,
    every process waits for it)."""
    aside = directory.parent / UNREADABLE_DIR
    if jax.process_index() == 0:
        aside.mkdir(exist_ok=True)
        for step, _ in failed:
            target = aside / str(step)
            suffix = 1
            while target.exists():  # the same step failed before, in an earlier resume
                target, suffix = aside / f"{step}.{suffix}", suffix + 1
            (directory / str(step)).rename(target)
            log.warning("moved unreadable checkpoint of step %d to %s", step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("unreadable checkpoints set aside")
