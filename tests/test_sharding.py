"""m3_jax.sharding and the sharded train step on 8 CPU devices (conftest sets XLA_FLAGS).

Loss and gradients on every mesh shape equal the single-device computation for the same global
batch; parameter and optimizer-state layouts follow the rules; checkpoints move between meshes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from m3_jax import checkpoint, sharding
from m3_jax.config import LossConfig, OptimConfig, bge_m3, tiny
from m3_jax.model import abstract_params
from m3_jax.tiny import random_params
from m3_jax.training import sharded
from m3_jax.training.optim import make_optimizer
from m3_jax.training.state import abstract_state, init_state
from m3_jax.training.step import StepConfig, loss_fn, train_step
from tests.test_step import graphdef_of, make_batch

P = PartitionSpec
B, G, LQ, LP = 8, 2, 8, 16
# Heads and MLP divide by 2 (tensor), embed by 8 (fsdp).
CFG = tiny(vocab_size=200, num_hidden_layers=1, hidden_dropout_prob=0.0)
CFG = CFG.replace(attention_probs_dropout_prob=0.0)
LOSS = LossConfig(temperature=0.05, num_shards=2)
STEP = StepConfig(LOSS, sub_batch_size=None, dropout=False, data_shards=1)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (4, 2, 1)]


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=3)


@pytest.fixture(scope="module")
def batch():
    return make_batch(5, B, G, LQ, LP, teacher=True)


def value_and_grad(params, batch, step_config, mesh=None):
    fn = jax.value_and_grad(loss_fn, has_aux=True)
    graphdef = graphdef_of(CFG)

    def call(p, b):
        return fn(p, graphdef, b, jnp.int32(0), None, step_config)

    if mesh is None:
        return jax.jit(call)(params, batch)
    layout = sharding.param_shardings(CFG, mesh, sharding.FSDP_RULES)
    data = sharding.batch_sharding(mesh)
    jitted = jax.jit(
        call, in_shardings=(layout, data), out_shardings=(sharding.replicated(mesh), layout)
    )
    with jax.set_mesh(mesh):
        out = jitted(sharding.put_global(params, layout), sharding.put_global(batch, data))
    (_, _), grads = out
    for leaf, want in zip(jax.tree.leaves(grads), jax.tree.leaves(layout), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    return out


@pytest.fixture(scope="module")
def single_device(params, batch):
    return value_and_grad(params, batch, STEP)


def assert_trees_close(a, b, rtol=2e-5):
    """Leaves within rtol, and within rtol of the largest value of the tree in absolute terms:
    some gradients are exactly zero in exact arithmetic (key biases) and only rounding noise."""
    scale = max(float(np.abs(np.asarray(y)).max()) for y in jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * scale)


# Mesh ------------------------------------------------------------------------------------------


def test_resolve_mesh_shape():
    assert sharding.resolve_mesh_shape(1, -1, 1, 8) == (1, 8, 1)
    assert sharding.resolve_mesh_shape(2, -1, 2, 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
    for bad in [(-1, -1, 1), (3, -1, 1), (2, 2, 1), (0, 8, 1)]:
        with pytest.raises(ValueError, match="mesh"):
            sharding.resolve_mesh_shape(*bad, 8)


@pytest.mark.parametrize("shape", MESHES)
def test_make_mesh_uses_every_device_once(shape):
    mesh = sharding.make_mesh(*shape)
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_names == sharding.MESH_AXES
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert sharding.data_parallel_size(mesh) == shape[0] * shape[1]


def test_multi_slice_mesh_needs_one_granule_per_slice():
    with pytest.raises(ValueError, match="needs as many processes; the devices come from 1"):
        sharding.make_mesh(1, -1, 1, dcn_data=2)


# Layouts ---------------------------------------------------------------------------------------


def test_param_specs_follow_the_rules():
    specs = sharding.param_specs(CFG, sharding.FSDP_RULES, {"data": 2, "fsdp": 2, "tensor": 2})
    layer = specs["encoder"]["layers"][0]
    assert layer["attention"]["query"]["kernel"] == P("fsdp", "tensor", None)
    assert layer["attention"]["query"]["bias"] == P("tensor", None)
    assert layer["attention"]["output"]["kernel"] == P("tensor", None, "fsdp")
    assert layer["intermediate"]["kernel"] == P("fsdp", "tensor")
    assert layer["output"]["kernel"] == P("tensor", "fsdp")
    assert layer["output_layer_norm"]["scale"] == P("fsdp")
    assert specs["encoder"]["embeddings"]["word_embeddings"]["embedding"] == P(None, "fsdp")
    assert specs["colbert_linear"]["kernel"] == P("fsdp", "tensor")
    assert specs["sparse_linear"]["kernel"] == P("fsdp", None)


def test_indivisible_dimension_is_replicated_and_unknown_axis_fails():
    assert sharding.spec_for(("embed",), (6,), sharding.FSDP_RULES, {"fsdp": 4}) == P(None)
    with pytest.raises(ValueError, match="'nope' has no sharding rule"):
        sharding.spec_for(("nope",), (8,), sharding.FSDP_RULES, {"fsdp": 4})
    with pytest.raises(ValueError, match="used twice"):
        sharding.spec_for(("mlp", "heads"), (8, 8), sharding.FSDP_RULES, {"tensor": 2})


def test_tensor_parallel_rules_shard_heads_and_mlp_only():
    rules = (("vocab", None), ("embed", None), ("heads", "tensor"), ("kv", None))
    rules += (("mlp", "tensor"), ("colbert", None))
    specs = sharding.param_specs(CFG, rules, {"data": 1, "fsdp": 1, "tensor": 4})
    layer = specs["encoder"]["layers"][0]
    assert layer["attention"]["key"]["kernel"] == P(None, "tensor", None)
    assert layer["output"]["kernel"] == P("tensor", None)
    assert specs["encoder"]["embeddings"]["word_embeddings"]["embedding"] == P(None, None)


def test_optimizer_state_mirrors_param_shardings():
    mesh = sharding.make_mesh(2, 2, 2)
    tx, _ = make_optimizer(OptimConfig(), 10, abstract_params(CFG))
    layout = sharded.state_shardings(CFG, tx, mesh, sharding.FSDP_RULES)
    adam = layout.opt_state[1]  # (clip, scale_by_adam, add_decayed_weights)
    assert jax.tree.structure(adam.mu) == jax.tree.structure(layout.params)
    for moment in (adam.mu, adam.nu):
        for got, want in zip(jax.tree.leaves(moment), jax.tree.leaves(layout.params), strict=True):
            assert got == want
    assert adam.count.spec == P()
    assert layout.step.spec == P() and layout.rng.spec == P()


def test_bytes_per_device_of_bge_m3_on_a_v4_32_mesh():
    config = bge_m3()
    shapes = abstract_params(config)
    total = sum(x.size * 4 for x in jax.tree.leaves(shapes))
    mesh_shape = {"data": 1, "fsdp": 16, "tensor": 1}
    specs = sharding.param_specs(config, sharding.FSDP_RULES, mesh_shape)
    per_device = sharding.bytes_per_device(shapes, specs, mesh_shape)
    # Every kernel and table has an `embed` axis that 16 divides; only the q/k/v and MLP biases
    # (no `embed` axis, 0.7 MB in all) stay whole, so a device holds just over a sixteenth.
    replicated_biases = 24 * (3 * 1024 + 4096) * 4
    assert per_device == pytest.approx(total / 16 + replicated_biases * 15 / 16, rel=1e-4)
    assert sharding.shard_shape((250002, 1024), P(None, "fsdp"), mesh_shape) == (250002, 64)


# Loss and gradients across meshes --------------------------------------------------------------


@pytest.mark.parametrize("shape", MESHES)
def test_loss_and_gradients_equal_single_device(shape, params, batch, single_device):
    (loss, aux), grads = value_and_grad(params, batch, STEP, sharding.make_mesh(*shape))
    (want_loss, want_aux), want_grads = single_device
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    # Loss parts, then head health (its cosines are differences of sums: a looser atol).
    for parts, want_parts, atol in zip(aux, want_aux, (1e-7, 1e-6), strict=True):
        for key in want_parts:
            np.testing.assert_allclose(parts[key], want_parts[key], rtol=1e-5, atol=atol)
    assert_trees_close(grads, want_grads)


def test_split_batch_on_a_mesh_equals_single_device(params, batch, single_device):
    # Data-parallel size 4: 2 queries and 4 passages per device, encoded 1 and 2 at a time.
    step = StepConfig(LOSS, sub_batch_size=2, dropout=False, data_shards=4)
    (loss, _), grads = value_and_grad(params, batch, step, sharding.make_mesh(2, 2, 2))
    np.testing.assert_allclose(loss, single_device[0][0], rtol=1e-5)
    assert_trees_close(grads, single_device[1])


def test_sharded_train_step_equals_single_device_step(params, batch):
    # Adam's first update is g / (|g| + eps): with a small eps it turns rounding noise in the
    # (mathematically zero) key-bias gradients into full steps; eps=1 keeps it proportional to g.
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, eps=1.0), 10, params)
    mesh = sharding.make_mesh(1, 4, 2)
    layout = sharded.state_shardings(CFG, tx, mesh, sharding.FSDP_RULES)
    state = sharded.initial_state(sharding.put_global(params, layout.params), tx, 0, layout)
    step_fn = sharded.jit_train_step(graphdef_of(CFG), tx, STEP, layout, mesh)
    lr = np.float32(schedule(0))
    with jax.set_mesh(mesh):
        new_state, metrics = step_fn(
            state, sharding.put_global(batch, sharding.batch_sharding(mesh)), lr
        )
    assert state.params["sparse_linear"]["kernel"].is_deleted()  # donated
    plain = functools.partial(train_step, graphdef=graphdef_of(CFG), tx=tx, config=STEP)
    want_state, want_metrics = jax.jit(plain)(init_state(params, tx, 0), batch, lr)
    np.testing.assert_allclose(metrics["loss/loss"], want_metrics["loss/loss"], rtol=1e-5)
    assert_trees_close(new_state.params, want_state.params, rtol=1e-5)
    for leaf, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(layout), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def test_fresh_params_are_the_same_on_any_mesh():
    mesh = sharding.make_mesh(2, 2, 2)
    layout = sharding.param_shardings(CFG, mesh, sharding.FSDP_RULES)
    on_mesh = sharded.fresh_params(CFG, 7, layout)
    one_device = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    single = sharded.fresh_params(
        CFG, 7, sharding.param_shardings(CFG, one_device, sharding.FSDP_RULES)
    )
    assert_trees_close(on_mesh, single, rtol=0)


# Checkpoints across meshes ---------------------------------------------------------------------


def state_on(mesh, params, tx):
    layout = sharded.state_shardings(CFG, tx, mesh, sharding.FSDP_RULES)
    return sharded.initial_state(sharding.put_global(params, layout.params), tx, 0, layout), layout


def restore_on(directory, mesh, params, tx):
    layout = sharded.state_shardings(CFG, tx, mesh, sharding.FSDP_RULES)
    target = sharded.with_shardings(abstract_state(abstract_params(CFG), tx), layout)
    manager = checkpoint.make_manager(directory, keep=2, async_save=False)
    state, position = checkpoint.restore_latest(manager, target)
    manager.close()
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(layout), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    return state, position


def test_checkpoint_moves_between_meshes(tmp_path, params):
    tx, _ = make_optimizer(OptimConfig(), 10, params)
    # Non-trivial moments, so a mix-up between mu and nu or between params would show.
    state, _ = state_on(sharding.make_mesh(2, 2, 2), params, tx)
    state = state.replace(
        step=state.step + 5,
        opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x, state.opt_state),
    )
    manager = checkpoint.make_manager(tmp_path / "a", keep=2, async_save=True)
    checkpoint.save(manager, 5, state, {"epoch": 1, "step": 3})
    manager.wait_until_finished()
    manager.close()
    devices = jax.devices()
    for mesh in (
        sharding.make_mesh(1, 4, 1, devices=devices[:4]),
        sharding.make_mesh(1, 1, 1, devices=devices[:1]),
        sharding.make_mesh(4, 1, 2),
    ):
        restored, position = restore_on(tmp_path / "a", mesh, params, tx)
        assert position == {"epoch": 1, "step": 3}
        assert_trees_close(restored, state, rtol=0)
    # And back: saved on one device, restored on all eight.
    single, _ = restore_on(
        tmp_path / "a", sharding.make_mesh(1, 1, 1, devices=devices[:1]), params, tx
    )
    manager = checkpoint.make_manager(tmp_path / "b", keep=2, async_save=False)
    checkpoint.save(manager, 5, single, {"epoch": 1, "step": 3})
    manager.close()
    restored, _ = restore_on(tmp_path / "b", sharding.make_mesh(1, 8, 1), params, tx)
    assert_trees_close(restored, state, rtol=0)


def test_put_global_never_places_the_whole_array_on_one_device():
    mesh = sharding.make_mesh(1, 8, 1)
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    out = sharding.put_global({"x": x}, {"x": NamedSharding(mesh, P("fsdp"))})["x"]
    assert {s.data.shape for s in out.addressable_shards} == {(8, 3)}
    np.testing.assert_array_equal(np.asarray(out), x)
