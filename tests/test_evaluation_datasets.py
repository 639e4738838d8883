"""BEIR / MIRACL / held-out loaders (m3_jax.evaluation.datasets): contents and error messages."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from m3_jax.evaluation.datasets import (
    RetrievalDataset,
    load_beir,
    load_dataset,
    load_heldout,
    load_miracl,
    write_beir,
)
from m3_jax.input_files import InputError


def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def beir(tmp_path) -> Path:
    write_lines(
        tmp_path / "corpus.jsonl",
        [
            {"_id": "d1", "title": "Title one", "text": "first text"},
            {"_id": 2, "title": "", "text": "second text"},
            {"_id": "d3", "text": "third"},
        ],
    )
    write_lines(
        tmp_path / "queries.jsonl",
        [
            {"_id": "q1", "text": "query one"},
            {"_id": "q2", "text": "query two"},
            {"_id": "q3", "text": "x"},
        ],
    )
    write_lines(
        tmp_path / "qrels" / "test.tsv",
        ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\t2\t2", "q2\td3\t0", "q2\tgone\t1"],
    )
    return tmp_path


def test_beir(beir):
    ds = load_beir(beir)
    assert ds.doc_ids == ["d1", "2", "d3"]
    assert ds.doc_texts == ["Title one first text", "second text", "third"]
    assert ds.query_ids == ["q1", "q2"]  # q3 has no judgments
    assert ds.qrels == {"q1": {"d1": 1, "2": 2}, "q2": {"d3": 0, "gone": 1}}
    assert load_dataset(beir).name == ds.name
    again = load_beir(write_beir(ds, beir.parent / "copy"))
    assert (again.doc_ids, again.doc_texts, again.qrels) == (ds.doc_ids, ds.doc_texts, ds.qrels)
    assert ds.subset(1).query_ids == ["q1"] and list(ds.subset(1).qrels) == ["q1"]


@pytest.mark.parametrize(
    "file, line, message",
    [
        ("corpus.jsonl", '{"_id": "d9", "text": ', "corpus.jsonl:4: invalid JSON"),
        ("corpus.jsonl", '{"_id": "d9"}', "corpus.jsonl:4: field 'text': missing"),
        (
            "corpus.jsonl",
            '{"_id": "d1", "text": "again"}',
            "corpus.jsonl:4: duplicate document id 'd1'",
        ),
        (
            "corpus.jsonl",
            '{"_id": "d9", "text": 5}',
            "corpus.jsonl:4: field 'text': expected str, got int",
        ),
        ("queries.jsonl", '["a list"]', "queries.jsonl:4: expected a JSON object"),
        ("qrels/test.tsv", "q1\td1", "test.tsv:6: expected 3 columns, got 2"),
        ("qrels/test.tsv", "q1\td1\tyes", "test.tsv:6: relevance 'yes' is not an integer"),
        ("qrels/test.tsv", "q9\td1\t1", "judged queries \\['q9'\\] are not in the queries file"),
    ],
)
def test_beir_errors_name_file_line_and_field(beir, file, line, message):
    with (beir / file).open("a") as f:
        f.write(line + "\n")
    with pytest.raises(InputError, match=message):
        load_beir(beir)


def test_default_split_is_test_or_the_only_one(beir):
    (beir / "qrels" / "test.tsv").rename(beir / "qrels" / "dev.tsv")
    assert load_dataset(beir).name.endswith("/dev")
    (beir / "qrels" / "train.tsv").write_text("q1\td1\t1\n")
    with pytest.raises(FileNotFoundError, match="no qrels for split 'test'"):
        load_dataset(beir)
    assert load_dataset(beir, "train").qrels == {"q1": {"d1": 1}}


def test_missing_files(beir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no qrels for split 'dev' \\(have \\['test'\\]\\)"):
        load_beir(beir, "dev")
    with pytest.raises(FileNotFoundError, match="neither BEIR"):
        load_dataset(tmp_path / "qrels")


def test_miracl_layout(tmp_path):
    root = tmp_path / "miracl-v1.0-sw"
    write_lines(
        root / "corpus" / "docs-0.jsonl.gz",
        [
            {"docid": "1#0", "title": "Nairobi", "text": "mji mkuu"},
            {"docid": "1#1", "title": "", "text": "b"},
        ],
    )
    write_lines(root / "topics" / "topics.miracl-v1.0-sw-dev.tsv", ["7\tmji mkuu ni nini", "8\tx"])
    write_lines(root / "topics" / "topics.miracl-v1.0-sw-train.tsv", ["1\tother"])
    write_lines(root / "qrels" / "qrels.miracl-v1.0-sw-dev.tsv", ["7 Q0 1#0 1", "7\tQ0\t1#1\t0"])
    ds = load_dataset(root)
    assert ds.doc_ids == ["1#0", "1#1"] and ds.doc_texts[0] == "Nairobi mji mkuu"
    assert ds.query_ids == ["7"] and ds.query_texts == ["mji mkuu ni nini"]
    assert ds.qrels == {"7": {"1#0": 1, "1#1": 0}}
    with pytest.raises(FileNotFoundError, match="expected one topics file ending in 'test.tsv'"):
        load_miracl(root, "test")
    write_lines(root / "qrels" / "qrels.miracl-v1.0-sw-dev.tsv", ["7 Q0 1#0"])
    with pytest.raises(InputError, match="dev.tsv:1: expected 4 columns"):
        load_miracl(root)


def test_heldout(tmp_path):
    heldout = write_lines(
        tmp_path / "h.jsonl", [{"query_id": "q", "query": "text", "qrels": {"a": 1}, "pos": []}]
    )
    corpus = write_lines(
        tmp_path / "c.jsonl", [{"id": "a", "text": "doc a"}, {"id": "b", "text": "b"}]
    )
    ds = load_heldout(heldout, corpus)
    assert isinstance(ds, RetrievalDataset) and ds.qrels == {"q": {"a": 1}}
    write_lines(heldout, [{"query_id": "q", "query": "text", "qrels": {"a": "high"}}])
    with pytest.raises(InputError, match="h.jsonl:1: field 'qrels' must map doc ids to integers"):
        load_heldout(heldout, corpus)


def test_shipped_demo_beir_directory_is_the_heldout_set():
    demo = Path(__file__).resolve().parents[1] / "train/demo_data"
    heldout = load_heldout(demo / "heldout.jsonl", demo / "heldout_corpus.jsonl")
    beir = load_dataset(demo / "heldout_beir")
    assert len(beir.query_ids) == 200
    for field in ("doc_ids", "doc_texts", "query_ids", "query_texts", "qrels"):
        assert getattr(beir, field) == getattr(heldout, field), field
