"""Retrieval evaluation end to end (m3_jax.evaluation: encoding, retrieval, modes, evaluate, trec,
heldout; tools/evaluate.py) on a tiny random model and a small BEIR dataset built from the demo's
held-out data.

Independent references: every retrieved score is checked against `M3Embedder.compute_score` on the
(query, document) pair; top-k lists against brute-force sorting in numpy; the metrics of the
written TREC run files against pytrec_eval.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from m3_jax.evaluation.datasets import load_beir, load_heldout, write_beir
from m3_jax.evaluation.encoding import encode_texts
from m3_jax.evaluation.evaluate import evaluate_embedder, evaluate_retrieval
from m3_jax.evaluation.heldout import evaluate_heldout
from m3_jax.evaluation.modes import RetrievalSettings, run_modes
from m3_jax.evaluation.retrieval import dense_search, sparse_search
from m3_jax.evaluation.trec import read_run
from m3_jax.inference import M3Embedder
from m3_jax.loading import load_params
from m3_jax.scores import MODES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "train" / "demo_data"
NUM_QUERIES = 8
NUM_DISTRACTORS = 40
SETTINGS = RetrievalSettings(top_k=15, rerank_depth=6, all_weights=(0.4, 0.2, 0.4))
TOL = 1e-5


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """BEIR files: the first held-out queries, their relevant documents and some distractors."""
    full = load_heldout(DEMO / "heldout.jsonl", DEMO / "heldout_corpus.jsonl").subset(NUM_QUERIES)
    keep = {d for rels in full.qrels.values() for d in rels} | set(full.doc_ids[:NUM_DISTRACTORS])
    docs = [(i, t) for i, t in zip(full.doc_ids, full.doc_texts, strict=True) if i in keep]
    small = type(full)(
        "demo",
        [i for i, _ in docs],
        [t for _, t in docs],
        full.query_ids,
        full.query_texts,
        full.qrels,
    )
    return write_beir(small, tmp_path_factory.mktemp("beir") / "demo")


class Recording:
    """Records the options of every encode call; everything else goes to the real embedder."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts, **kwargs):
        self.calls.append(kwargs)
        return self.inner.encode(texts, **kwargs)


@pytest.fixture(scope="module")
def dataset(dataset_dir):
    return load_beir(dataset_dir)


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return M3Embedder.from_pretrained(tiny_model_dir, batch_size=16, show_progress=False)


@pytest.fixture(scope="module")
def encoded(embedder, dataset):
    queries = encode_texts(embedder, dataset.query_texts, max_length=64, progress=False)
    corpus = encode_texts(
        embedder, dataset.doc_texts, max_length=512, shard_size=16, progress=False
    )
    return queries, corpus


@pytest.fixture(scope="module")
def pair_scores(embedder, dataset) -> dict[str, np.ndarray]:
    """[Q, N] dense, sparse and colbert scores from compute_score on every pair."""
    pairs = [(q, d) for q in dataset.query_texts for d in dataset.doc_texts]
    out = embedder.compute_score(pairs, max_query_length=64, max_passage_length=512)
    shape = (len(dataset.query_texts), len(dataset.doc_texts))
    return {m: np.asarray(out[m]).reshape(shape) for m in ("dense", "sparse", "colbert")}


def combined(pair_scores, weights, modes=("dense", "sparse", "colbert")) -> np.ndarray:
    total = sum(w * pair_scores[m] for w, m in zip(weights, modes, strict=False))
    return total / sum(weights)


def assert_valid_top_k(run_scores: dict[str, float], expected_row: np.ndarray, doc_ids, k: int):
    """Right size, right scores, and nothing left out scores higher (ties may go either way)."""
    assert len(run_scores) == min(k, len(doc_ids))
    index = {d: i for i, d in enumerate(doc_ids)}
    for doc, score in run_scores.items():
        assert abs(score - expected_row[index[doc]]) <= TOL, doc
    left_out = [expected_row[index[d]] for d in doc_ids if d not in run_scores]
    if left_out:
        assert min(run_scores.values()) >= max(left_out) - TOL


# Retrieval primitives --------------------------------------------------------------------------


def test_dense_search_sharded_matches_numpy(encoded):
    queries, corpus = encoded
    docs = corpus.dense[: len(corpus.dense) // 8 * 8 - 3]  # the last shard needs padding rows
    n = len(docs)
    sims = queries.dense @ docs.T
    meshes = [None, Mesh(np.array(jax.devices()[:1]), ("corpus",))]
    if jax.device_count() >= 8:  # conftest asks for 8 CPU devices
        meshes.append(Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp")))
    for mesh in meshes:
        scores, indices = dense_search(queries.dense, docs, 10, mesh=mesh, query_batch=3)
        assert indices.shape == (len(queries.dense), 10)
        np.testing.assert_allclose(scores, np.take_along_axis(sims, indices, 1), atol=TOL)
        np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :10], atol=TOL)
    _, everything = dense_search(queries.dense, docs, 10_000)
    assert everything.shape[1] == n and all(sorted(row) == list(range(n)) for row in everything)


def test_sparse_search_matches_brute_force(encoded):
    queries, corpus = encoded
    sims = queries.sparse.toarray() @ corpus.sparse.toarray().T
    scores, indices = sparse_search(queries.sparse, corpus.sparse, 7, max_scores_per_block=50)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, indices, 1), atol=TOL)
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :7], atol=TOL)


def test_encoding_matches_embedder_and_resumes_from_shards(embedder, dataset, encoded, tmp_path):
    _, corpus = encoded
    direct = embedder.encode(
        dataset.doc_texts, max_length=512, return_sparse=True, return_colbert_vecs=True
    )
    np.testing.assert_allclose(corpus.dense, direct["dense_vecs"], atol=1e-6)
    for i in (0, 5, len(dataset.doc_texts) - 1):
        np.testing.assert_allclose(corpus.colbert(i), direct["colbert_vecs"][i], atol=1e-6)
        row = corpus.sparse[i]
        assert {str(t): w for t, w in zip(row.indices, row.data, strict=True)} == pytest.approx(
            {k: float(v) for k, v in direct["lexical_weights"][i].items()}
        )

    cache = tmp_path / "cache"
    kwargs = dict(max_length=512, shard_size=16, cache_dir=cache, model_fingerprint="tiny")
    first = Recording(embedder)
    encode_texts(first, dataset.doc_texts, progress=False, **kwargs)
    shards = sorted(cache.glob("shard-*.npz"))
    assert len(first.calls) == len(shards) >= 3
    shards[1].unlink()  # as if the run had stopped before this shard
    second = Recording(embedder)
    resumed = encode_texts(second, dataset.doc_texts, progress=False, **kwargs)
    assert len(second.calls) == 1
    np.testing.assert_array_equal(resumed.dense, corpus.dense)
    np.testing.assert_array_equal(resumed.colbert_vecs, corpus.colbert_vecs)
    assert (resumed.sparse != corpus.sparse).nnz == 0
    with pytest.raises(ValueError, match="manifest.json: this cache was written for other"):
        encode_texts(embedder, dataset.doc_texts, **{**kwargs, "max_length": 256})


# The five modes --------------------------------------------------------------------------------


def test_modes_match_compute_score(encoded, dataset, pair_scores):
    queries, corpus = encoded
    runs = run_modes(queries, corpus, dataset.query_ids, dataset.doc_ids, MODES, SETTINGS)
    ids = dataset.doc_ids
    index = {d: i for i, d in enumerate(ids)}
    dense_sparse = combined(pair_scores, SETTINGS.dense_sparse_weights)
    everything = combined(pair_scores, SETTINGS.all_weights)
    for q, qid in enumerate(dataset.query_ids):
        assert_valid_top_k(runs["dense"][qid], pair_scores["dense"][q], ids, SETTINGS.top_k)
        assert_valid_top_k(runs["sparse"][qid], pair_scores["sparse"][q], ids, SETTINGS.top_k)
        # colbert and colbert+sparse+dense rerank the dense top rerank_depth; sparse+dense the
        # union of the lists.
        shallow = sorted(runs["dense"][qid], key=runs["dense"][qid].get, reverse=True)
        shallow = set(shallow[: SETTINGS.rerank_depth])
        union = set(runs["dense"][qid]) | set(runs["sparse"][qid])
        for mode, candidates, expected in (
            ("colbert", shallow, pair_scores["colbert"][q]),
            ("colbert+sparse+dense", shallow, everything[q]),
            ("sparse+dense", union, dense_sparse[q]),
        ):
            assert set(runs[mode][qid]) == candidates, mode
            for doc, score in runs[mode][qid].items():
                assert abs(score - expected[index[doc]]) <= TOL, (mode, qid, doc)


def test_evaluate_retrieval_runs_agree_with_pytrec_eval(tiny_model_dir, dataset_dir, tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    loaded = load_params(tiny_model_dir)
    config, params = loaded.config, loaded.params
    metrics = evaluate_retrieval(
        config,
        params,
        tiny_model_dir,
        dataset_dir,
        k=(5, 10),
        settings=SETTINGS,
        run_dir=tmp_path / "runs",
    )
    qrels = load_beir(dataset_dir).qrels
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5,10", "recall.5,10"})
    for mode in MODES:
        per_query = evaluator.evaluate(read_run(tmp_path / "runs" / f"{mode}.trec"))
        assert per_query.keys() == qrels.keys()
        for k in (5, 10):
            for ours, theirs in (("ndcg", "ndcg_cut"), ("recall", "recall")):
                expected = np.mean([v[f"{theirs}_{k}"] for v in per_query.values()])
                assert abs(metrics[f"{mode}/{ours}@{k}"] - expected) <= 1e-6, (mode, ours, k)
    assert set(metrics) == {
        f"{m}/{x}@{k}" for m in MODES for x in ("ndcg", "recall", "mrr") for k in (5, 10)
    }


def test_repeated_evaluation_swaps_weights_without_recompiling(tiny_model_dir, dataset):
    from m3_jax.evaluation import evaluate as evaluate_module

    loaded = load_params(tiny_model_dir)

    config, params = loaded.config, loaded.params
    small = dataset.subset(3)
    kwargs = dict(modes=("dense", "sparse"), k=10, settings=SETTINGS)
    evaluate_retrieval(config, params, tiny_model_dir, small, **kwargs)
    (embedder,) = evaluate_module._EMBEDDER_CACHE.values()
    programs = embedder.compiled_program_count()
    moved = jax.tree.map(lambda x: np.asarray(x) * 0.9, params)  # other weights, same model
    again = evaluate_retrieval(config, moved, tiny_model_dir, small, **kwargs)
    assert evaluate_module._EMBEDDER_CACHE[next(iter(evaluate_module._EMBEDDER_CACHE))] is embedder
    assert embedder.compiled_program_count() == programs
    fresh = M3Embedder.from_pretrained(tiny_model_dir, batch_size=64, show_progress=False)
    fresh.load_params(moved)
    expected = evaluate_embedder(
        fresh, small, modes=("dense", "sparse"), ks=[10], settings=SETTINGS, progress=False
    ).flat()
    assert again == pytest.approx(expected, abs=1e-9)


def test_only_the_outputs_a_mode_needs(embedder, dataset):
    for modes, outputs in (
        (["sparse"], {"sparse"}),
        (["dense", "sparse+dense"], {"dense", "sparse"}),
        (["colbert"], {"dense", "colbert"}),  # the dense search picks what ColBERT reranks
    ):
        spy = Recording(embedder)
        result = evaluate_embedder(spy, dataset, modes=modes, ks=[10], progress=False)
        assert list(result.metrics) == modes
        asked = {
            name
            for call in spy.calls
            for name, option in (
                ("dense", "return_dense"),
                ("sparse", "return_sparse"),
                ("colbert", "return_colbert_vecs"),
            )
            if call.get(option)
        }
        assert spy.calls and asked == outputs, (modes, spy.calls)
    with pytest.raises(ValueError, match="expected a non-empty subset"):
        evaluate_embedder(embedder, dataset, modes=["bm25"], progress=False)


def test_heldout_scores_every_document(tiny_model_dir, dataset_dir, tmp_path):
    small = load_beir(dataset_dir).subset(3)
    heldout, corpus = tmp_path / "heldout.jsonl", tmp_path / "corpus.jsonl"
    with heldout.open("w") as f:
        for qid, text in zip(small.query_ids, small.query_texts, strict=True):
            f.write(json.dumps({"query_id": qid, "query": text, "qrels": small.qrels[qid]}) + "\n")
    with corpus.open("w") as f:
        for doc_id, text in zip(small.doc_ids, small.doc_texts, strict=True):
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    loaded = load_params(tiny_model_dir)
    config, params = loaded.config, loaded.params
    out = evaluate_heldout(config, params, tiny_model_dir, heldout, corpus, k=10)
    modes = ("dense", "sparse", "colbert", "colbert+sparse+dense")
    assert sorted(out) == sorted(f"{m}/ndcg@10" for m in modes)
    assert all(0 <= v <= 1 for v in out.values())


# tools/evaluate.py -----------------------------------------------------------------------------


def test_evaluate_cli_prints_the_table(tiny_model_dir, dataset_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "tools" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "out"
    args = [
        f"--model={tiny_model_dir}",
        f"--data={dataset_dir}",
        "--modes=dense,sparse,colbert,dense+sparse,all",  # the paper's names are aliases
        "--k=10",
        f"--out={out}",
        f"--cache={tmp_path / 'cache'}",
        "--quiet",
    ]
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out
    print(stdout)
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", *MODES]
    assert any(line.startswith("ndcg@10") for line in lines)
    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary["metrics"]) == list(MODES) and summary["num_queries"] == NUM_QUERIES
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{m}.trec" for m in MODES)
    assert cli.main([f"--model={tiny_model_dir}", f"--data={tmp_path}"]) == 1
    assert "neither BEIR" in capsys.readouterr().err


def test_rerank_rescores_the_top_k_of_a_mode(
    tiny_model_dir, dataset_dir, dataset, tmp_path, capsys
):
    from m3_jax.cli.main import main
    from m3_jax.evaluation.modes import rerank_run
    from m3_jax.reranker import Reranker
    from m3_jax.tiny import build_tiny_reranker_dir

    reranker_dir = build_tiny_reranker_dir(tmp_path / "reranker")
    reranker = Reranker.from_pretrained(reranker_dir, show_progress=False)
    run = {
        "q0": {"a": 0.9, "b": 0.5, "c": 0.7},
        "q1": {"c": 0.1},
        "q2": {},
    }
    queries = {"q0": "абв гд", "q1": "one two", "q2": "unused"}
    docs = {"a": "абв ζηθ", "b": "three", "c": "gh абв"}
    reranked = rerank_run(run, reranker, queries, docs, depth=2)
    assert set(reranked) == {"q0", "q1", "q2"} and reranked["q2"] == {}
    assert set(reranked["q0"]) == {"a", "c"}  # the top 2 by the first stage
    for qid, scored in reranked.items():
        for doc, score in scored.items():
            assert score == pytest.approx(
                reranker.compute_score((queries[qid], docs[doc])), abs=TOL
            )

    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(tiny_model_dir), "--data", str(dataset_dir), "--quiet"]
    args += ["--modes", "dense,sparse", "--k", "10", "--out", str(out)]
    assert main([*args, "--rerank", str(reranker_dir), "--rerank-top-k", "5"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary["metrics"]) == ["dense", "sparse", "dense+rerank"]
    assert "dense+rerank" in capsys.readouterr().out
    trec = (out / "runs" / "dense+rerank.trec").read_text().splitlines()
    assert len(trec) == 5 * len(dataset.query_ids)
    assert main([*args, "--rerank", str(reranker_dir), "--rerank-mode", "colbert"]) == 1
    assert "--rerank-mode colbert: not among --modes" in capsys.readouterr().err
