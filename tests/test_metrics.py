"""nDCG@k, Recall@k, MRR@k (m3_jax.evaluation.metrics) against pytrec_eval (trec_eval's C code)
on the same random runs: graded relevance, tied scores, unjudged and zero-relevance documents,
queries without relevant documents, and cutoffs below and above the run depth. Tolerance 1e-6."""

from __future__ import annotations

import random

import pytest

from m3_jax.evaluation.metrics import (
    mean_metrics,
    mrr_at_k,
    ndcg_at_k,
    per_query_metrics,
    ranked,
    recall_at_k,
)

pytrec_eval = pytest.importorskip("pytrec_eval")

KS = (1, 3, 5, 10, 100)
TOL = 1e-6


def random_case(seed: int, num_queries: int = 40, num_docs: int = 60):
    rng = random.Random(seed)
    docs = [f"d{i:03d}" for i in range(num_docs)]
    qrels, run = {}, {}
    for q in range(num_queries):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 12))
        if q % 7 == 0:  # judged, but nothing relevant
            qrels[qid] = {d: 0 for d in judged}
        else:
            qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        retrieved = rng.sample(docs, rng.randint(1, 40))
        # Scores on a coarse grid, so ties are common and the doc-id tie-break matters.
        run[qid] = {d: rng.randint(0, 8) / 4 for d in retrieved}
    return run, qrels


def pytrec_per_query(run, qrels):
    measures = {f"ndcg_cut.{','.join(map(str, KS))}", f"recall.{','.join(map(str, KS))}"}
    measures.add("recip_rank")
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_metrics_match_pytrec_eval(seed):
    run, qrels = random_case(seed)
    ours = per_query_metrics(run, qrels, KS)
    theirs = pytrec_per_query(run, qrels)
    assert theirs.keys() == ours.keys()
    worst = 0.0
    for qid, values in theirs.items():
        for k in KS:
            for ours_name, their_value in (
                (f"ndcg@{k}", values[f"ndcg_cut_{k}"]),
                (f"recall@{k}", values[f"recall_{k}"]),
                # MRR@k: trec_eval's reciprocal rank if the first relevant document is in the
                # top k, else 0 (computed from the full-depth recip_rank, not from our ranking).
                (f"mrr@{k}", values["recip_rank"] if values["recip_rank"] >= 1 / k else 0.0),
            ):
                diff = abs(ours[qid][ours_name] - their_value)
                worst = max(worst, diff)
                assert diff <= TOL, (qid, ours_name, ours[qid][ours_name], their_value)
    print(f"seed {seed}: max |ours - pytrec_eval| per query = {worst:.2g}")


def test_means_match_pytrec_eval_and_single_metric_helpers():
    run, qrels = random_case(5)
    theirs = pytrec_per_query(run, qrels)
    ours = mean_metrics(run, qrels, KS)
    for k in KS:
        expected = sum(v[f"ndcg_cut_{k}"] for v in theirs.values()) / len(theirs)
        assert abs(ours[f"ndcg@{k}"] - expected) <= TOL
        assert abs(ndcg_at_k(run, qrels, k) - expected) <= TOL
        expected = sum(v[f"recall_{k}"] for v in theirs.values()) / len(theirs)
        assert abs(recall_at_k(run, qrels, k) - expected) <= TOL
    expected = sum(v["recip_rank"] for v in theirs.values()) / len(theirs)
    assert abs(mrr_at_k(run, qrels, 1000) - expected) <= TOL


def test_tie_break_is_doc_id_descending():
    assert ranked({"a": 1.0, "c": 1.0, "b": 2.0}, 3) == ["b", "c", "a"]
    qrels = {"q": {"a": 1}}
    assert mrr_at_k({"q": {"a": 1.0, "c": 1.0}}, qrels, 10) == 0.5


def test_judged_query_missing_from_the_run_scores_zero():
    """trec_eval -c: the mean is over the qrels' queries (pytrec_eval would drop the query)."""
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0}}
    assert ndcg_at_k(run, qrels, 10) == pytest.approx(0.5)
    assert recall_at_k(run, qrels, 10) == pytest.approx(0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="measures"):
        per_query_metrics({}, {"q": {"a": 1}}, [10], ["map"])
    with pytest.raises(ValueError, match="k >= 1"):
        per_query_metrics({}, {"q": {"a": 1}}, [0])
    with pytest.raises(ValueError, match="no queries"):
        mean_metrics({}, {}, [10])
