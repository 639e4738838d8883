"""Hard-negative mining (m3_jax.mining, `m3-jax mine`) on a tiny random model and demo records.

Independent reference: the queries, pool and positives encoded with `M3Embedder.encode`, their
dense scores q·p and lexical scores Σ_t w_q(t)·w_p(t) computed in numpy from the returned
vectors and weight dicts, and every ranking by a stable argsort (ties: lower index first).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from m3_jax.cli import mine as mine_command
from m3_jax.cli.common import tool_main
from m3_jax.data.prepared import MANIFEST_FILE
from m3_jax.data.records import iter_records
from m3_jax.inference import M3Embedder
from m3_jax.input_files import InputError
from m3_jax.mining import (
    MINING_MODES,
    MiningResult,
    MiningSettings,
    encode_for_mining,
    mine_encoded,
    pool_from_records,
    positives_outside,
    rank_pool,
    read_candidate_pool,
    read_records,
    select_negatives,
    targets_of_records,
    unique_in_order,
)

NUM_RECORDS = 24
INSTRUCTION = "q: "
WEIGHTS = (1.0, 0.3)
TOL = 1e-5


@dataclasses.dataclass
class Setup:
    records: list
    pool: list[str]
    encodings: object
    targets: list
    scores: dict[str, np.ndarray]  # mode → [Q, pool + outside] reference scores
    index: dict[str, int]  # text → column of `scores`


def lexical(q: dict, p: dict) -> float:
    return float(sum(float(w) * float(p[t]) for t, w in q.items() if t in p))


@pytest.fixture(scope="module")
def setup(tiny_model_dir, demo_train_file) -> Setup:
    """The pool: every negative, the positives of the even records only (the odd records'
    positives are outside it) and one record's query text."""
    embedder = M3Embedder.from_pretrained(tiny_model_dir, show_progress=False)
    records = read_records([demo_train_file])[1][:NUM_RECORDS]
    pool = unique_in_order(
        [n for r in records for n in r.neg]
        + [p for r in records[::2] for p in r.pos]
        + [records[5].query]
    )
    outside = positives_outside(records, pool)
    assert outside and records[1].pos[0] in outside
    encodings = encode_for_mining(
        embedder,
        [INSTRUCTION + r.query for r in records],
        pool,
        mode="sparse+dense",
        outside=outside,
        progress=False,
    )
    queries = embedder.encode(
        [INSTRUCTION + r.query for r in records],
        max_length=embedder.query_max_length,
        return_sparse=True,
    )
    texts = pool + outside
    passages = embedder.encode(texts, return_sparse=True)
    dense = queries["dense_vecs"].astype(np.float64) @ passages["dense_vecs"].T.astype(np.float64)
    sparse = np.array(
        [[lexical(q, p) for p in passages["lexical_weights"]] for q in queries["lexical_weights"]]
    )
    scores = {
        "dense": dense,
        "sparse": sparse,
        "sparse+dense": (WEIGHTS[0] * dense + WEIGHTS[1] * sparse) / sum(WEIGHTS),
    }
    targets = targets_of_records(records, pool, outside)
    return Setup(records, pool, encodings, targets, scores, {t: i for i, t in enumerate(texts)})


def reference_ranking(setup: Setup, mode: str, end: int) -> list[np.ndarray]:
    """Pool indices best first, per query: the top `end`; for sparse+dense, the union of the
    dense and sparse top `end` ordered by the combined score, then its top `end`."""
    pool_scores = {m: s[:, : len(setup.pool)] for m, s in setup.scores.items()}
    ranked = []
    for q in range(len(setup.records)):
        if mode != "sparse+dense":
            ranked.append(np.argsort(-pool_scores[mode][q], kind="stable")[:end])
            continue
        union = np.union1d(
            np.argsort(-pool_scores["dense"][q], kind="stable")[:end],
            np.argsort(-pool_scores["sparse"][q], kind="stable")[:end],
        )
        order = np.argsort(-pool_scores[mode][q][union], kind="stable")
        ranked.append(union[order][:end])
    return ranked


def reference_candidates(setup: Setup, mode: str, ranks: tuple[int, int]) -> list[list[str]]:
    """The texts at ranks [start, end) that are neither a positive nor the query, best first."""
    ranked = reference_ranking(setup, mode, ranks[1])
    out = []
    for record, row in zip(setup.records, ranked, strict=True):
        texts = [setup.pool[i] for i in row[ranks[0] :]]
        out.append([t for t in texts if t not in record.pos and t != record.query])
    return out


def score_of(setup: Setup, mode: str, q: int, text: str) -> float:
    return float(setup.scores[mode][q, setup.index[text]])


def mined(setup: Setup, **settings) -> MiningResult:
    """The result with its negatives as texts (pool indices mapped), for comparing to texts."""
    settings = MiningSettings(dense_sparse_weights=WEIGHTS, **settings)
    result = mine_encoded(setup.encodings, setup.targets, settings, progress=False)
    texts = [[setup.pool[i] for i in negs] for negs in result.negatives]
    return dataclasses.replace(result, negatives=texts)


def assert_valid_negatives(setup: Setup, negatives: list[list[str]]) -> None:
    for record, negs in zip(setup.records, negatives, strict=True):
        assert len(set(negs)) == len(negs)
        assert not set(negs) & set(record.pos)
        assert record.query not in negs
        assert set(negs) <= set(setup.pool)


# Pools -----------------------------------------------------------------------------------------


def test_pools_are_deduplicated_in_first_seen_order(demo_train_file, tmp_path):
    records = read_records([demo_train_file])[1][:3]
    pool = pool_from_records(records)
    expected = []
    for record in records:
        for text in (*record.pos, *record.neg):
            if text not in expected:
                expected.append(text)
    assert pool == expected
    path = tmp_path / "pool.jsonl"
    lines = [{"text": "b"}, {"id": "1", "title": "T", "text": "a"}, {"text": "b"}, {"text": "c"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_candidate_pool(path) == ["b", "T a", "c"]
    path.write_text('{"text": "b"}\n{"id": "2"}\n')
    with pytest.raises(InputError, match=r"pool.jsonl:2: field 'text': missing"):
        read_candidate_pool(path)


# Ranking and selection against numpy -----------------------------------------------------------


@pytest.mark.parametrize("mode", MINING_MODES)
def test_ranking_matches_numpy(setup, mode):
    end = 30
    settings = MiningSettings(mode=mode, ranks=(0, end), dense_sparse_weights=WEIGHTS)
    scores, ranked = rank_pool(setup.encodings.queries, setup.encodings.pool, settings)
    assert ranked.shape == scores.shape == (len(setup.records), end)
    for q, expected in enumerate(reference_ranking(setup, mode, end)):
        np.testing.assert_array_equal(ranked[q], expected)
        np.testing.assert_allclose(scores[q], setup.scores[mode][q, expected], atol=TOL)


@pytest.mark.parametrize("mode", MINING_MODES)
def test_negatives_are_the_ranked_candidates(setup, mode):
    ranks = (4, 24)
    expected = reference_candidates(setup, mode, ranks)
    # More negatives than the range holds: all its candidates in rank order, then the fill.
    result = mined(setup, mode=mode, ranks=ranks, negative_number=40)
    assert_valid_negatives(setup, result.negatives)
    top = reference_ranking(setup, mode, ranks[1])
    for negs, candidates, row in zip(result.negatives, expected, top, strict=True):
        assert negs[: len(candidates)] == candidates
        assert len(negs) == 40
        assert not set(negs[len(candidates) :]) & {setup.pool[i] for i in row}
    assert result.from_ranks == sum(map(len, expected))
    assert result.from_fill == 40 * len(setup.records) - result.from_ranks
    assert result.removed["positive"] == sum(
        len(set(r.pos) & {setup.pool[i] for i in row[ranks[0] :]})
        for r, row in zip(setup.records, top, strict=True)
    )
    # Fewer: a sample of the candidates, still in rank order.
    sampled = mined(setup, mode=mode, ranks=ranks, negative_number=5)
    assert_valid_negatives(setup, sampled.negatives)
    for negs, candidates in zip(sampled.negatives, expected, strict=True):
        assert len(negs) == 5
        assert negs == sorted(negs, key=candidates.index)
    assert sampled.from_fill == 0


def test_the_query_text_in_the_pool_is_never_a_negative(setup):
    result = mined(setup, ranks=(0, len(setup.pool)), negative_number=len(setup.pool))
    assert_valid_negatives(setup, result.negatives)
    assert result.removed["query"] == 1
    assert setup.records[5].query in result.negatives[4]  # another record's query may be one


def test_sampling_is_reproducible_from_the_seed(setup):
    first = mined(setup, ranks=(4, 24), negative_number=5, seed=7)
    again = mined(setup, ranks=(4, 24), negative_number=5, seed=7)
    other = mined(setup, ranks=(4, 24), negative_number=5, seed=8)
    assert first.negatives == again.negatives
    assert first.negatives != other.negatives
    assert sum(a != b for a, b in zip(first.negatives, other.negatives, strict=True)) > 10


@pytest.mark.parametrize("mode", ["dense", "sparse+dense"])
def test_max_score_filter(setup, mode):
    ranks = (4, 24)
    top = reference_ranking(setup, mode, ranks[1])
    in_range = np.concatenate([setup.scores[mode][q, row[ranks[0] :]] for q, row in enumerate(top)])
    # Halfway between two neighbouring scores near the median: no score sits on the threshold.
    sorted_scores = np.sort(in_range)
    middle = len(sorted_scores) // 2
    max_score = float(sorted_scores[middle - 1] + sorted_scores[middle]) / 2
    result = mined(setup, mode=mode, ranks=ranks, negative_number=40, max_score=max_score)
    assert_valid_negatives(setup, result.negatives)
    for q, (negs, candidates) in enumerate(
        zip(result.negatives, reference_candidates(setup, mode, ranks), strict=True)
    ):
        assert all(score_of(setup, mode, q, t) <= max_score + TOL for t in negs)  # fill too
        kept = [t for t in candidates if score_of(setup, mode, q, t) <= max_score]
        assert negs[: len(kept)] == kept
    assert result.removed["max_score"] > 0 and result.from_ranks > 0


@pytest.mark.parametrize("mode", ["dense", "sparse+dense"])
def test_relative_margin_filter(setup, mode):
    ranks, margin = (4, 24), 0.02
    result = mined(setup, mode=mode, ranks=ranks, negative_number=40, relative_margin=margin)
    assert_valid_negatives(setup, result.negatives)
    for q, (record, negs, candidates) in enumerate(
        zip(setup.records, result.negatives, reference_candidates(setup, mode, ranks), strict=True)
    ):
        # Positives outside the pool (the odd records') count as well.
        ceiling = (1 - margin) * min(score_of(setup, mode, q, p) for p in record.pos)
        assert all(score_of(setup, mode, q, t) <= ceiling + TOL for t in negs)
        kept = [t for t in candidates if score_of(setup, mode, q, t) <= ceiling]
        assert negs[: len(kept)] == kept
    assert result.removed["relative_margin"] > 0 and result.from_ranks > 0


def test_random_fill_when_the_range_holds_too_few(setup):
    ranks = (0, 3)
    result = mined(setup, ranks=ranks, negative_number=12)
    assert_valid_negatives(setup, result.negatives)
    top = reference_ranking(setup, "dense", ranks[1])
    for negs, row in zip(result.negatives, top, strict=True):
        assert len(negs) == 12
        ranked = [setup.pool[i] for i in row]
        from_ranks = [t for t in negs if t in ranked]
        assert negs[: len(from_ranks)] == from_ranks  # ranked first, then the fill
    assert result.from_fill >= 9 * len(setup.records) and result.short == 0
    assert mined(setup, ranks=ranks, negative_number=12).negatives == result.negatives


def test_select_negatives_rules():
    """Pool of 10 scored 1.0, 0.9, ..., 0.1 (rank = index); ranks 2-6 hold docs 2..5."""
    values = np.linspace(1.0, 0.1, 10)
    ranked = np.arange(10)
    rng = np.random.default_rng(0)
    kw = dict(pool_size=10, positives=[3], query=4, score_docs=lambda docs: values[docs])
    settings = MiningSettings(ranks=(2, 6), negative_number=8, max_score=0.75)
    selection = select_negatives(ranked, values, settings, rng, **kw)
    # 2 over max_score, 3 positive, 4 the query: 5 from the ranks, the fill from ranks 6..9 only.
    assert selection.negatives[0] == 5 and selection.from_ranks == 1
    assert sorted(selection.negatives[1:]) == [6, 7, 8, 9]
    assert dict(selection.removed) == dict(positive=1, query=1, max_score=1, relative_margin=0)
    # The filters hold in the fill: only 8 (0.2) and 9 (0.1) are at most 0.25.
    settings = dataclasses.replace(settings, max_score=0.25)
    selection = select_negatives(ranked, values, settings, rng, **kw)
    assert sorted(selection.negatives) == [8, 9] and selection.from_ranks == 0
    assert selection.removed["max_score"] == 2 + 2  # 2 and 5 in the ranks, 6 and 7 in the fill
    # relative_margin 0.1 under a positive at 0.5: at most 0.45, so 5 (0.5) goes too.
    settings = MiningSettings(ranks=(2, 6), negative_number=8, relative_margin=0.1)
    selection = select_negatives(ranked, values, settings, rng, positive_floor=0.5, **kw)
    assert sorted(selection.negatives) == [6, 7, 8, 9]
    assert selection.removed["relative_margin"] == 2  # 2 (0.8) and 5 (0.5)
    with pytest.raises(ValueError, match="lowest positive score"):
        select_negatives(ranked, values, settings, rng, **kw)


# The command -----------------------------------------------------------------------------------


def run_mine(*argv) -> int:
    return tool_main(
        mine_command.__doc__, mine_command.add_arguments, mine_command.run, [str(a) for a in argv]
    )


def test_mine_command_end_to_end(tiny_model_dir, demo_train_file, tmp_path, capsys):
    objects = [json.loads(line) for line in demo_train_file.read_text().splitlines()[:12]]
    for i, obj in enumerate(objects):
        obj["source"] = f"s{i}"
    assert all("pos_scores" in obj for obj in objects)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects))
    out = tmp_path / "out" / "mined.jsonl"
    args = [data, "--model", tiny_model_dir, "--output", out, "--range", "2-30"]
    args += ["--negative-number", 6, "--query-instruction", INSTRUCTION, "--quiet"]
    args += ["--cache", tmp_path / "cache", "--mode", "sparse+dense", "--max-score", 0.99]
    assert run_mine(*args) == 0
    captured = capsys.readouterr()
    assert "12 records, pool of" in captured.out and f"wrote {out}" in captured.out
    assert "12 of 12 records had pos_scores/neg_scores: dropped" in captured.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    records = list(iter_records(out))
    assert len(records) == len(rows) == 12
    for obj, row, record in zip(objects, rows, records, strict=True):
        assert list(row) == ["query", "pos", "neg", "source"]  # "neg" keeps its place
        assert row["query"] == obj["query"] and row["pos"] == obj["pos"]
        assert row["source"] == obj["source"]
        assert record.pos_scores is None and record.neg_scores is None
        assert len(record.neg) == 6 and not set(record.neg) & set(record.pos)
    assert not list(out.parent.glob("*.tmp"))
    # A rerun reads the encodings from the cache and mines the same negatives.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["pool", "queries"]
    first = out.read_text()
    assert run_mine(*args) == 0
    assert out.read_text() == first


@pytest.mark.parametrize(
    "change, message",
    [
        (["--range", "10-5"], "range 10-5: expected integers with 0 <= start < end"),
        (["--range", "ten-20"], "--range 'ten-20': expected START-END"),
        (["--relative-margin", "1"], "relative_margin 1.0: expected 0 <= m < 1"),
        (["--seed", "-1"], "seed -1: expected an integer >= 0"),
        ("missing", "missing.jsonl: no such file or directory"),
        ("bad line", "bad.jsonl:2: invalid JSON"),
        ("prepared", "manifest.json: schema version None"),
    ],
    ids=["range order", "range format", "margin", "seed", "missing input", "bad line", "prepared"],
)
def test_mine_command_user_errors(tmp_path, capsys, change, message):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n{"query": \n')
    inputs, extra = [data], []
    if change == "missing":
        inputs = [tmp_path / "missing.jsonl"]
    elif change == "prepared":
        (tmp_path / "prepared").mkdir()
        (tmp_path / "prepared" / MANIFEST_FILE).write_text("{}")
        inputs = [tmp_path / "prepared"]
    elif change != "bad line":
        data.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
        extra = change
    # The inputs and options are checked before the model is loaded.
    code = run_mine(
        *inputs, "--model", tmp_path / "no-model", "--output", tmp_path / "o.jsonl", *extra
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "o.jsonl").exists()
