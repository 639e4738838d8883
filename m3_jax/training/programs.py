"""The train step's compiled programs, one per bucket shape, compiled ahead of time in parallel.

Every bucket of static shapes needs its own program. They are lowered and compiled
(`jit(...).lower(abstract inputs).compile()`) on a pool of threads as soon as the state's layout
is known, so compilation overlaps with restoring or initialising the state, and the first step
waits only for its own bucket while the others finish in the background. XLA releases the GIL
while it compiles, so the programs compile concurrently where the host has the cores: one XLA
compile already keeps about 1.5 CPU cores busy (its LLVM code generation runs on a thread pool),
so the default is one program per two cores. On a 2-core host that is one at a time: two at once
took 53 s for three tiny-recipe programs against 40 s one after another. With the persistent
compilation cache a relaunch reads the programs back instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
from jax.sharding import Mesh

from m3_jax.data.plan import BatchShape
from m3_jax.training import sharded


def compile_workers(requested: int, num_programs: int) -> int:
    """Threads to compile `num_programs` programs: `requested`, or (-1) one per two CPU cores."""
    if requested == 0 or requested < -1:
        raise ValueError(f"train.compile_workers={requested}; expected -1 (auto) or >= 1")
    cores = os.cpu_count() or 1
    return max(1, min(num_programs, cores // 2 if requested < 0 else requested))


class BucketPrograms:
    """`programs[shape]`: the compiled train step of one bucket shape (waits for it)."""

    def __init__(
        self,
        step_fns: dict[bool, Any],
        state_spec: Any,
        shapes: Iterable[BatchShape],
        batch_spec: Callable[[BatchShape], dict],
        mesh: Mesh,
        workers: int,
    ):
        """step_fns[in_batch_negatives]: the jitted train steps; state_spec: the train state as
        ShapeDtypeStructs with shardings; batch_spec: a bucket's global batch as
        ShapeDtypeStructs (`sharded.batch_spec`, or RetroMAE's)."""
        shapes = list(shapes)
        self.workers = compile_workers(workers, len(shapes))
        self._pool = ThreadPoolExecutor(self.workers, "compile")
        self._futures: dict[BatchShape, Future] = {
            shape: self._pool.submit(
                self._compile,
                step_fns[shape.in_batch_negatives],
                state_spec,
                batch_spec(shape),
                mesh,
            )
            for shape in shapes
        }

    @staticmethod
    def _compile(step_fn, state_spec, batch_spec: dict, mesh: Mesh):
        """(the compiled program, seconds to lower and compile it)."""
        start = time.perf_counter()
        with jax.set_mesh(mesh):  # the mesh context is per thread
            lowered = step_fn.lower(state_spec, batch_spec, sharded.LR_SPEC)
        program = lowered.compile()
        return program, round(time.perf_counter() - start, 2)

    def __len__(self) -> int:
        return len(self._futures)

    def __getitem__(self, shape: BatchShape) -> Any:
        return self._futures[shape].result()[0]

    def wait_all(self) -> dict[str, float]:
        """Waits for every program (a compile error is raised here); {bucket label: seconds}."""
        seconds = {shape.label: future.result()[1] for shape, future in self._futures.items()}
        self._pool.shutdown()
        return seconds

    def close(self) -> None:
        """Drops compiles not yet started (a run that ends early)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
