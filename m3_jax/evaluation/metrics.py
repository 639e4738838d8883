"""nDCG@k, Recall@k and MRR@k with trec_eval's definitions.

run: {query_id: {doc_id: score}}, qrels: {query_id: {doc_id: relevance}}. Documents are ranked by
score, ties broken by doc id in descending order (as trec_eval does); the gain of a document is
its relevance (trec_eval's default, not 2^rel - 1); queries without relevant documents are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def ranked(scores: Mapping[str, float], k: int) -> list[str]:
    return [d for d, _ in sorted(scores.items(), key=lambda x: (x[1], x[0]), reverse=True)][:k]


def ndcg_at_k(run: Run, qrels: Qrels, k: int) -> float:
    values = []
    for qid, rels in qrels.items():
        ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
        if not ideal:
            continue
        top = ranked(run.get(qid, {}), k)
        dcg = sum(
            rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top) if rels.get(d, 0) > 0
        )
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
        values.append(dcg / idcg)
    return sum(values) / len(values) if values else 0.0


def recall_at_k(run: Run, qrels: Qrels, k: int) -> float:
    values = []
    for qid, rels in qrels.items():
        relevant = {d for d, r in rels.items() if r > 0}
        if relevant:
            values.append(len(relevant & set(ranked(run.get(qid, {}), k))) / len(relevant))
    return sum(values) / len(values) if values else 0.0


def mrr_at_k(run: Run, qrels: Qrels, k: int) -> float:
    values = []
    for qid, rels in qrels.items():
        if not any(r > 0 for r in rels.values()):
            continue
        top = ranked(run.get(qid, {}), k)
        values.append(next((1 / (i + 1) for i, d in enumerate(top) if rels.get(d, 0) > 0), 0.0))
    return sum(values) / len(values) if values else 0.0
