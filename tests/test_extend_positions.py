"""`m3-jax convert extend-positions` and the import of XLM-R's masked-LM head
(m3_jax.convert.positions, m3_jax.convert.from_torch).

The source is an `XLMRobertaForMaskedLM` directory written with PyTorch only
(tests/torch_reference.py), the layout of FacebookAI/xlm-roberta-large, at a small geometry with
258 positions (256 tokens).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_reference import build_torch_m3_dir, make_texts  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from m3_jax.convert.positions import tiled_position_table  # noqa: E402
from m3_jax.inference import M3Embedder  # noqa: E402
from m3_jax.loading import load_params  # noqa: E402
from m3_jax.model import M3Model, RetroMAEModel, model_from_params  # noqa: E402
from m3_jax.run_dir import MLM_HEAD_DIR  # noqa: E402

GEOMETRY = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=80,
    max_position_embeddings=258,
)
SOURCE_MAX_LENGTH = 256
EXTENDED = 1000

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("extend")
    return build_torch_m3_dir(root / "xlmr", tokenizer_dir, seed=3, masked_lm=True, **GEOMETRY)


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "m3_jax.cli", "convert", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def no_heads_dir(mlm_dir, tmp_path_factory):
    """The source without BGE-M3's head files, like FacebookAI/xlm-roberta-large."""
    src = tmp_path_factory.mktemp("no_heads") / "xlmr"
    src.mkdir()
    for path in mlm_dir.iterdir():
        if not path.name.endswith("_linear.pt"):
            (src / path.name).write_bytes(path.read_bytes())
    return src


@pytest.fixture(scope="module")
def extended_dir(no_heads_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "xlmr-1000"
    result = run_convert(
        "extend-positions", str(no_heads_dir), str(out), "--max-length", str(EXTENDED)
    )
    assert result.returncode == 0, result.stderr
    return out


def test_mlm_head_matches_transformers_logits(mlm_dir):
    """The imported MLM head on XLMRobertaForMaskedLM's last hidden states gives its logits (the
    encoder's own parity is tests/test_parity.py's)."""
    from transformers import XLMRobertaForMaskedLM

    loaded = load_params(mlm_dir, fresh_heads=True)
    assert loaded.mlm_head is not None
    tokenizer = AutoTokenizer.from_pretrained(str(mlm_dir))
    texts = make_texts(tokenizer, seed=5)[:4]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    reference = XLMRobertaForMaskedLM.from_pretrained(str(mlm_dir)).eval()
    with torch.no_grad():
        out = reference(**batch, output_hidden_states=True)
    params = {k: v for k, v in loaded.params.items() if k == "encoder"}
    params["lm_head"] = loaded.mlm_head
    params["decoder"] = jax.tree.map(np.zeros_like, params["encoder"]["layers"][0])  # unused
    model = model_from_params(loaded.config, params, RetroMAEModel)
    logits = np.asarray(model.mlm_logits(jnp.asarray(out.hidden_states[-1].numpy())))
    real = batch["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(logits[real], out.logits.numpy()[real], atol=1e-5, rtol=1e-5)


def test_extended_directory(extended_dir, no_heads_dir):
    source = load_params(no_heads_dir, fresh_heads=True)
    extended = load_params(extended_dir)
    assert extended.config.max_position_embeddings == EXTENDED + 2
    assert extended.config.max_length == EXTENDED
    assert extended.config == source.config.replace(max_position_embeddings=EXTENDED + 2)
    assert (extended_dir / MLM_HEAD_DIR).is_dir()
    config = json.loads((extended_dir / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == EXTENDED

    old = source.params["encoder"]["embeddings"]["position_embeddings"]["embedding"]
    new = extended.params["encoder"]["embeddings"]["position_embeddings"]["embedding"]
    assert new.shape == (EXTENDED + 2, GEOMETRY["hidden_size"])
    np.testing.assert_array_equal(new[:2], old[:2])
    for row in (2, 257, 258, 259, 513, 514, EXTENDED + 1):
        np.testing.assert_array_equal(new[row], old[2 + (row - 2) % 256], err_msg=str(row))

    def others(params):
        flat = jax.tree_util.tree_leaves_with_path(params)
        return {
            jax.tree_util.keystr(p): np.asarray(x)
            for p, x in flat
            if "position_embeddings" not in jax.tree_util.keystr(p)
        }

    before, after = others(source.params), others(extended.params)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    head_before, head_after = others(source.mlm_head), others(extended.mlm_head)
    assert head_before.keys() == head_after.keys() and head_before
    for key in head_before:
        np.testing.assert_array_equal(head_after[key], head_before[key], err_msg=key)


def test_short_inputs_encode_as_the_source(extended_dir, no_heads_dir):
    """Every text of up to 256 tokens (the source's limit): the same three outputs."""
    kw = dict(bucket_lengths=(64, SOURCE_MAX_LENGTH), show_progress=False)
    texts = make_texts(AutoTokenizer.from_pretrained(str(no_heads_dir)), seed=11)
    source = M3Embedder.from_pretrained(no_heads_dir, fresh_heads=True, **kw)
    extended = M3Embedder.from_pretrained(extended_dir, **kw)
    options = dict(max_length=SOURCE_MAX_LENGTH, return_sparse=True, return_colbert_vecs=True)
    a, b = source.encode(texts, **options), extended.encode(texts, **options)
    np.testing.assert_allclose(b["dense_vecs"], a["dense_vecs"], atol=1e-6)
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True):
        np.testing.assert_allclose(y, x, atol=1e-6)
    for x, y in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([y[k] for k in x], [x[k] for k in x], atol=1e-6)


def test_accepts_8192_tokens(mlm_dir, tmp_path):
    result = run_convert(
        "extend-positions", str(mlm_dir), str(tmp_path / "x"), "--max-length", "8192"
    )
    assert result.returncode == 0, result.stderr
    loaded = load_params(tmp_path / "x", attention_impl="chunked")
    assert loaded.config.max_length == 8192 and loaded.config.max_position_embeddings == 8194
    model = model_from_params(loaded.config, loaded.params, M3Model)
    ids = np.random.default_rng(0).integers(5, loaded.config.vocab_size, (1, 8192))
    ids[0, 0], ids[0, -1] = 0, 2
    out = jax.jit(lambda i: model(i, jnp.ones_like(i)).dense)(jnp.asarray(ids))
    assert out.shape == (1, GEOMETRY["hidden_size"]) and np.isfinite(np.asarray(out)).all()


def test_tiled_table_rows():
    table = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)  # rows 0-1 special, 4 learned
    tiled = tiled_position_table(table, 11, 2)
    np.testing.assert_array_equal(tiled[:, 0], [0, 2, 4, 6, 8, 10, 4, 6, 8, 10, 4])


@pytest.mark.parametrize(
    "case, expected",
    [
        ("shorter", "max length 100 is below the model's 256"),
        ("non_empty_out", "exists and is not empty"),
    ],
)
def test_errors(mlm_dir, tmp_path, case, expected):
    out = tmp_path / "out"
    length = "100" if case == "shorter" else "512"
    if case == "non_empty_out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    result = run_convert("extend-positions", str(mlm_dir), str(out), "--max-length", length)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert case == "non_empty_out" or not out.exists()
