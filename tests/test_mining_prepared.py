"""Mining a prepared set (`mine_prepared`, `m3-jax mine PREPARED`) and the prepared set it
writes (`m3_jax.data.mined_set`).

Independent reference: the records' texts encoded with `M3Embedder.encode`, dense scores q·p
in numpy, rankings by a stable argsort. The passage table of a one-file prepared set lists the
records' passages in first-seen order (checked against the tokenizer), so table id i is the
i-th text of that order.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from demo_runs import ROOT

from m3_jax.bucketing import bucket_index
from m3_jax.cli import mine as mine_command
from m3_jax.cli.common import tool_main
from m3_jax.config import DataConfig
from m3_jax.data.mined_set import write_with_negatives
from m3_jax.data.pipeline import LoaderPosition, TrainLoader
from m3_jax.data.prepare import PrepareSettings, prepare
from m3_jax.data.prepared import PreparedSet
from m3_jax.inference import M3Embedder
from m3_jax.input_files import InputError
from m3_jax.mining import MiningSettings, mine_prepared, pool_from_records, read_records
from m3_jax.tokenization import tokenize

NUM_RECORDS = 40
QUERY_AS_PASSAGE = 3  # this record's query is record 7's positive
TOL = 1e-5


@dataclasses.dataclass
class Prepared:
    path: Path
    source: PreparedSet
    embedder: M3Embedder
    records: list
    pool: list[str]  # the passage table as texts
    example_records: list[int]  # prepared example i is record example_records[i]
    scores: np.ndarray  # [examples, pool] reference dense scores, in example order


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, demo_train_file, tmp_path_factory) -> Prepared:
    root = tmp_path_factory.mktemp("prepared_mining")
    rows = [json.loads(line) for line in demo_train_file.read_text().splitlines()[:NUM_RECORDS]]
    rows[QUERY_AS_PASSAGE]["query"] = rows[7]["pos"][0]
    data = write_jsonl(root / "train.jsonl", rows)
    path = root / "prepared"
    prepare([data], path, PrepareSettings(tokenizer=str(tiny_model_dir)), progress=False)
    embedder = M3Embedder.from_pretrained(tiny_model_dir, show_progress=False)
    records = read_records([data])[1]
    pool = pool_from_records(records)
    source = PreparedSet(path)
    table = source.passages(range(source.manifest.passages))
    expected = tokenize(embedder.tokenizer, pool, source.manifest.settings["passage_max_len"])
    assert [t.tolist() for t in table] == expected
    query_ids = [tokenize(embedder.tokenizer, [r.query], 512)[0] for r in records]
    example_records = []
    for bucket in source.manifest.datasets[0].buckets:
        for example in source.examples(bucket.split, range(bucket.examples)):
            example_records.append(query_ids.index(example["query_ids"].tolist()))
    assert sorted(example_records) == list(range(NUM_RECORDS))
    queries = embedder.encode([records[i].query for i in example_records], max_length=512)
    passages = embedder.encode(pool)
    scores = queries["dense_vecs"].astype(np.float64) @ passages["dense_vecs"].T
    return Prepared(path, source, embedder, records, pool, example_records, scores)


def mined_texts(setup: Prepared, mining) -> list[list[str]]:
    return [[setup.pool[i] for i in negs] for negs in mining.negatives]


def excluded(setup: Prepared, example: int) -> set[str]:
    record = setup.records[setup.example_records[example]]
    return {*record.pos, record.query}


def test_encode_token_ids_equals_encode(prepared):
    embedder = prepared.embedder
    texts = prepared.pool[:12] + ["a", "x" * 300]
    for max_length in (512, 9):
        want = embedder.encode(texts, max_length=max_length, return_sparse=True)
        ids = tokenize(embedder.tokenizer, texts, 512)
        got = embedder.encode_token_ids(ids, max_length=max_length, return_sparse=True)
        np.testing.assert_allclose(got["dense_vecs"], want["dense_vecs"], atol=TOL)
        for got_weights, want_weights in zip(
            got["lexical_weights"], want["lexical_weights"], strict=True
        ):
            assert got_weights == pytest.approx(want_weights, abs=TOL)
    config = embedder.config
    bad = [
        ([[config.cls_token_id, 5]], "expected <s>"),
        ([[config.cls_token_id, config.vocab_size, config.eos_token_id]], "must lie in"),
        ([[config.cls_token_id]], "at least 2 integer ids"),
        ([], "empty"),
    ]
    for token_ids, message in bad:
        with pytest.raises(ValueError, match=message):
            embedder.encode_token_ids(token_ids)


def test_whole_pool_ranks_give_every_other_passage_in_score_order(prepared):
    size = len(prepared.pool)
    settings = MiningSettings(ranks=(0, size), negative_number=size)
    mining = mine_prepared(prepared.embedder, prepared.source, settings, progress=False)
    assert mining.result.removed["query"] == 1 and mining.result.from_fill == 0
    for e, negs in enumerate(mined_texts(prepared, mining)):
        assert set(negs) == set(prepared.pool) - excluded(prepared, e)
        values = prepared.scores[e, [prepared.pool.index(t) for t in negs]]
        assert np.all(np.diff(values) <= TOL)  # best first


def test_sampled_negatives_come_from_the_ranks(prepared):
    ranks = (2, 20)
    settings = MiningSettings(ranks=ranks, negative_number=5, seed=3)
    mining = mine_prepared(prepared.embedder, prepared.source, settings, progress=False)
    again = mine_prepared(prepared.embedder, prepared.source, settings, progress=False)
    other = mine_prepared(
        prepared.embedder, prepared.source, dataclasses.replace(settings, seed=4), progress=False
    )
    assert [n.tolist() for n in mining.negatives] == [n.tolist() for n in again.negatives]
    assert [n.tolist() for n in mining.negatives] != [n.tolist() for n in other.negatives]
    for e, negs in enumerate(mined_texts(prepared, mining)):
        ranked = [prepared.pool[i] for i in np.argsort(-prepared.scores[e], kind="stable")]
        candidates = [t for t in ranked[ranks[0] : ranks[1]] if t not in excluded(prepared, e)]
        assert len(negs) == 5 and negs == sorted(negs, key=candidates.index)


def test_the_mined_set_is_a_prepared_set_training_reads(prepared, tmp_path):
    settings = MiningSettings(ranks=(2, 30), negative_number=4)
    mining = mine_prepared(prepared.embedder, prepared.source, settings, progress=False)
    out = tmp_path / "mined"
    manifest = write_with_negatives(
        prepared.source,
        mining.examples,
        mining.negatives,
        out,
        passage_lengths=mining.passage_lengths,
        mined={"settings": dataclasses.asdict(settings)},
        progress=False,
    )
    mined = PreparedSet(out)
    assert mined.manifest == manifest and manifest.settings["mined"]["settings"]["seed"] == 0
    count = prepared.source.manifest.passages
    assert [p.tolist() for p in mined.passages(range(count))] == [
        p.tolist() for p in prepared.source.passages(range(count))
    ]
    lengths = manifest.settings["bucket_lengths"]
    read = {}
    for bucket in manifest.datasets[0].buckets:
        for example in mined.examples(bucket.split, range(bucket.examples)):
            longest = mining.passage_lengths[np.concatenate([example["pos"], example["neg"]])]
            assert lengths[bucket_index([longest.max()], lengths)[0]] == bucket.passage_len
            assert len(example["pos_scores"]) == len(example["neg_scores"]) == 0
            read[example["query_ids"].tobytes()] = example
    assert len(read) == NUM_RECORDS
    for e, query in enumerate(mining.examples.query_ids):
        example = read[query.tobytes()]
        np.testing.assert_array_equal(example["pos"], mining.examples.pos[e])
        np.testing.assert_array_equal(example["neg"], mining.negatives[e])
    data = DataConfig(group_size=3, token_budget=4096, max_batch_size=4)
    loader = TrainLoader([mined], data, seed=0, batch_multiple=1, pad_id=1)
    batch = loader.host_batch(LoaderPosition())
    assert batch["passage_ids"].shape[0] == 3 * batch["query_ids"].shape[0]
    kd = dataclasses.replace(data, knowledge_distillation=True)
    with pytest.raises(InputError, match=r"mined:d0_len\d+:0 \(mined: scores dropped\)"):
        TrainLoader([mined], kd, seed=0, batch_multiple=1, pad_id=1)
    # `data prepare` never takes the mined set for its own output of the same inputs.
    source_settings = PrepareSettings(tokenizer=str(prepared.embedder.tokenizer.name_or_path))
    with pytest.raises(FileExistsError, match="prepared with other settings"):
        prepare([manifest.datasets[0].source], out, source_settings, progress=False)


def test_a_candidate_pool_with_a_prepared_set(prepared):
    known = prepared.pool[5:25]
    new = [f"new passage number {i} about nothing" for i in range(6)]
    settings = MiningSettings(ranks=(0, 40), negative_number=40)
    mining = mine_prepared(
        prepared.embedder, prepared.source, settings, pool_texts=known + new, progress=False
    )
    count = prepared.source.manifest.passages
    tokenizer = prepared.embedder.tokenizer
    assert [p.tolist() for p in mining.new_passages] == tokenize(tokenizer, new, 512)
    assert len(mining.passage_lengths) == count + len(new)
    pool_ids = set(range(5, 25)) | set(range(count, count + len(new)))
    for e, negs in enumerate(mining.negatives):
        record = prepared.records[prepared.example_records[e]]
        positives = {prepared.pool.index(p) for p in record.pos}
        assert set(negs.tolist()) == pool_ids - positives


def run_mine(*argv) -> int:
    return tool_main(
        mine_command.__doc__, mine_command.add_arguments, mine_command.run, [str(a) for a in argv]
    )


def test_mine_command_on_a_prepared_set(prepared, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mined"
    args = [prepared.path, "--model", tiny_model_dir, "--output", out]
    args += ["--range", "2-20", "--negative-number", 4, "--quiet"]
    assert run_mine(*args) == 0
    captured = capsys.readouterr().out
    assert f"{NUM_RECORDS} records, pool of {len(prepared.pool)} texts" in captured
    assert f"wrote {out} (a prepared set without teacher scores)" in captured
    manifest = PreparedSet(out).manifest
    assert manifest.settings["mined"]["from"] == str(prepared.path.absolute())
    assert manifest.datasets[0].min_negatives == 4
    assert run_mine(*args) == 0  # a mined set is replaced
    assert not list(tmp_path.glob("*.incomplete"))


@pytest.mark.parametrize(
    "change, message",
    [
        ("two inputs", "a prepared set is mined by itself"),
        ("instruction", "--query-instruction: "),
        ("output exists", "exists and is not a prepared set"),
        ("output is input", "is the input set"),
        ("tokenizer", "prepared with another tokenizer than the model's"),
    ],
)
def test_mine_command_prepared_errors(prepared, tiny_model_dir, tmp_path, capsys, change, message):
    inputs, out, extra = [prepared.path], tmp_path / "out", []
    if change == "two inputs":
        inputs.append(tmp_path / "more.jsonl")
    elif change == "instruction":
        extra = ["--query-instruction", "q: "]
    elif change == "output exists":
        out.mkdir()
    elif change == "output is input":
        out = prepared.path
    else:
        data = tmp_path / "other.jsonl"
        data.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
        settings = PrepareSettings(tokenizer=str(ROOT / "train/demo_data/tokenizer"))
        inputs = [prepare([data], tmp_path / "other", settings, progress=False).out]
    code = run_mine(*inputs, "--model", tiny_model_dir, "--output", out, *extra, "--quiet")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
