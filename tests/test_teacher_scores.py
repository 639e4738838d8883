"""Teacher scores: index-aligned with pos / neg, equal to the teacher's own scores, and a killed
run resumes without scoring a pair twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m3_jax.cli import teacher_score
from m3_jax.cli.common import tool_main
from m3_jax.data.records import iter_records
from m3_jax.inference import M3Embedder
from m3_jax.mining import read_records
from m3_jax.reranker import Reranker
from m3_jax.teacher_scores import (
    m3_scorer,
    partial_paths,
    reranker_scorer,
    write_teacher_scores,
)
from m3_jax.tiny import build_tiny_reranker_dir

TOL = 1e-5
MANIFEST = {"teacher": "test"}


@pytest.fixture(scope="module")
def train_file(demo_train_file, tmp_path_factory) -> Path:
    """14 records with 1-2 positives and 0-3 negatives (one record has none)."""
    rows = [json.loads(line) for line in demo_train_file.read_text().splitlines()[:14]]
    for i, row in enumerate(rows):
        row["neg"] = row["neg"][: i % 4]
        if i % 3 == 0:
            row["pos"] = [*row["pos"], row["neg"][0] if row["neg"] else "an extra positive"]
        row.pop("neg_scores", None)
        row.pop("pos_scores", None)
        row["source_id"] = i  # other fields are kept
    path = tmp_path_factory.mktemp("teacher") / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory) -> Path:
    return build_tiny_reranker_dir(tmp_path_factory.mktemp("tiny_reranker") / "reranker")


@pytest.fixture(scope="module")
def reranker(reranker_dir):
    return Reranker.from_pretrained(reranker_dir, show_progress=False)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reranker_scores_are_aligned_with_pos_and_neg(train_file, reranker, tmp_path):
    objects, records = read_records([train_file])
    out = tmp_path / "scored.jsonl"
    summary = write_teacher_scores(
        objects, records, reranker_scorer(reranker), out, manifest=MANIFEST, chunk_records=4
    )
    rows = read_rows(out)
    assert summary.records == len(rows) == len(records)
    assert summary.pairs_scored == sum(len(r.pos) + len(r.neg) for r in records)
    for row, obj in zip(rows, objects, strict=True):
        assert {k: v for k, v in row.items() if not k.endswith("_scores")} == obj
        assert len(row["pos_scores"]) == len(row["pos"]) and len(row["neg_scores"]) == len(
            row["neg"]
        )
        for field, texts in (("pos_scores", row["pos"]), ("neg_scores", row["neg"])):
            for text, score in zip(texts, row[field], strict=True):
                assert score == pytest.approx(reranker.compute_score((row["query"], text)), abs=TOL)
    # The output is training data: validated records with the scores attached.
    parsed = list(iter_records(out))
    assert parsed[3].neg_scores == tuple(rows[3]["neg_scores"])
    assert not any(p.exists() for p in partial_paths(out))


def test_m3_teacher_is_the_weighted_ensemble_over_the_temperature(
    train_file, tiny_model_dir, tmp_path
):
    embedder = M3Embedder.from_pretrained(tiny_model_dir, show_progress=False)
    objects, records = read_records([train_file])
    out = tmp_path / "self.jsonl"
    write_teacher_scores(objects, records, m3_scorer(embedder), out, manifest=MANIFEST)
    rows = read_rows(out)
    row = next(r for r in rows if len(r["neg"]) == 3)
    pairs = [(row["query"], p) for p in (*row["pos"], *row["neg"])]
    parts = embedder.compute_score(pairs)
    expected = (
        np.array(parts["dense"]) + 0.3 * np.array(parts["sparse"]) + np.array(parts["colbert"])
    ) / 0.02
    np.testing.assert_allclose(row["pos_scores"] + row["neg_scores"], expected, rtol=1e-6)


def test_a_killed_run_resumes_without_scoring_a_pair_twice(train_file, reranker, tmp_path):
    objects, records = read_records([train_file])
    scorer = reranker_scorer(reranker)
    reference = tmp_path / "reference.jsonl"
    write_teacher_scores(objects, records, scorer, reference, manifest=MANIFEST, chunk_records=3)

    out = tmp_path / "scored.jsonl"
    first_run_pairs = []

    def dies_in_the_third_chunk(pairs):
        if len(first_run_pairs) >= 2:
            raise KeyboardInterrupt
        first_run_pairs.append(pairs)
        return scorer(pairs)

    with pytest.raises(KeyboardInterrupt):
        write_teacher_scores(
            objects, records, dies_in_the_third_chunk, out, manifest=MANIFEST, chunk_records=3
        )
    partial, manifest_path = partial_paths(out)
    assert not out.exists() and len(read_rows(partial)) == 6 and manifest_path.is_file()
    with open(partial, "ab") as f:  # a kill while a line was being written
        f.write(b'{"query": "torn')

    second_run_pairs = []

    def counting(pairs):
        second_run_pairs.extend(pairs)
        return scorer(pairs)

    summary = write_teacher_scores(
        objects, records, counting, out, manifest=MANIFEST, chunk_records=3
    )
    assert summary.resumed_from == 6
    scored_first = [p for chunk in first_run_pairs for p in chunk]
    all_pairs = [(r.query, p) for r in records for p in (*r.pos, *r.neg)]
    assert scored_first + second_run_pairs == all_pairs  # each pair once, in order
    assert out.read_text() == reference.read_text()
    assert not partial.exists() and not manifest_path.exists()


def test_a_partial_output_of_other_settings_is_refused(train_file, reranker, tmp_path):
    objects, records = read_records([train_file])
    out = tmp_path / "scored.jsonl"

    def dies(pairs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_teacher_scores(objects, records, dies, out, manifest=MANIFEST)
    with pytest.raises(ValueError, match="written by a run with other teacher"):
        write_teacher_scores(
            objects, records, reranker_scorer(reranker), out, manifest={"teacher": "other"}
        )


def run_cli(argv: list[str]) -> int:
    return tool_main(teacher_score.__doc__, teacher_score.add_arguments, teacher_score.run, argv)


def test_teacher_score_command(train_file, reranker_dir, reranker, tmp_path, capsys):
    out = tmp_path / "scored.jsonl"
    argv = [str(train_file), "--reranker", str(reranker_dir), "--output", str(out), "--quiet"]
    assert run_cli([*argv, "--chunk-records", "5"]) == 0
    rows = read_rows(out)
    first = rows[0]
    expected = reranker.compute_score([(first["query"], p) for p in first["pos"]])
    np.testing.assert_allclose(first["pos_scores"], expected, atol=TOL)
    assert "14 records" in capsys.readouterr().out

    assert run_cli(argv) == 1  # the output exists
    assert "exists; choose another --output" in capsys.readouterr().err
    bad = [str(train_file), "--teacher", "bert:x", "--output", str(tmp_path / "o.jsonl")]
    assert run_cli(bad) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --teacher 'bert:x': expected reranker:DIR or m3:DIR (a directory or hub id)"
    ]
