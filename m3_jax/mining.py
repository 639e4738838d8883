"""Hard-negative mining: each training record's negatives, drawn from the candidates a model
ranks just below the top for its query (FlagEmbedding's `scripts/hn_mine.py` rule).

The rule: the candidate pool is every `pos` and `neg` text of the input records (or a given
pool); queries and pool are encoded and each query ranks the whole pool exactly (dense on the
device mesh, `m3_jax.evaluation.retrieval`); of the top `end`, the ranks [start, end) are the
candidates; a candidate that is one of the record's positives or its query text is dropped; of
those left, `negative_number` are sampled, and when fewer are left the rest is a random fill
from the pool.

What we add:
- modes: "dense" (hn_mine's only one), "sparse" and "sparse+dense" (the union of both top-`end`
  lists rescored by (w_d·dense + w_s·sparse)/(w_d + w_s), as `m3-jax evaluate` does);
- false-negative filters, on the same mode's scores: `max_score` drops a candidate scoring above
  it; `relative_margin` m drops one scoring above (1 − m) × the query's lowest positive score
  (NV-Retriever's TopK-PercPos, meant for positive scores as a trained model gives; positives
  outside the pool are encoded for it). A candidate above both counts as removed by `max_score`.

Where we differ from hn_mine, on purpose:
- the pool is deduplicated in first-seen order, not through a Python set, whose order (and so
  the mined negatives) changes from run to run;
- every record samples from its own numpy Generator seeded by (seed, record index): a rerun
  gives the same negatives, and a record's negatives do not depend on the other records;
- sampled negatives keep their rank order (best first); the fill follows, in draw order;
- the random fill draws uniformly from the pool texts ranked below `end` (never one of the top
  ranks the range skips as too close to the query), never a positive, the query or a negative
  already chosen (hn_mine's fill may repeat a negative or pick the query), and it passes the
  same filters (hn_mine's fill ignores scores): every mined negative obeys the filters. A small
  pool may leave a record with fewer than `negative_number` negatives; `MiningResult.short`
  counts them;
- the default range is 10-100 (hn_mine's: 10-210).

A prepared set (`m3-jax data prepare` output) is mined from its token ids (`mine_prepared`):
queries as prepared (with the set's instructions), the pool its passage table (or a given
pool, tokenized as the set's passages), and a passage is the query's own text when their
token ids are equal; `m3_jax.data.mined_set` writes the result as a new prepared set.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from m3_jax.config import DataConfig
from m3_jax.data.mined_set import PreparedExamples, read_examples, read_passages
from m3_jax.data.prepare import text_key
from m3_jax.data.prepared import PreparedSet, is_prepared, tokenizer_fingerprint
from m3_jax.data.records import SCORE_FIELDS, Record, data_files, parse_record
from m3_jax.data.sampler import apply_instructions
from m3_jax.evaluation.datasets import doc_text
from m3_jax.evaluation.encoding import EncodedTexts, encode_texts
from m3_jax.evaluation.modes import (
    RetrievalSettings,
    candidate_scores,
    fused_candidates,
    required_outputs,
)
from m3_jax.evaluation.retrieval import dense_search, sparse_search
from m3_jax.input_files import InputError, read_jsonl
from m3_jax.tokenization import tokenize

log = logging.getLogger(__name__)

MINING_MODES = ("dense", "sparse", "sparse+dense")
# Why a candidate was left out, in the order the rules apply.
REMOVAL_REASONS = ("positive", "query", "max_score", "relative_margin")


@dataclasses.dataclass(frozen=True)
class MiningSettings:
    mode: str = "dense"
    ranks: tuple[int, int] = (10, 100)  # [start, end): the 0-based ranks negatives come from
    negative_number: int = 15
    max_score: float | None = None
    relative_margin: float | None = None
    dense_sparse_weights: tuple[float, float] = (1.0, 0.3)  # (dense, sparse) of sparse+dense
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MINING_MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {', '.join(MINING_MODES)}")
        start, end = self.ranks
        if not all(isinstance(r, int) for r in self.ranks) or not 0 <= start < end:
            raise ValueError(f"range {start}-{end}: expected integers with 0 <= start < end")
        if self.negative_number < 1:
            raise ValueError(f"negative_number {self.negative_number}: expected >= 1")
        if self.max_score is not None and not math.isfinite(self.max_score):
            raise ValueError(f"max_score {self.max_score}: expected a finite number")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"relative_margin {self.relative_margin}: expected 0 <= m < 1")
        if self.seed < 0:
            raise ValueError(f"seed {self.seed}: expected an integer >= 0")
        weights = self.dense_sparse_weights
        if len(weights) != 2 or sum(weights) == 0:
            raise ValueError(f"dense_sparse_weights {weights}: expected (dense, sparse), sum != 0")

    @property
    def filters(self) -> bool:
        return self.max_score is not None or self.relative_margin is not None

    def retrieval(self) -> RetrievalSettings:
        return RetrievalSettings(
            top_k=self.ranks[1], dense_sparse_weights=self.dense_sparse_weights
        )


# Inputs ----------------------------------------------------------------------------------------


def read_records(paths: Sequence[str | os.PathLike]) -> tuple[list[dict[str, Any]], list[Record]]:
    """(the JSON objects, their validated records) of FlagEmbedding jsonl files or directories,
    in input order; a bad line fails as FILE:LINE. A prepared set is refused: it holds token
    ids, not texts."""
    for path in map(Path, paths):
        if path.is_dir() and is_prepared(path):
            raise InputError(
                f"{path}: a prepared training set (`m3-jax data prepare` output) holds token ids, "
                "not texts; give the jsonl files it was prepared from"
            )
    objects, records = [], []
    for file in data_files(list(paths)):
        for where, obj in read_jsonl(file):
            records.append(parse_record(obj, where))
            objects.append(obj)
    if not records:
        raise InputError(f"{', '.join(map(str, paths))}: no records")
    return objects, records


def unique_in_order(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def pool_from_records(records: Sequence[Record]) -> list[str]:
    """Every pos and neg text of the records once, in first-seen order."""
    return unique_in_order([t for r in records for t in (*r.pos, *r.neg)])


def read_candidate_pool(path: str | os.PathLike) -> list[str]:
    """The texts of a jsonl pool ({"text"} per line, or a corpus line {"id", "text", "title"},
    read as "title text"), each once, in first-seen order."""
    texts = [doc_text(row, "text", where) for where, row in read_jsonl(path)]
    if not texts:
        raise InputError(f"{path}: no texts in the candidate pool")
    return unique_in_order(texts)


def positives_outside(records: Sequence[Record], pool: Sequence[str]) -> list[str]:
    """The positives missing from the pool, once each (relative_margin needs their scores)."""
    inside = set(pool)
    return unique_in_order([p for r in records for p in r.pos if p not in inside])


# Encoding and ranking --------------------------------------------------------------------------


@dataclasses.dataclass
class MiningEncodings:
    queries: EncodedTexts  # row i: record i's query
    pool: EncodedTexts
    positives: EncodedTexts | None  # positives outside the pool (None: none encoded)


def encode_for_mining(
    embedder,
    queries: Sequence[str] | Sequence[np.ndarray],
    pool: Sequence[str] | Sequence[np.ndarray],
    *,
    mode: str,
    outside: Sequence[str] | Sequence[np.ndarray] = (),
    query_max_length: int | None = None,
    passage_max_length: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_settings: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> MiningEncodings:
    """Queries at the query max length, pool and `outside` positives at the passage max length
    (texts, or token-id arrays of a prepared set), with the outputs `mode` needs. cache_dir:
    resumable shards in cache_dir/{pool,queries,positives}, refused when written for another
    model_fingerprint or `cache_settings` (as `encode_shards`' settings); other keyword
    arguments go to `encode_texts` (model_fingerprint, shard_size, progress)."""
    outputs = required_outputs([mode])
    passage_length = passage_max_length or embedder.passage_max_length

    def encode(texts, name: str, max_length: int) -> EncodedTexts:
        cache = None if cache_dir is None else Path(cache_dir) / name
        return encode_texts(
            embedder,
            texts,
            max_length=max_length,
            outputs=outputs,
            cache_dir=cache,
            settings=cache_settings,
            desc=name,
            **kwargs,
        )

    return MiningEncodings(
        queries=encode(queries, "queries", query_max_length or embedder.query_max_length),
        pool=encode(pool, "pool", passage_length),
        positives=encode(outside, "positives", passage_length) if len(outside) else None,
    )


@dataclasses.dataclass(frozen=True)
class MiningTarget:
    """One record as its selection sees it: the pool indices of its positives, the rows of
    `MiningEncodings.positives` holding its positives outside the pool, and the pool index of
    its query's own text (None: not in the pool)."""

    positives: tuple[int, ...]
    outside: tuple[int, ...]
    query: int | None


def targets_of_records(
    records: Sequence[Record], pool: Sequence[str], outside: Sequence[str] = ()
) -> list[MiningTarget]:
    """Each record's target, texts matched exactly; `outside`: the encoded positives outside
    the pool (`positives_outside`), empty when relative_margin is off."""
    pool_index = {text: i for i, text in enumerate(pool)}
    outside_index = {text: i for i, text in enumerate(outside)}
    return [
        MiningTarget(
            positives=tuple(pool_index[p] for p in r.pos if p in pool_index),
            outside=tuple(outside_index[p] for p in r.pos if p in outside_index),
            query=pool_index.get(r.query),
        )
        for r in records
    ]


def rank_pool(
    queries: EncodedTexts,
    pool: EncodedTexts,
    settings: MiningSettings,
    *,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, pool indices), each [Q, min(end, pool size)]: every query's top `end` in the
    settings' mode, best first (ties: lower index first)."""
    end = settings.ranks[1]
    if settings.mode == "sparse":
        return sparse_search(queries.sparse, pool.sparse, end)
    dense = dense_search(queries.dense, pool.dense, end, mesh=mesh)
    if settings.mode == "dense":
        return dense
    sparse_top = sparse_search(queries.sparse, pool.sparse, end)
    k = dense[1].shape[1]
    out_scores = np.zeros((len(dense[1]), k), np.float32)
    out_indices = np.zeros((len(dense[1]), k), np.int64)
    for q in range(len(dense[1])):
        docs = fused_candidates(dense[1][q], sparse_top[1][q])  # sorted: ties keep index order
        values = candidate_scores(settings.mode, queries, q, pool, docs, settings.retrieval())
        best = np.argsort(-values, kind="stable")[:k]
        out_scores[q], out_indices[q] = values[best], docs[best]
    return out_scores, out_indices


# Selecting one record's negatives --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Selection:
    negatives: tuple[int, ...]  # pool indices: the ones from the ranks (rank order), then the fill
    from_ranks: int
    removed: collections.Counter[str]  # REMOVAL_REASONS → candidates left out for it


def _filtered(
    scores: np.ndarray, settings: MiningSettings, positive_floor: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the candidates `max_score` removes, and of those `relative_margin` removes of
    the rest."""
    over_max = np.zeros(len(scores), bool)
    if settings.max_score is not None:
        over_max = scores > settings.max_score
    over_margin = np.zeros(len(scores), bool)
    if settings.relative_margin is not None:
        over_margin = ~over_max & (scores > (1 - settings.relative_margin) * positive_floor)
    return over_max, over_margin


def _random_fill(
    rng: np.random.Generator,
    pool_size: int,
    needed: int,
    seen: set[int],
    keep: Callable[[np.ndarray], np.ndarray] | None,
) -> list[int]:
    """Up to `needed` pool indices not in `seen`, uniformly at random, that `keep` accepts (a
    mask over candidates). Draws grow 4x until the last one is the whole pool in random order,
    so nothing eligible is missed and a large pool is not permuted for a handful."""
    fill: list[int] = []
    size = needed + len(seen)  # without `keep`, the first draw always holds enough
    while len(fill) < needed:
        size = min(size, pool_size)
        drawn = rng.choice(pool_size, size, replace=False)
        fresh = np.array([d for d in drawn.tolist() if d not in seen], np.int64)
        seen.update(fresh.tolist())
        if keep is not None and len(fresh):
            fresh = fresh[keep(fresh)]
        fill.extend(fresh[: needed - len(fill)].tolist())
        if size == pool_size:
            break
        size *= 4
    return fill


def select_negatives(
    ranked: np.ndarray,
    ranked_scores: np.ndarray,
    settings: MiningSettings,
    rng: np.random.Generator,
    *,
    pool_size: int,
    positives: Collection[int] = (),
    query: int | None = None,
    positive_floor: float | None = None,
    score_docs: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Selection:
    """One record's negatives from its ranked pool indices (best first, at least to the range
    end where the pool allows) and their scores.

    positives, query: the pool indices of the record's positives and of its query text.
    positive_floor: the lowest positive score (needed with relative_margin). score_docs: the
    scores of any pool indices for this query (needed with a filter, for the fill).
    """
    if settings.relative_margin is not None and positive_floor is None:
        raise ValueError("relative_margin needs the query's lowest positive score")
    if settings.filters and score_docs is None:
        raise ValueError("max_score and relative_margin need score_docs for the random fill")
    start, end = settings.ranks
    candidates, scores = ranked[start:end], ranked_scores[start:end]
    is_positive = np.isin(candidates, list(positives))
    is_query = np.zeros_like(is_positive) if query is None else ~is_positive & (candidates == query)
    over_max, over_margin = _filtered(scores, settings, positive_floor)
    over_max &= ~is_positive & ~is_query
    over_margin &= ~is_positive & ~is_query
    removed = collections.Counter(
        positive=int(is_positive.sum()),
        query=int(is_query.sum()),
        max_score=int(over_max.sum()),
        relative_margin=int(over_margin.sum()),
    )
    kept = candidates[~(is_positive | is_query | over_max | over_margin)]
    n = settings.negative_number
    if len(kept) > n:
        kept = kept[np.sort(rng.choice(len(kept), n, replace=False))]
    negatives = kept.tolist()
    if len(negatives) < n:
        seen = {*ranked[:end].tolist(), *positives, *([] if query is None else [query])}

        def keep(docs: np.ndarray) -> np.ndarray:
            over_max, over_margin = _filtered(score_docs(docs), settings, positive_floor)
            removed.update(max_score=int(over_max.sum()), relative_margin=int(over_margin.sum()))
            return ~(over_max | over_margin)

        fill = _random_fill(
            rng, pool_size, n - len(negatives), seen, keep if settings.filters else None
        )
        negatives += fill
    return Selection(tuple(negatives), len(kept), removed)


# Mining a set of records -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MiningResult:
    negatives: list[tuple[int, ...]]  # per record, in input order: pool indices
    pool_size: int
    from_ranks: int  # negatives from the ranks, over all records
    from_fill: int  # negatives from the random fill
    short: int  # records left with fewer than negative_number negatives
    removed: dict[str, int]  # REMOVAL_REASONS → candidates left out, over all records


def _positive_floor(
    encodings: MiningEncodings, q: int, target: MiningTarget, settings: MiningSettings
) -> float:
    """The lowest score of the record's positives for its query, in the settings' mode."""
    retrieval = settings.retrieval()
    scores = []
    for encoded, rows in (
        (encodings.pool, target.positives),
        (encodings.positives, target.outside),
    ):
        if rows:
            rows = np.array(rows, np.int64)
            scores.append(
                candidate_scores(settings.mode, encodings.queries, q, encoded, rows, retrieval)
            )
    if not scores:
        raise ValueError(f"record {q}: relative_margin needs its positives' scores; none encoded")
    return float(np.concatenate(scores).min())


def mine_encoded(
    encodings: MiningEncodings,
    targets: Sequence[MiningTarget],
    settings: MiningSettings,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> MiningResult:
    """Negatives, as pool indices, for every record from its encodings (`encode_for_mining`)
    and target; record q samples with `default_rng([seed, q])`."""
    scores, ranked = rank_pool(encodings.queries, encodings.pool, settings, mesh=mesh)
    if len(ranked) != len(targets):
        raise ValueError(f"encodings of {len(ranked)} queries for {len(targets)} records")
    pool_size = encodings.pool.num_texts
    retrieval = settings.retrieval()
    negatives, removed = [], collections.Counter()
    from_ranks = short = 0
    bar = tqdm(targets, desc="select", disable=not progress, unit="record")
    for q, target in enumerate(bar):
        floor = None
        if settings.relative_margin is not None:
            floor = _positive_floor(encodings, q, target, settings)
        selection = select_negatives(
            ranked[q],
            scores[q],
            settings,
            np.random.default_rng([settings.seed, q]),
            pool_size=pool_size,
            positives=target.positives,
            query=target.query,
            positive_floor=floor,
            score_docs=functools.partial(
                candidate_scores,
                settings.mode,
                encodings.queries,
                q,
                encodings.pool,
                settings=retrieval,
            ),
        )
        negatives.append(selection.negatives)
        from_ranks += selection.from_ranks
        short += len(selection.negatives) < settings.negative_number
        removed.update(selection.removed)
    total = sum(len(n) for n in negatives)
    return MiningResult(
        negatives,
        pool_size,
        from_ranks,
        total - from_ranks,
        short,
        {reason: removed[reason] for reason in REMOVAL_REASONS},
    )


def mine(
    embedder,
    records: Sequence[Record],
    pool: Sequence[str],
    settings: MiningSettings = MiningSettings(),  # noqa: B008 (frozen dataclass)
    *,
    query_instruction: str = "",
    mesh: Mesh | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> MiningResult:
    """Encodes with an `M3Embedder` (`query_instruction` prepended to every query for encoding
    only; other keyword arguments as `encode_for_mining`: max lengths, cache_dir,
    model_fingerprint, ...) and mines every record's negatives from the pool texts."""
    outside = positives_outside(records, pool) if settings.relative_margin is not None else []
    encodings = encode_for_mining(
        embedder,
        [query_instruction + r.query for r in records],
        pool,
        mode=settings.mode,
        outside=outside,
        progress=progress,
        **kwargs,
    )
    targets = targets_of_records(records, pool, outside)
    return mine_encoded(encodings, targets, settings, mesh=mesh, progress=progress)


# Mining a prepared set ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreparedMining:
    """A prepared set mined: `negatives[i]` are example i's new negatives as passage ids (of
    the table `passage_lengths` measures: the input's, then `new_passages`)."""

    result: MiningResult
    examples: PreparedExamples
    negatives: list[np.ndarray]
    passage_lengths: np.ndarray
    new_passages: list[np.ndarray]


def _ids_key(ids: np.ndarray) -> bytes:
    return text_key(np.asarray(ids, np.int32).tobytes())


def pool_passage_ids(
    texts: Sequence[str], passages: Sequence[np.ndarray], tokenizer: Any, settings: dict[str, Any]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the passage id of each distinct pool text, the token ids of the new passages): each
    text tokenized as the set's passages were (its passage instruction, max length); a text
    whose ids the table holds takes that passage's id, the others ids from len(passages) on."""
    data = DataConfig(
        query_max_len=settings["query_max_len"],
        passage_max_len=settings["passage_max_len"],
        passage_instruction=settings["passage_instruction"],
        instruction_format=settings["instruction_format"],
    )
    texts = apply_instructions("", texts, None, data)[1]
    table = {}
    for i, ids in enumerate(passages):
        table.setdefault(_ids_key(ids), i)
    pool, new = [], []
    for ids in tokenize(tokenizer, texts, data.passage_max_len):
        key = _ids_key(ids)
        if key not in table:
            table[key] = len(passages) + len(new)
            new.append(np.asarray(ids, np.int32))
        pool.append(table[key])
    return np.asarray(unique_in_order(pool), np.int64), new


def mine_prepared(
    embedder,
    source: PreparedSet,
    settings: MiningSettings = MiningSettings(),  # noqa: B008 (frozen dataclass)
    *,
    pool_texts: Sequence[str] | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> PreparedMining:
    """Mines every example of a prepared set from its token ids: the queries as prepared
    (instructions included), the pool the whole passage table or, with `pool_texts`, those
    texts tokenized as the set's passages. A passage whose token ids equal the query's is its
    query's own text. Keyword arguments as `encode_for_mining` (max lengths, cache_dir, ...);
    the embedder's tokenizer must be the set's."""
    have = source.manifest.settings["tokenizer_fingerprint"]
    tokenizer_dir = embedder.tokenizer.name_or_path
    if tokenizer_fingerprint(tokenizer_dir) != have:
        raise InputError(
            f"{source.path}: prepared with another tokenizer than the model's ({tokenizer_dir}); "
            "its token ids mean other words to this model (prepare the data with the model's "
            "tokenizer)"
        )
    examples = read_examples(source, progress=progress)
    passages = read_passages(source, progress=progress)
    new: list[np.ndarray] = []
    if pool_texts is None:
        pool_ids = np.arange(len(passages), dtype=np.int64)
    else:
        pool_ids, new = pool_passage_ids(
            pool_texts, passages, embedder.tokenizer, source.manifest.settings
        )
    table = passages + new
    pool_of = {int(p): i for i, p in enumerate(pool_ids)}
    outside: list[int] = []
    if settings.relative_margin is not None:
        outside = unique_in_order(
            [int(p) for pos in examples.pos for p in pos if int(p) not in pool_of]
        )
    outside_of = {p: i for i, p in enumerate(outside)}
    query_of = {}
    for i, p in enumerate(pool_ids):
        query_of.setdefault(_ids_key(table[p]), i)
    targets = [
        MiningTarget(
            positives=tuple(pool_of[int(p)] for p in pos if int(p) in pool_of),
            outside=tuple(outside_of[int(p)] for p in pos if int(p) in outside_of),
            query=query_of.get(_ids_key(query)),
        )
        for pos, query in zip(examples.pos, examples.query_ids, strict=True)
    ]
    encodings = encode_for_mining(
        embedder,
        examples.query_ids,
        [table[p] for p in pool_ids],
        mode=settings.mode,
        outside=[table[p] for p in outside],
        progress=progress,
        **kwargs,
    )
    result = mine_encoded(encodings, targets, settings, mesh=mesh, progress=progress)
    return PreparedMining(
        result=result,
        examples=examples,
        negatives=[pool_ids[list(n)] for n in result.negatives],
        passage_lengths=np.fromiter(map(len, table), np.int64, len(table)),
        new_passages=new,
    )


def mined_records(
    objects: Sequence[dict[str, Any]], negatives: Sequence[Sequence[int]], pool: Sequence[str]
) -> list[dict]:
    """The input objects with "neg" replaced by the pool texts `negatives` index (its place
    kept) and teacher scores dropped."""
    with_scores = sum(any(f in obj for f in SCORE_FIELDS) for obj in objects)
    if with_scores:
        log.warning(
            "%d of %d records had %s: dropped, since they do not match the new negatives",
            with_scores,
            len(objects),
            "/".join(SCORE_FIELDS),
        )
    rows = []
    for obj, negs in zip(objects, negatives, strict=True):
        row = {k: v for k, v in obj.items() if k not in SCORE_FIELDS}
        row["neg"] = [pool[i] for i in negs]
        rows.append(row)
    return rows
