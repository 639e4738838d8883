"""Training checkpoints: orbax CheckpointManager holding the train state and the loader position.

Saves are asynchronous (device-to-host copy first, so the next step may donate the buffers),
the newest `keep` are kept, and restore reads onto an abstract target so shapes, dtypes and
shardings come from the current run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from m3_jax.run_dir import LOADER_ITEM as LOADER
from m3_jax.run_dir import STATE_ITEM as STATE


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
    """(state, loader position) of the newest checkpoint, or None when there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), LOADER: ocp.args.JsonRestore()}
        ),
    )
    return restored[STATE], restored[LOADER]
