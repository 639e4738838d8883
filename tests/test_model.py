"""M3Model and ModelConfig: positions, heads, remat, dropout, bf16, sharding metadata, configs."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3_jax.config import ModelConfig, bge_m3, tiny
from m3_jax.model import (
    M3Model,
    abstract_params,
    layers_stacked,
    logical_axes,
    model_from_params,
    params_in_layout,
    roberta_position_ids,
)
from m3_jax.model.heads import l2_normalize
from m3_jax.tiny import random_params

VOCAB = 60
TOL = dict(rtol=1e-5, atol=1e-6)


def build(config: ModelConfig, seed: int = 0) -> M3Model:
    """A model with visibly varying random weights (numpy init: fast, no per-op compiles)."""
    return model_from_params(config, random_params(config, seed))


def with_config(model: M3Model, config: ModelConfig) -> M3Model:
    """The same parameters under another config (remat, dtype, attention, dropout)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: M3Model(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _forward(graphdef, state, ids, mask, rng, with_hidden):
    model = nnx.merge(graphdef, state)
    if with_hidden:
        return model.encoder(ids, mask, dropout_rng=rng)
    return model(ids, mask, dropout_rng=rng)


def forward(model: M3Model, ids, mask, dropout_rng=None):
    """Jitted M3Model forward (compiled once per graph and shape)."""
    return _forward(*nnx.split(model), ids, mask, dropout_rng, False)


def hidden_states(model: M3Model, ids, mask):
    return _forward(*nnx.split(model), ids, mask, None, True)


def batch(seed: int = 0, rows: int = 3, length: int = 12):
    """Ids with <s> ... </s>, right padding and a repeated token; matching attention mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    lengths = [length] + rng.integers(3, length, size=rows - 1).tolist()
    for row, n in enumerate(lengths):
        ids[row, 0] = 0
        ids[row, 1 + (n - 2) // 2] = ids[row, 1]  # a repeated token id
        ids[row, n - 1] = 2
        ids[row, n:] = 1
        mask[row, n:] = 0
    return ids, mask


# Positions -------------------------------------------------------------------------------------


def ref_position_ids(ids: np.ndarray, pad: int) -> np.ndarray:
    """RoBERTa's position ids: real tokens count up from pad+1, pads get pad."""
    out = np.empty_like(ids)
    for r, row in enumerate(ids):
        count = 0
        for c, token in enumerate(row):
            if token == pad:
                out[r, c] = pad
            else:
                count += 1
                out[r, c] = pad + count
    return out


def test_roberta_position_ids():
    ids = np.array([[0, 5, 6, 2, 1, 1], [0, 7, 2, 1, 1, 1], [0, 5, 6, 7, 8, 2], [1, 1, 0, 5, 1, 2]])
    got = np.asarray(roberta_position_ids(jnp.asarray(ids), 1))
    np.testing.assert_array_equal(got, ref_position_ids(ids, 1))
    np.testing.assert_array_equal(got[0], [2, 3, 4, 5, 1, 1])
    # The longest input the bge-m3 table holds (8192 tokens) ends at position 8193 < 8194.
    long_ids = jnp.full((1, 8192), 5, jnp.int32)
    assert (
        int(roberta_position_ids(long_ids, 1).max()) == 8193 == bge_m3().max_position_embeddings - 1
    )
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 4, size=(4, 30))
    np.testing.assert_array_equal(
        np.asarray(roberta_position_ids(jnp.asarray(rand), 3)), ref_position_ids(rand, 3)
    )


# Heads against numpy on the encoder output -----------------------------------------------------


def test_heads_match_numpy_on_hidden_states():
    config = tiny(vocab_size=VOCAB)
    model = build(config)
    params = random_params(config, 0)
    ids, mask = batch(1)
    out = forward(model, ids, mask)
    h = np.asarray(hidden_states(model, ids, mask), np.float64)

    def normalize(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    np.testing.assert_allclose(np.asarray(out.dense), normalize(h[:, 0]), **TOL)
    sp = params["sparse_linear"]
    w = np.maximum(h @ sp["kernel"] + sp["bias"], 0.0)[..., 0]
    w[(mask == 0) | np.isin(ids, [0, 1, 2, 3])] = 0.0
    np.testing.assert_allclose(np.asarray(out.sparse), w, **TOL)
    assert np.count_nonzero(w) > 0
    cb = params["colbert_linear"]
    col = (h[:, 1:] @ cb["kernel"] + cb["bias"]) * mask[:, 1:, None]
    np.testing.assert_allclose(np.asarray(out.colbert), normalize(col), **TOL)
    np.testing.assert_array_equal(np.asarray(out.colbert_mask), mask[:, 1:].astype(bool))
    assert np.all(np.asarray(out.colbert)[mask[:, 1:] == 0] == 0.0)


def test_l2_normalize_values_and_gradient_at_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0], [-2.0, 0.5]], np.float32)
    norm = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
    expected = x / np.maximum(norm, 1e-12)  # torch.nn.functional.normalize
    np.testing.assert_allclose(np.asarray(l2_normalize(x)), expected, **TOL)
    assert np.all(np.asarray(l2_normalize(x))[1] == 0.0)  # zero rows stay zero
    grad = np.asarray(jax.grad(lambda v: jnp.sum(l2_normalize(v) * jnp.arange(2.0)))(x))
    assert np.all(np.isfinite(grad))  # padded (zero) colbert rows must not give NaN gradients
    # d/dx of x / 1e-12 at the zero row, and the usual projection at [3, 4].
    np.testing.assert_allclose(grad[1], [0.0, 1e12], rtol=1e-6)
    np.testing.assert_allclose(
        grad[0], (np.array([0.0, 1.0]) - 0.8 * np.array([0.6, 0.8])) / 5, **TOL
    )


def test_padding_does_not_change_real_outputs():
    config = tiny(vocab_size=VOCAB)
    model = build(config, 1)
    ids, mask = batch(2, rows=2, length=10)
    out = forward(model, ids, mask)
    ids_long = np.pad(ids, ((0, 0), (0, 7)), constant_values=1)
    mask_long = np.pad(mask, ((0, 0), (0, 7)))
    out_long = forward(model, ids_long, mask_long)
    np.testing.assert_allclose(np.asarray(out_long.dense), np.asarray(out.dense), **TOL)
    np.testing.assert_allclose(np.asarray(out_long.sparse)[:, :10], np.asarray(out.sparse), **TOL)
    np.testing.assert_allclose(
        np.asarray(out_long.colbert)[:, :9], np.asarray(out.colbert), rtol=1e-5, atol=1e-6
    )


# Remat, dropout, dtype -------------------------------------------------------------------------


def _loss_and_grad(model: M3Model, ids, mask, rng):
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(ids, mask, dropout_rng=rng)
        return out.dense.sum() + jnp.sum(out.colbert * 0.5) + out.sparse.sum()

    return jax.jit(jax.value_and_grad(loss))(state), jax.make_jaxpr(jax.grad(loss))(state)


def test_remat_same_outputs_and_gradients():
    """With dropout on, so the recomputed forward must also replay the same dropout masks."""
    config = tiny(vocab_size=VOCAB)
    plain = build(config, 2)
    remat = with_config(plain, config.replace(remat=True))
    ids, mask = batch(3)
    rng = jax.random.key(7, impl="rbg")  # compiles faster than threefry on CPU
    (value, grads), jaxpr = _loss_and_grad(plain, ids, mask, rng)
    (value_r, grads_r), jaxpr_r = _loss_and_grad(remat, ids, mask, rng)
    assert "remat" not in str(jaxpr) and "checkpoint" not in str(jaxpr)
    assert "remat" in str(jaxpr_r) or "checkpoint" in str(jaxpr_r)
    np.testing.assert_allclose(float(value_r), float(value), rtol=1e-6)
    # The same outputs without dropout as well.
    a, b = forward(plain, ids, mask), forward(remat, ids, mask)
    for name in ("dense", "sparse", "colbert"):
        np.testing.assert_allclose(
            np.asarray(getattr(b, name)), np.asarray(getattr(a, name)), rtol=1e-6, atol=1e-7
        )
    flat, flat_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
    assert len(flat) == len(flat_r) > 0
    for g, g_r in zip(flat, flat_r, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g_r), np.asarray(g), rtol=1e-5, atol=1e-6)


def test_scan_layers_hold_stacked_params():
    """scan_layers models keep one leaf per layer weight, [num_layers, ...]; params_in_layout
    converts both ways without changing a value."""
    config = tiny(vocab_size=VOCAB, num_hidden_layers=3)
    stacked_config = config.replace(scan_layers=True)
    per_layer = random_params(config, 1)
    stacked = params_in_layout(per_layer, stacked=True)
    assert not layers_stacked(per_layer) and layers_stacked(stacked)
    shapes = jax.tree.map(lambda x: x.shape, abstract_params(stacked_config))
    assert jax.tree.map(lambda x: x.shape, stacked) == shapes
    kernel = stacked["encoder"]["layers"]["attention"]["query"]["kernel"]
    for i in range(3):
        np.testing.assert_array_equal(
            kernel[i], per_layer["encoder"]["layers"][i]["attention"]["query"]["kernel"]
        )
    back = params_in_layout(stacked, stacked=False)
    assert jax.tree.structure(back) == jax.tree.structure(per_layer)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(per_layer), strict=True):
        np.testing.assert_array_equal(a, b)
    axes = logical_axes(stacked_config)["encoder"]["layers"]["attention"]["query"]["kernel"]
    assert axes == (None, "embed", "heads", "kv")
    leaves = len(jax.tree.leaves(abstract_params(stacked_config)))
    assert leaves == len(jax.tree.leaves(abstract_params(config.replace(num_hidden_layers=1))))


@pytest.mark.parametrize("remat", [False, True])
def test_scan_over_layers_same_outputs_and_gradients(remat):
    """One lax.scan over the stacked layers equals the unrolled stack, dropout masks included."""
    config = tiny(vocab_size=VOCAB, num_hidden_layers=3, remat=remat)
    params = random_params(config, 2)
    plain = model_from_params(config, params)
    scanned = model_from_params(config.replace(scan_layers=True), params)
    ids, mask = batch(3)
    rng = jax.random.key(7, impl="rbg")
    (value, grads), _ = _loss_and_grad(plain, ids, mask, rng)
    (value_s, grads_s), jaxpr_s = _loss_and_grad(scanned, ids, mask, rng)
    assert "scan" in str(jaxpr_s)
    np.testing.assert_allclose(float(value_s), float(value), rtol=1e-6)
    a, b = forward(plain, ids, mask), forward(scanned, ids, mask)
    for name in ("dense", "sparse", "colbert"):
        # fp32 parity (1e-5): the scanned program fuses differently, and on some CPUs that
        # moves outputs by a few ulps more than the unrolled one (2.6e-6 relative seen).
        np.testing.assert_allclose(
            np.asarray(getattr(b, name)), np.asarray(getattr(a, name)), rtol=1e-5, atol=1e-6
        )
    grads_s = params_in_layout(nnx.to_pure_dict(grads_s), stacked=False)
    grads = nnx.to_pure_dict(grads)
    assert jax.tree.structure(grads_s) == jax.tree.structure(grads)
    for g, g_s in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_s), strict=True):
        # atol: a few fp32 roundings of the O(1) terms that cancel into gradients near zero.
        np.testing.assert_allclose(np.asarray(g_s), np.asarray(g), rtol=1e-5, atol=2e-6)


def test_dropout_only_with_rng():
    config = tiny(
        vocab_size=VOCAB,
        num_hidden_layers=1,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    model = build(config, 3)
    ids, mask = batch(4)
    a = forward(model, ids, mask)
    b = forward(model, ids, mask)
    np.testing.assert_array_equal(np.asarray(a.dense), np.asarray(b.dense))
    c = forward(model, ids, mask, jax.random.key(0))
    c2 = forward(model, ids, mask, jax.random.key(0))
    d = forward(model, ids, mask, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(c.dense), np.asarray(c2.dense))  # reproducible
    assert np.max(np.abs(np.asarray(c.dense) - np.asarray(a.dense))) > 1e-3
    assert np.max(np.abs(np.asarray(c.dense) - np.asarray(d.dense))) > 1e-3
    # Rates of 0: an rng changes nothing.
    no_drop = with_config(
        model, config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    )
    e = forward(no_drop, ids, mask, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(e.dense), np.asarray(a.dense), **TOL)
    # Attention dropout alone also acts (only through the rng).
    attn_only = with_config(model, config.replace(hidden_dropout_prob=0.0))
    f = forward(attn_only, ids, mask, jax.random.key(0))
    assert np.max(np.abs(np.asarray(f.dense) - np.asarray(a.dense))) > 1e-4


def test_bf16_compute_is_close_to_fp32():
    config = tiny(vocab_size=VOCAB)
    model = build(config, 4)
    bf16 = with_config(model, config.replace(dtype="bfloat16"))
    ids, mask = batch(5)
    ref, hidden = forward(model, ids, mask), hidden_states(model, ids, mask)
    out, hidden_bf16 = forward(bf16, ids, mask), hidden_states(bf16, ids, mask)
    assert hidden.dtype == jnp.float32 and hidden_bf16.dtype == jnp.bfloat16
    for name in ("dense", "sparse", "colbert"):
        got = np.asarray(getattr(out, name))
        assert got.dtype == np.float32  # outputs are float32 whatever the compute dtype
        np.testing.assert_allclose(got, np.asarray(getattr(ref, name)), atol=0.06)
        assert not np.array_equal(got, np.asarray(getattr(ref, name)))
    cos = np.sum(np.asarray(out.dense) * np.asarray(ref.dense), axis=-1)
    assert np.all(cos > 0.99)


# Sharding metadata -----------------------------------------------------------------------------

LOGICAL_AXES = {"vocab", "embed", "heads", "kv", "mlp", "colbert", None}


def test_every_param_has_logical_axes_of_its_rank():
    config = tiny(vocab_size=VOCAB)
    model = nnx.eval_shape(lambda: M3Model(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(state)
    params = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Param))
    spec_leaves = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, nnx.Param)
    )
    assert len(params) == len(spec_leaves) == len(jax.tree.leaves(abstract_params(config)))
    by_name = {}
    for (path, param), (spec_path, spec) in zip(params, spec_leaves, strict=True):
        assert path == spec_path
        name = jax.tree_util.keystr(path)
        axes = param.get_metadata().get("out_sharding")
        assert axes is not None, name
        assert len(axes) == param.ndim, (name, axes, param.shape)
        assert set(axes) <= LOGICAL_AXES, (name, axes)
        assert tuple(spec.get_value()) == tuple(axes), name
        by_name[name] = tuple(axes)
    assert by_name["['encoder']['embeddings']['word_embeddings']['embedding']"] == (
        "vocab",
        "embed",
    )
    assert by_name["['encoder']['layers'][0]['attention']['query']['kernel']"] == (
        "embed",
        "heads",
        "kv",
    )
    assert by_name["['encoder']['layers'][1]['attention']['output']['kernel']"] == (
        "heads",
        "kv",
        "embed",
    )
    assert by_name["['encoder']['layers'][0]['intermediate']['kernel']"] == ("embed", "mlp")
    assert by_name["['colbert_linear']['kernel']"] == ("embed", "colbert")


# ModelConfig -----------------------------------------------------------------------------------

SPEC_HF_CONFIG = {
    "architectures": ["XLMRobertaModel"],
    "model_type": "xlm-roberta",
    "vocab_size": 250002,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "max_position_embeddings": 8194,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-05,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "position_embedding_type": "absolute",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}


def test_bge_m3_matches_spec():
    c = bge_m3()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (250002, 1024, 24)
    assert (c.num_attention_heads, c.head_dim, c.intermediate_size) == (16, 64, 4096)
    assert (c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps) == (8194, 1, 1e-5)
    assert (c.pad_token_id, c.cls_token_id, c.eos_token_id, c.unk_token_id) == (1, 0, 2, 3)
    assert (c.hidden_dropout_prob, c.attention_probs_dropout_prob) == (0.1, 0.1)
    assert c.initializer_range == 0.02
    assert c.colbert_out_dim == 1024 and c.normalize_embeddings
    assert c.max_length == 8192
    assert set(c.special_token_ids) == {0, 1, 2, 3}
    assert c.to_hf_config() == SPEC_HF_CONFIG
    assert ModelConfig.from_hf_config(SPEC_HF_CONFIG) == c


def test_bge_m3_parameter_count():
    params = abstract_params(bge_m3())  # ShapeDtypeStructs: nothing allocated

    def count(tree):
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))

    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    assert count(params["encoder"]) == 566_705_152
    assert count(params["colbert_linear"]) == 1024 * 1024 + 1024
    assert count(params["sparse_linear"]) == 1024 + 1
    assert count(params) == 566_705_152 + 1024 * 1024 + 1024 + 1025
    assert params["encoder"]["embeddings"]["position_embeddings"]["embedding"].shape == (8194, 1024)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "bert"}, "model_type='bert'"),
        ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"vocab_size": None}, r"lacks required fields \['vocab_size'\]"),
        ({"num_attention_heads": 5}, "not divisible"),
    ],
)
def test_from_hf_config_errors(change, match):
    hf = dict(SPEC_HF_CONFIG)
    for key, value in change.items():
        if value is None:
            del hf[key]
        else:
            hf[key] = value
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize(
    "config",
    [
        bge_m3(),
        tiny(vocab_size=77),
        tiny(layer_norm_eps=1e-12, hidden_dropout_prob=0.0, initializer_range=0.05, pad_token_id=1),
    ],
)
def test_hf_config_round_trip(config):
    hf = json.loads(json.dumps(config.to_hf_config()))
    assert ModelConfig.from_hf_config(hf) == config
    # M3 and numerics options come as overrides.
    other = config.replace(colbert_dim=32, dtype="bfloat16", attention_impl="chunked", remat=True)
    assert (
        ModelConfig.from_hf_config(
            hf, colbert_dim=32, dtype="bfloat16", attention_impl="chunked", remat=True
        )
        == other
    )


def test_config_json_round_trip_and_errors(tmp_path):
    config = tiny(vocab_size=33, colbert_dim=16, dtype="bfloat16", remat=True)
    path = tmp_path / "c.json"
    config.save_json(path)
    assert ModelConfig.load_json(path) == config

    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "hidden_size": 64,\n  oops\n}\n')
    with pytest.raises(ValueError, match=r"bad\.json:3: not valid JSON"):
        ModelConfig.load_json(bad)
    bad.write_text(json.dumps({"hidden_sise": 64}))
    with pytest.raises(
        ValueError, match=r"bad\.json.*unknown ModelConfig fields \['hidden_sise'\]"
    ):
        ModelConfig.load_json(bad)
    bad.write_text(json.dumps({"hidden_size": 65}))
    with pytest.raises(ValueError, match=r"bad\.json.*hidden_size=65 is not divisible"):
        ModelConfig.load_json(bad)
    for content in ("[1, 2]", "5", '"x"'):
        bad.write_text(content)
        with pytest.raises(ValueError, match=r"bad\.json.*JSON object"):
            ModelConfig.load_json(bad)
    with pytest.raises(FileNotFoundError):
        ModelConfig.load_json(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(dtype="float64"), "dtype"),
        (dict(param_dtype="int8"), "param_dtype"),
        (dict(attention_chunk_size=0), "attention_chunk_size"),
        (dict(hidden_size=30, num_attention_heads=4), "not divisible"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"hidden": 1})
