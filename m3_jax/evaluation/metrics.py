"""nDCG@k, Recall@k and MRR@k with trec_eval's definitions (as pytrec_eval computes them).

run: {query_id: {doc_id: score}}, qrels: {query_id: {doc_id: relevance}}.
- Documents are ranked by score, ties broken by doc id in descending order (trec_eval's order).
- A document is relevant when its relevance is > 0; the gain in nDCG is the relevance itself
  (trec_eval's `ndcg_cut`, not 2^rel - 1); the ideal ranking holds all relevant judged documents.
- MRR@k is the reciprocal rank of the first relevant document within the top k (trec_eval's
  `recip_rank` over the run cut at k), 0 when there is none.
- The mean is over the queries of the qrels: a judged query that has no relevant document scores
  0 (as in trec_eval and pytrec_eval), and a judged query missing from the run scores 0 (trec_eval
  `-c`; pytrec_eval would leave it out of its per-query results).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]
MEASURES = ("ndcg", "recall", "mrr")


def ranked(scores: Mapping[str, float], k: int) -> list[str]:
    """The top k doc ids in trec_eval's order (score descending, then doc id descending)."""
    return [d for d, _ in sorted(scores.items(), key=lambda x: (x[1], x[0]), reverse=True)][:k]


def ndcg(top: list[str], rels: Mapping[str, int], k: int) -> float:
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    if not ideal:
        return 0.0
    dcg = sum(
        rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top[:k]) if rels.get(d, 0) > 0
    )
    return dcg / sum(r / math.log2(i + 2) for i, r in enumerate(ideal))


def recall(top: list[str], rels: Mapping[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant & set(top[:k])) / len(relevant) if relevant else 0.0


def mrr(top: list[str], rels: Mapping[str, int], k: int) -> float:
    return next((1 / (i + 1) for i, d in enumerate(top[:k]) if rels.get(d, 0) > 0), 0.0)


PER_QUERY: dict[str, Callable[[list[str], Mapping[str, int], int], float]] = {
    "ndcg": ndcg,
    "recall": recall,
    "mrr": mrr,
}


def per_query_metrics(
    run: Run, qrels: Qrels, ks: Iterable[int], measures: Iterable[str] = MEASURES
) -> dict[str, dict[str, float]]:
    """{query_id: {'ndcg@10': ..., ...}} for every query of the qrels."""
    ks, measures = sorted(set(ks)), list(measures)
    unknown = sorted(set(measures) - set(PER_QUERY))
    if unknown or not ks or min(ks) < 1:
        raise ValueError(f"measures {measures} (known {MEASURES}) at k {ks} (k >= 1)")
    out = {}
    for qid, rels in qrels.items():
        top = ranked(run.get(qid, {}), max(ks))
        out[qid] = {f"{m}@{k}": PER_QUERY[m](top, rels, k) for m in measures for k in ks}
    return out


def mean_metrics(
    run: Run, qrels: Qrels, ks: Iterable[int], measures: Iterable[str] = MEASURES
) -> dict[str, float]:
    """{'ndcg@10': mean over the qrels' queries, ...}."""
    per_query = per_query_metrics(run, qrels, ks, measures)
    if not per_query:
        raise ValueError("qrels hold no queries")
    names = next(iter(per_query.values())).keys()
    return {name: sum(q[name] for q in per_query.values()) / len(per_query) for name in names}


def ndcg_at_k(run: Run, qrels: Qrels, k: int) -> float:
    return mean_metrics(run, qrels, [k], ["ndcg"])[f"ndcg@{k}"]


def recall_at_k(run: Run, qrels: Qrels, k: int) -> float:
    return mean_metrics(run, qrels, [k], ["recall"])[f"recall@{k}"]


def mrr_at_k(run: Run, qrels: Qrels, k: int) -> float:
    return mean_metrics(run, qrels, [k], ["mrr"])[f"mrr@{k}"]
