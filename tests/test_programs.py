"""m3_jax.training.programs: bucket programs compiled ahead of time on a thread pool.

A program compiled in the pool computes the same step as calling the jitted step; every bucket
gets its own program; a failed compile is raised where the program is asked for.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax import sharding
from m3_jax.config import LossConfig, OptimConfig, tiny
from m3_jax.data.plan import BatchShape
from m3_jax.model import abstract_params, graphdef
from m3_jax.tiny import random_params
from m3_jax.training import sharded
from m3_jax.training.optim import make_optimizer
from m3_jax.training.programs import BucketPrograms, compile_workers
from m3_jax.training.state import abstract_state
from m3_jax.training.step import StepConfig
from tests.test_step import make_batch

CFG = tiny(vocab_size=100, num_hidden_layers=1)
SHAPES = [BatchShape(2, 8, 16, 2, True), BatchShape(2, 8, 32, 2, True)]
NO_TEACHER = functools.partial(sharded.batch_spec, with_teacher=False)


def test_compile_workers():
    cores = os.cpu_count() or 1
    assert compile_workers(-1, 7) == max(1, min(7, cores // 2))
    assert compile_workers(-1, 1) == 1
    assert compile_workers(3, 7) == 3
    assert compile_workers(8, 2) == 2
    for bad in (0, -2):
        with pytest.raises(ValueError, match="train.compile_workers"):
            compile_workers(bad, 3)


@pytest.fixture(scope="module")
def setup():
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = random_params(CFG, seed=0)
    tx, _ = make_optimizer(OptimConfig(lr=1e-3), 10, params)
    layout = sharded.state_shardings(CFG, tx, mesh, sharding.FSDP_RULES)
    step_config = StepConfig(LossConfig(num_shards=1), None, dropout=True, data_shards=1)
    step_fn = sharded.jit_train_step(graphdef(CFG), tx, step_config, layout, mesh)
    spec = sharded.with_shardings(abstract_state(abstract_params(CFG), tx), layout)
    return mesh, params, tx, layout, step_fn, spec


def test_programs_compute_the_jitted_step(setup):
    mesh, params, tx, layout, step_fn, spec = setup
    programs = BucketPrograms({True: step_fn}, spec, SHAPES, NO_TEACHER, mesh, workers=2)
    assert len(programs) == 2
    assert programs[SHAPES[0]] is not programs[SHAPES[1]]

    def fresh():
        return sharded.initial_state(sharding.put_global(params, layout.params), tx, 0, layout)

    for seed, shape in enumerate(SHAPES):
        batch = make_batch(seed, 2, 2, shape.query_len, shape.passage_len)
        lr = jnp.float32(1e-3)
        with jax.set_mesh(mesh):  # the state is donated: each call gets its own
            state_a, metrics_a = programs[shape](fresh(), batch, lr)
            state_b, metrics_b = step_fn(fresh(), batch, lr)
        assert int(state_a.step) == 1
        np.testing.assert_array_equal(metrics_a["loss/loss"], metrics_b["loss/loss"])
        jax.tree.map(np.testing.assert_array_equal, state_a.params, state_b.params)
    seconds = programs.wait_all()
    assert sorted(seconds) == sorted(s.label for s in SHAPES)
    assert all(s > 0 for s in seconds.values())


def test_a_failed_compile_is_raised_where_the_program_is_asked_for(setup):
    mesh, _, _, _, _, spec = setup

    def step(state, batch, lr):
        if batch["passage_ids"].shape[1] != SHAPES[0].passage_len:
            raise ValueError("no program for this length")
        return lr * 2

    programs = BucketPrograms({True: jax.jit(step)}, spec, SHAPES, NO_TEACHER, mesh, workers=1)
    assert programs[SHAPES[0]] is not None
    with pytest.raises(ValueError, match="no program for this length"):
        programs[SHAPES[1]]
    with pytest.raises(ValueError, match="no program for this length"):
        programs.wait_all()
    programs.close()
