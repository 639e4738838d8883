"""MTEB (m3_jax.integrations.mteb, `m3-jax evaluate --mteb`) against `m3-jax evaluate`.

A local MTEB retrieval task is built from the demo's held-out BEIR files; MTEB's metrics of each
mode must equal `evaluate_embedder`'s to the 5 decimals MTEB reports, with the same top-10 per
query, for the search adapter (all five modes) and for the dense encoder under MTEB's own
search. Offline: the task and the model are local.
"""

from __future__ import annotations

import json

import datasets
import mteb
import pytest
from demo_runs import ROOT

from m3_jax.cli.common import tool_main
from m3_jax.cli.evaluate import add_arguments, run
from m3_jax.evaluation.datasets import load_dataset
from m3_jax.evaluation.evaluate import evaluate_embedder
from m3_jax.inference import M3Embedder
from m3_jax.integrations.mteb import (
    MTEBEncoder,
    evaluate_tasks,
    local_retrieval_task,
    search_models,
)
from m3_jax.scores import MODES

DATA = ROOT / "train/demo_data/heldout_beir"
NUM_QUERIES = 80
# MTEB's names of the measures `evaluate_embedder` reports (MRR is not rounded by MTEB).
MEASURES = {
    "ndcg@10": "ndcg_at_10",
    "ndcg@100": "ndcg_at_100",
    "recall@10": "recall_at_10",
    "recall@100": "recall_at_100",
    "mrr@10": "mrr_at_10",
}


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    datasets.disable_progress_bars()
    return M3Embedder.from_pretrained(tiny_model_dir, show_progress=False)


@pytest.fixture(scope="module")
def reference(embedder):
    return evaluate_embedder(embedder, load_dataset(DATA).subset(NUM_QUERIES), progress=False)


def top10(run: dict[str, dict[str, float]]) -> dict[str, list[str]]:
    """Each query's first 10 documents in trec_eval's order (score, then doc id, descending)."""
    return {
        q: [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]]
        for q, docs in run.items()
    }


def evaluate_with_predictions(model, task, folder):
    result = mteb.evaluate(
        model,
        tasks=[task],
        cache=None,
        show_progress_bar=False,
        encode_kwargs={"show_progress_bar": False},
        prediction_folder=str(folder),
    )
    (scores,) = result.task_results[0].scores["test"]
    (predictions,) = folder.glob("*_predictions.json")
    run = json.loads(predictions.read_text())["default"]["test"]
    predictions.unlink()
    return scores, run


def assert_same(scores: dict, run: dict, reference, mode: str, tie: float = 0.0) -> None:
    """MTEB's measures equal ours (MRR unrounded), and so do the top-10 rankings, where a
    swap of two documents whose scores (ours) differ by at most `tie` counts as equal."""
    for ours, theirs in MEASURES.items():
        want = reference.metrics[mode][ours]
        rounded = want if "mrr" in ours else round(want, 5)
        assert scores[theirs] == pytest.approx(rounded, abs=1e-9), ours
    ours, theirs = reference.runs[mode], top10(run)
    assert set(theirs) == set(ours)
    for qid, want in top10(ours).items():
        for a, b in zip(theirs[qid], want, strict=True):
            assert a == b or abs(ours[qid][a] - ours[qid][b]) <= tie, (qid, theirs[qid], want)


@pytest.mark.parametrize("mode", MODES)
def test_mteb_search_equals_m3_evaluate(embedder, reference, tmp_path, mode):
    task = local_retrieval_task(DATA, max_queries=NUM_QUERIES)
    (model,) = search_models(embedder, [mode], name="m3_jax/tiny")
    scores, run = evaluate_with_predictions(model, task, tmp_path)
    assert_same(scores, run, reference, mode)


def test_mteb_encoder_under_mtebs_dense_search(embedder, reference, tmp_path):
    task = local_retrieval_task(DATA, max_queries=NUM_QUERIES)
    encoder = MTEBEncoder(embedder, name="m3_jax/tiny")
    assert isinstance(encoder, mteb.EncoderProtocol)
    assert encoder.mteb_model_meta.embed_dim == embedder.config.hidden_size
    assert encoder.mteb_model_meta.n_parameters == embedder.num_parameters()
    scores, run = evaluate_with_predictions(encoder, task, tmp_path)
    # MTEB ranks by its own dot products of our vectors: near-ties may swap (float32 rounding).
    assert_same(scores, run, reference, "dense", tie=1e-6)


def test_evaluate_tasks_shares_one_corpus_encoding(embedder, reference, monkeypatch):
    from m3_jax.integrations import mteb as integration

    calls = []
    encode = integration.encode_texts

    def counting(embedder, texts, **kwargs):
        calls.append(kwargs["desc"])
        return encode(embedder, texts, **kwargs)

    monkeypatch.setattr(integration, "encode_texts", counting)
    task = local_retrieval_task(DATA, max_queries=NUM_QUERIES)
    results = evaluate_tasks(embedder, [task], ["dense", "all"], name="m3_jax/tiny")
    assert calls.count("corpus") == 1 and calls.count("queries") == 2
    by_mode = results[task.metadata.name]
    assert list(by_mode) == ["dense", "colbert+sparse+dense"]
    for mode, scores in by_mode.items():
        want = reference.metrics[mode]["ndcg@10"]
        assert scores["test/default"]["ndcg_at_10"] == pytest.approx(round(want, 5), abs=1e-9)


def run_evaluate(*argv) -> int:
    return tool_main("evaluate", add_arguments, run, [str(a) for a in argv])


def test_evaluate_command_with_mteb(tiny_model_dir, reference, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--data", DATA, "--mteb", "--max-queries", NUM_QUERIES]
    assert run_evaluate(*args, "--modes", "dense,sparse", "--out", out, "--quiet") == 0
    printed = capsys.readouterr().out
    assert "M3Localheldoutbeir" in printed and f"wrote {out / 'mteb_metrics.json'}" in printed
    results = json.loads((out / "mteb_metrics.json").read_text())["results"]
    for mode in ("dense", "sparse"):
        scores = results["M3Localheldoutbeir"][mode]["test/default"]
        assert scores["main_score"] == pytest.approx(round(reference.metrics[mode]["ndcg@10"], 5))
    assert list((out / "mteb").rglob("M3Localheldoutbeir.json"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mteb"], "--mteb without task names evaluates --data as a local task"),
        (["--mteb", "NoSuchTask"], "--mteb NoSuchTask: KeyError: 'NoSuchTask' not found"),
        (["--mteb", "SciFact", "--data", DATA], "MTEB loads the tasks' data"),
        (["--mteb", "--data", DATA, "--rerank", "x"], "--rerank: not available with --mteb"),
        ([], "--data: required"),
    ],
    ids=["no data", "unknown task", "task and data", "rerank", "nothing"],
)
def test_evaluate_command_mteb_errors(tmp_path, capsys, argv, message):
    code = run_evaluate("--model", tmp_path / "no-model", *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_evaluate_command_without_network(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A hub task's data that cannot be fetched is one error line with the offline way."""
    from m3_jax.cli import evaluate as command

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'mteb/scifact' on the Hub")

    monkeypatch.setattr(command, "evaluate_tasks", unreachable)
    code = run_evaluate(
        "--model", tiny_model_dir, "--mteb", "SciFact", "--out", tmp_path, "--quiet"
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert (
        err[0].startswith("error: --mteb SciFact: Couldn't reach") and "--data DIR --mteb" in err[0]
    )
