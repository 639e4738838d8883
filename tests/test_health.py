"""Head health against numpy: the sparse head's live share and weight, the mean pairwise cosine
of dense and colbert vectors, and the collapse warning; and the notebooks' fine-tuning keeping the
sparse head alive."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from demo_runs import ROOT

from configs import base
from m3_jax.cli.train import eval_fn_from_config
from m3_jax.config import RunConfig
from m3_jax.loading import load_params
from m3_jax.model import M3Output
from m3_jax.run_dir import save_model_dir
from m3_jax.tiny import SPARSE_HEAD_SCALE
from m3_jax.training.health import (
    COLBERT_COSINE,
    DENSE_COSINE,
    SPARSE_ACTIVE,
    SPARSE_WEIGHT,
    head_health,
    mean_pairwise_cosine,
    sparse_collapse_warning,
)
from m3_jax.training.loop import train

SPECIALS = (0, 1, 2)  # cls, pad, eos of the synthetic ids


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pairwise_reference(vectors: np.ndarray) -> float:
    pairs = [a @ b for a, b in itertools.permutations(vectors, 2)]
    return float(np.mean(pairs))


def test_mean_pairwise_cosine_is_the_mean_over_distinct_pairs():
    rng = np.random.default_rng(0)
    v = unit(rng.normal(size=(9, 5)).astype(np.float32))
    keep = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    got = float(mean_pairwise_cosine(jnp.asarray(v), jnp.asarray(keep)))
    assert got == pytest.approx(pairwise_reference(v[keep]), abs=1e-6)
    same = np.repeat(v[:1], 4, axis=0)  # a collapse: every vector the same
    assert float(mean_pairwise_cosine(jnp.asarray(same), jnp.ones(4, bool))) == pytest.approx(1.0)


def outputs(rng, batch: int, length: int, ids: np.ndarray, mask: np.ndarray, dead: bool):
    sparse = np.maximum(rng.normal(size=(batch, length)), 0.0).astype(np.float32)
    sparse *= mask * ~np.isin(ids, SPECIALS)
    if dead:
        sparse[:] = 0.0
    colbert_mask = mask[:, 1:].astype(bool)
    colbert = (
        unit(rng.normal(size=(batch, length - 1, 6))).astype(np.float32) * colbert_mask[..., None]
    )
    dense = unit(rng.normal(size=(batch, 6))).astype(np.float32)
    return M3Output(*map(jnp.asarray, (dense, sparse, colbert, colbert_mask))), sparse


def token_batch(rng, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(3, length + 1, size=batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(3, 50, size=(batch, length)), 1)
    ids[:, 0] = 0
    ids[np.arange(batch), lengths - 1] = 2
    return ids, mask


@pytest.mark.parametrize("dead", [False, True])
def test_head_health_matches_numpy(dead):
    rng = np.random.default_rng(1)
    q_ids, q_mask = token_batch(rng, 3, 7)
    p_ids, p_mask = token_batch(rng, 6, 11)
    q, q_sparse = outputs(rng, 3, 7, q_ids, q_mask, dead)
    p, p_sparse = outputs(rng, 6, 11, p_ids, p_mask, dead)
    got = head_health(q, p, *map(jnp.asarray, (q_ids, p_ids, q_mask, p_mask)), SPECIALS)

    content = np.concatenate(
        [(q_mask.astype(bool) & ~np.isin(q_ids, SPECIALS)).ravel(),
         (p_mask.astype(bool) & ~np.isin(p_ids, SPECIALS)).ravel()]
    )  # fmt: skip
    weights = np.concatenate([q_sparse.ravel(), p_sparse.ravel()])[content]
    live = weights[weights > 0]
    assert float(got[SPARSE_ACTIVE]) == pytest.approx(live.size / content.sum())
    assert float(got[SPARSE_WEIGHT]) == pytest.approx(live.mean() if live.size else 0.0, rel=1e-6)
    dense = np.concatenate([np.asarray(q.dense), np.asarray(p.dense)])
    assert float(got[DENSE_COSINE]) == pytest.approx(pairwise_reference(dense), abs=1e-6)
    tokens = np.concatenate([np.asarray(x.colbert)[np.asarray(x.colbert_mask)] for x in (q, p)])
    assert float(got[COLBERT_COSINE]) == pytest.approx(pairwise_reference(tokens), abs=1e-6)
    assert (float(got[SPARSE_ACTIVE]) == 0.0) == dead


def test_collapse_warning_names_the_threshold_the_cause_and_the_settings():
    assert sparse_collapse_warning({SPARSE_ACTIVE: 0.4}, 0.05) is None
    assert sparse_collapse_warning({"loss/loss": 1.0}, 0.05) is None  # no health measured
    warning = sparse_collapse_warning({SPARSE_ACTIVE: 0.0}, 0.05)
    assert "0.00% of content tokens" in warning and "train.sparse_health_threshold=0.05" in warning
    for setting in ("loss.temperature", "model.fresh_heads", "optim.lr", "loss/sparse"):
        assert setting in warning


def notebook_config(workdir: Path, model_dir: Path, data: dict[str, Path], cache: Path):
    """The fine-tuning cell of notebooks/colab_tpu_quickstart.ipynb in its tiny CPU setting."""
    c = base.get_config()
    c.workdir = str(workdir)
    c.model.init_from = str(model_dir)
    c.data.train_files = str(data["train"])
    c.data.group_size = 4
    c.data.query_max_len, c.data.passage_max_len = 32, 128
    c.data.token_budget = 4096
    c.data.cache_dir = str(workdir.parent / "data_cache")
    c.optim.lr = 1e-3
    c.train.dropout = False
    c.train.num_steps, c.train.save_every, c.train.log_every = 24, 24, 4
    c.train.progress = False
    c.train.peak_flops_per_s = 1e11
    c.train.compilation_cache_dir = str(cache)
    c.eval.heldout_file, c.eval.corpus_file = str(data["heldout"]), str(data["corpus"])
    return c


@pytest.fixture(scope="module")
def notebook_data(tmp_path_factory) -> dict[str, Path]:
    """The notebook's tiny data: 400 training records; 32 held-out queries against 200 documents
    (theirs included)."""
    out = tmp_path_factory.mktemp("notebook_data")
    demo = ROOT / "train" / "demo_data"

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (demo / name).read_text().splitlines()]

    def write(name: str, items: list[dict]) -> Path:
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
        return out / name

    heldout = rows("heldout.jsonl")[:32]
    relevant = {doc for row in heldout for doc in row["qrels"]}
    corpus = [
        d for i, d in enumerate(rows("heldout_corpus.jsonl")) if i < 200 or d["id"] in relevant
    ]
    return {
        "train": write("train.jsonl", rows("train.jsonl")[:400]),
        "heldout": write("heldout.jsonl", heldout),
        "corpus": write("corpus.jsonl", corpus),
    }


@pytest.mark.slow
@pytest.mark.parametrize("head_scale", [1.0, 1 / SPARSE_HEAD_SCALE])
def test_notebook_fine_tuning_keeps_the_sparse_head_alive_at_a_trained_heads_scale(
    tmp_path, caplog, tiny_model_dir, notebook_data, xla_cache, head_scale
):
    """The notebook's fine-tuning from the tiny model: with its sparse head at a trained head's
    scale the head stays alive and its held-out nDCG@10 does not fall; the same head scaled back
    to the encoder's fan-in scale (the tiny model before the fix) dies within the run, and the
    run warns once."""
    loaded = load_params(tiny_model_dir)
    params = jax.tree.map(np.asarray, loaded.params)
    params["sparse_linear"] = jax.tree.map(lambda x: x * head_scale, params["sparse_linear"])
    model_dir = save_model_dir(tmp_path / "model", loaded.config, params, loaded.tokenizer_dir)
    run = RunConfig.from_config_dict(
        notebook_config(tmp_path / "run", model_dir, notebook_data, xla_cache)
    )
    with caplog.at_level(logging.INFO, logger="m3_jax"):
        summary = train(run, eval_fn_from_config(run.eval))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    shares = [r[SPARSE_ACTIVE] for r in rows if SPARSE_ACTIVE in r]
    sparse_before = summary["eval_before"]["sparse/ndcg@10"]
    sparse_after = summary["eval_after"]["sparse/ndcg@10"]
    threshold = run.train.sparse_health_threshold
    warnings = caplog.text.count("the sparse head is collapsing")
    if head_scale == 1.0:
        assert len(shares) == 6 and min(shares) > threshold, shares
        assert sparse_after >= sparse_before, (sparse_before, sparse_after)
        assert warnings == 0
    else:
        assert shares[-1] < threshold, shares
        assert sparse_after < sparse_before, (sparse_before, sparse_after)
        assert warnings == 1
