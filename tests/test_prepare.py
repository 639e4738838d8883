"""`m3-jax data prepare`: jsonl -> a TFDS / ArrayRecord set that plain TFDS reads back to the
tokenizer's own ids; passages stored once; buckets by the longest passage; the same output for
any piece size and worker count; restart, no-op and refusal rules; errors at file:line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from demo_runs import ROOT
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from m3_jax.bucketing import TRAINING_LENGTHS
from m3_jax.cli.main import main as cli_main
from m3_jax.data import prepare as prepare_module
from m3_jax.data.prepare import PrepareSettings, prepare
from m3_jax.data.prepared import example_features, passage_features, read_manifest, serialize
from m3_jax.input_files import InputError
from m3_jax.tokenization import save_backend, tokenize

TOKENIZER = ROOT / "train/demo_data/tokenizer"
DEMO = ROOT / "train/demo_data/train.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo_rows() -> list[dict]:
    return [json.loads(line) for line in DEMO.read_text().splitlines()[:300]]


def settings(**kwargs) -> PrepareSettings:
    return PrepareSettings(tokenizer=str(TOKENIZER), passage_max_len=512, **kwargs)


def read_back(out: Path) -> dict[str, list[dict]]:
    """Every split's examples with passage ids resolved to token ids, through plain TFDS."""
    examples = tfds.builder_from_directory(out).as_data_source()
    passages = tfds.builder_from_directory(out / "passages").as_data_source()["train"]
    resolved = {}
    for split, source in examples.items():
        rows = []
        for i in range(len(source)):
            ex = source[i]
            rows.append(
                {
                    "query": ex["query_ids"].tolist(),
                    "pos": [passages[int(j)]["ids"].tolist() for j in ex["pos"]],
                    "neg": [passages[int(j)]["ids"].tolist() for j in ex["neg"]],
                    "scores": ex["pos_scores"].tolist() + ex["neg_scores"].tolist(),
                }
            )
        resolved[split] = rows
    return resolved


def canonical(resolved: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {k: sorted(json.dumps(r) for r in v) for k, v in resolved.items()}


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenize_and_the_saved_backend_give_the_transformers_ids(tmp_path, demo_rows, side):
    """What prepare's workers load (`save_backend`) and `tokenize` (the backend called directly)
    give transformers' own ids, truncated on the tokenizer's side."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER, truncation_side=side)
    texts = [r["query"] for r in demo_rows[:20]] + [p for r in demo_rows[:20] for p in r["neg"]]
    save_backend(tok, tmp_path / "tokenizer.json")
    saved = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for max_length in (24, 12, 3):
        want = [
            list(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]
        ]
        assert any(len(ids) == max_length for ids in want)
        assert tokenize(tok, texts, max_length) == want
        assert tokenize(saved, texts, max_length) == want
        # transformers' own calls still see their settings after ours changed the backend's
        untruncated = tok(texts)["input_ids"]
        assert max(map(len, untruncated)) > max_length


def test_serialize_writes_the_bytes_of_tfds_own_serializer():
    rng = np.random.default_rng(0)
    examples, passages = example_features(), passage_features()
    for _ in range(50):
        example = {
            "query_ids": rng.integers(0, 250_000, rng.integers(1, 30)).astype(np.int32),
            "pos": rng.integers(0, 10**9, rng.integers(1, 3)),
            "neg": rng.integers(0, 10**9, rng.integers(0, 8)),
            "pos_scores": rng.normal(size=rng.integers(0, 2)).astype(np.float32),
            "neg_scores": rng.normal(size=rng.integers(0, 8)).astype(np.float32),
        }
        assert serialize(examples, example) == examples.serialize_example(example)
        passage = {"ids": rng.integers(0, 250_000, rng.integers(0, 700)).astype(np.int32)}
        assert serialize(passages, passage) == passages.serialize_example(passage)


def test_read_back_with_plain_tfds_equals_the_tokenizer(tmp_path, demo_rows):
    rows = demo_rows[:120]
    rows[3] = {**rows[3], "prompt": "Find: "}
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "prepared"
    s = settings(query_instruction="Q: ", passage_instruction="P: ")
    result = prepare([data], out, s, progress=False)
    assert not result.already_prepared
    tok = AutoTokenizer.from_pretrained(TOKENIZER)

    def ids(text, max_len):
        return tok(text, truncation=True, max_length=max_len)["input_ids"]

    want: dict[str, list[dict]] = {}
    texts = set()
    for r in rows:
        query = ("Find: " if "prompt" in r else "Q: ") + r["query"]
        pos = [ids("P: " + p, 512) for p in r["pos"]]
        neg = [ids("P: " + p, 512) for p in r["neg"]]
        texts.update("P: " + p for p in r["pos"] + r["neg"])
        longest = max(len(x) for x in pos + neg)
        bucket = next(n for n in TRAINING_LENGTHS if n >= longest)
        want.setdefault(f"d0_len{bucket}", []).append(
            {
                "query": ids(query, 512),
                "pos": pos,
                "neg": neg,
                "scores": np.float32(r["pos_scores"] + r["neg_scores"]).tolist(),
            }
        )
    assert canonical(read_back(out)) == canonical(want)
    manifest = read_manifest(out)
    assert manifest.passages == len(texts)  # each distinct passage once
    (dataset,) = manifest.datasets
    assert dataset.records == len(rows) and dataset.first_without_scores is None
    assert {b.split: b.examples for b in dataset.buckets} == {k: len(v) for k, v in want.items()}
    for b in dataset.buckets:
        assert b.max_query_len == max(len(r["query"]) for r in want[b.split])
    assert manifest.settings["query_instruction"] == "Q: "
    assert manifest.settings["bucket_lengths"] == [128, 256, 512]


def test_pieces_and_workers_do_not_change_the_output(tmp_path, demo_rows):
    a = write_jsonl(tmp_path / "a.jsonl", demo_rows[:150])
    b = write_jsonl(tmp_path / "dir_no_in_batch_neg" / "b.jsonl", demo_rows[150:])
    whole = prepare([a, b.parent], tmp_path / "whole", settings(), progress=False)
    pieces = prepare(
        [a, b.parent], tmp_path / "pieces", settings(), num_workers=2, piece_bytes=20_000,
        progress=False,
    )  # fmt: skip
    assert canonical(read_back(tmp_path / "whole")) == canonical(read_back(tmp_path / "pieces"))
    assert whole.manifest.datasets == pieces.manifest.datasets
    assert [d.no_in_batch_neg for d in whole.manifest.datasets] == [False, True]
    assert whole.manifest.passages == pieces.manifest.passages


class Killed(Exception):
    """Stands for a kill in the middle of a prepare."""


def test_restart_keeps_finished_pieces_and_finished_output_is_a_no_op(
    tmp_path, demo_rows, monkeypatch
):
    data = write_jsonl(tmp_path / "train.jsonl", demo_rows)
    out = tmp_path / "prepared"
    real = prepare_module.scan_piece
    calls, killed = [], []

    def crash_on_third(piece, *args):
        calls.append(piece.index)
        if len(calls) == 3 and not killed:
            killed.append(piece.index)
            raise Killed
        return real(piece, *args)

    monkeypatch.setattr(prepare_module, "scan_piece", crash_on_third)
    with pytest.raises(Killed):
        prepare([data], out, settings(), piece_bytes=50_000, progress=False)
    assert not out.exists() and (tmp_path / "prepared.incomplete").is_dir()
    calls.clear()
    result = prepare([data], out, settings(), piece_bytes=50_000, progress=False)
    assert calls and calls[0] == 2, "the two finished pieces are not tokenized again"
    assert not (tmp_path / "prepared.incomplete").exists()
    calls.clear()
    again = prepare([data], out, settings(), piece_bytes=50_000, progress=False)
    assert again.already_prepared and not calls and again.manifest == result.manifest
    prepare([data], tmp_path / "fresh", settings(), piece_bytes=50_000, progress=False)
    assert canonical(read_back(out)) == canonical(read_back(tmp_path / "fresh"))
    # A leftover cut into other pieces is discarded, not mixed into the new pieces' work.
    calls.clear()
    killed.clear()
    with pytest.raises(Killed):
        prepare([data], tmp_path / "recut", settings(), piece_bytes=50_000, progress=False)
    calls.clear()
    prepare([data], tmp_path / "recut", settings(), piece_bytes=30_000, progress=False)
    assert calls[:3] == [0, 1, 2], "every piece of the new cut is tokenized"
    assert canonical(read_back(tmp_path / "recut")) == canonical(read_back(out))


def test_other_settings_or_inputs_are_refused_unless_overwrite(tmp_path, demo_rows):
    data = write_jsonl(tmp_path / "train.jsonl", demo_rows[:50])
    out = tmp_path / "prepared"
    prepare([data], out, settings(), progress=False)
    with pytest.raises(FileExistsError, match=r"query_max_len: 512 -> 64.*--overwrite"):
        prepare([data], out, settings(query_max_len=64), progress=False)
    write_jsonl(data, demo_rows[:60])
    with pytest.raises(FileExistsError, match="other input files"):
        prepare([data], out, settings(), progress=False)
    result = prepare([data], out, settings(), overwrite=True, progress=False)
    assert result.manifest.datasets[0].records == 60


def test_a_bad_line_anywhere_fails_before_anything_is_published(tmp_path, demo_rows):
    lines = [json.dumps(r) for r in demo_rows[:80]]
    lines[70] = json.dumps({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [1.0]})
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"train\.jsonl:71: field 'pos_scores'"):
        prepare([data], tmp_path / "out", settings(), piece_bytes=10_000, progress=False)
    assert not (tmp_path / "out").exists()
    blank = write_jsonl(tmp_path / "blank.jsonl", [])
    blank.write_text("\n  \n")
    with pytest.raises(InputError, match=r"blank\.jsonl: no records"):
        prepare([blank], tmp_path / "out", settings(), progress=False)
    data.write_bytes(b'{"query": "q", "pos": ["\xff"]}\n')
    with pytest.raises(InputError, match=r"train\.jsonl:1: not UTF-8"):
        prepare([data], tmp_path / "out", settings(), overwrite=True, progress=False)


def test_flag_embedding_per_file_fields(tmp_path, demo_rows):
    rows = [{**r, "type": "only_1neg", "batch_size": 4} for r in demo_rows[:20]]
    data = write_jsonl(tmp_path / "typed.jsonl", rows)
    (dataset,) = prepare([data], tmp_path / "out", settings(), progress=False).manifest.datasets
    assert (dataset.type, dataset.batch_size, dataset.train_group_size) == ("only_1neg", 4, None)
    rows[7] = {**rows[7], "batch_size": 8}
    write_jsonl(data, rows)
    with pytest.raises(InputError, match=r"typed\.jsonl:8: .*must agree"):
        prepare([data], tmp_path / "out2", settings(), progress=False)


def test_cli_prints_the_summary_then_says_nothing_to_do(tmp_path, demo_rows, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", demo_rows[:40])
    args = ["data", "prepare", str(data), "--tokenizer", str(TOKENIZER), "--out"]
    args += [str(tmp_path / "out"), "--passage-max-len", "512", "--quiet"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "40 records in 1 dataset(s)" in out and "<=128" in out
    assert cli_main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli_main([*args, "--query-max-len", "64"]) == 1
    assert "error:" in capsys.readouterr().err


def test_symmetric_types_take_the_query_instruction(tmp_path, demo_rows):
    rows = [{**r, "type": "symmetric_sts", "prompt": "Same: "} for r in demo_rows[:10]]
    data = write_jsonl(tmp_path / "sts.jsonl", rows)
    prepare([data], tmp_path / "out", settings(passage_instruction="P: "), progress=False)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    got = canonical(read_back(tmp_path / "out"))
    want = {
        json.dumps(
            [
                tok("Same: " + r["query"], truncation=True, max_length=512)["input_ids"],
                tok("Same: " + r["pos"][0], truncation=True, max_length=512)["input_ids"],
            ]
        )
        for r in rows
    }
    have = {
        json.dumps([row["query"], row["pos"][0]])
        for rows_of in read_back(tmp_path / "out").values()
        for row in rows_of
    }
    assert have == want and got
