"""The `m3-jax` command line (m3_jax/cli/): help, encode, score, convert, evaluate, train.

Each command is run in-process through `main` on the tiny random model, except `train`, which
parses absl's global flags and so runs in a subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

from m3_jax.cli.encode import colbert_vectors
from m3_jax.cli.inputs import read_pairs, read_texts
from m3_jax.cli.main import build_parser, main
from m3_jax.inference import M3Embedder
from m3_jax.scores import MODES

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "a short text",
    "the quick brown fox jumps over the lazy dog",
    "x",
    "retrieval with dense sparse and multi vector embeddings in one model",
    "another passage of middling length",
    "the lazy dog sleeps",
    "one more text to fill a third shard",
]
PAIRS = [(TEXTS[0], TEXTS[1]), (TEXTS[5], TEXTS[1]), (TEXTS[2], TEXTS[3])]


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return M3Embedder.from_pretrained(tiny_model_dir, show_progress=False)


def subcommand_parsers(parser: argparse.ArgumentParser, prefix: str = ""):
    """(command path, parser) for every leaf command, e.g. ("convert to-pytorch", parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix.strip(), parser
    for action in subs:
        for name, sub in action.choices.items():
            if sub.add_help:  # train's flags are absl's; its help is tested below
                yield from subcommand_parsers(sub, f"{prefix} {name}")


# Help ------------------------------------------------------------------------------------------


def test_every_option_is_listed_with_its_default():
    parser = build_parser()
    commands = dict(subcommand_parsers(parser))
    assert sorted(commands) == [
        "convert extend-positions",
        "convert from-pytorch",
        "convert to-pytorch",
        "data prepare",
        "encode",
        "evaluate",
        "mine",
        "score",
        "teacher-score",
    ]
    assert all(name in parser.format_help() for name in ("encode", "score", "train"))
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name}: {action.dest} has no help"
            for option in action.option_strings:
                assert option in text, f"{name}: {option} missing from --help"
            if action.option_strings:
                assert f"(default: {action.default})" in text, f"{name}: {action.dest}"


def test_train_help_lists_config_keys_with_defaults(capsys):
    assert main(["train", "--config", str(ROOT / "configs/demo_cpu.py"), "--help"]) == 0
    text = capsys.readouterr().out
    assert "--config.train.num_steps=1200" in text and "--config.optim.lr=0.003" in text


def test_console_script_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["m3-jax"].partition(":")
    assert getattr(importlib.import_module(module), name) is main


def test_usage_error_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "--output", str(tmp_path), "text"])
    assert exit_info.value.code == 2
    assert "--model" in capsys.readouterr().err


# Input files -----------------------------------------------------------------------------------


def test_inputs_in_each_format(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"docid": 7, "body": "first"}\n\n{"docid": "b", "body": "second"}\n'
    )
    (tmp_path / "a.tsv").write_text("first\nsecond\n")
    (tmp_path / "b.tsv").write_text("i1\tfirst\ni2\tsecond\n")
    (tmp_path / "a.txt").write_text("first\nsecond\n")
    assert read_texts(tmp_path / "a.jsonl", "body", "docid") == (["7", "b"], ["first", "second"])
    assert read_texts(tmp_path / "a.tsv") == (["0", "1"], ["first", "second"])
    assert read_texts(tmp_path / "b.tsv") == (["i1", "i2"], ["first", "second"])
    assert read_texts(tmp_path / "a.txt") == (["0", "1"], ["first", "second"])
    (tmp_path / "p.tsv").write_text("q1\tp1\nq2\tp2\n")
    assert read_pairs(tmp_path / "p.tsv") == [("q1", "p1"), ("q2", "p2")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', ":2: field 'text': missing"),
        ("x.jsonl", '{"text": "ok"}\n{"text": "  "}\n', ":2: the 'text' field is empty"),
        ("x.jsonl", '{"text": "ok"}\n{"text": 3.5}\n', ":2: field 'text': expected str, got float"),
        ("x.jsonl", '{"text": "ok"}\nnot json\n', ":2: invalid JSON"),
        ("x.tsv", "a\tfirst\nb\t\n", ":2: the text column is empty"),
        ("x.tsv", "a\tfirst\nb\tc\td\n", ":2: 3 tab-separated columns, expected 1 or 2"),
        ("x.tsv", "a\tfirst\na\tsecond\n", ":2: id 'a' repeats"),
        ("x.csv", "a\n", "unknown input type '.csv'"),
        ("x.txt", "\n\n", "no rows"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        read_texts(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_bad_input_through_the_command(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "pairs.tsv"
    path.write_text("q\tp\nonly a query\n")
    args = ["score", "--model", str(tiny_model_dir), "--input", str(path)]
    assert main(args) == 1
    assert f"error: {path}:2: 1 tab-separated columns" in capsys.readouterr().err


# encode ----------------------------------------------------------------------------------------


def encode_args(tiny_model_dir, out: Path, *extra: str) -> list[str]:
    return ["encode", "--model", str(tiny_model_dir), "--output", str(out), "--quiet", *extra]


def test_encode_matches_the_embedder(embedder, tiny_model_dir, tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    )
    out = tmp_path / "out"
    assert main(encode_args(tiny_model_dir, out, "--input", str(path), "--shard-size", "3")) == 0
    expected = embedder.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    assert (out / "ids.txt").read_text().split() == [f"d{i}" for i in range(len(TEXTS))]
    np.testing.assert_allclose(np.load(out / "dense.npy"), expected["dense_vecs"], atol=1e-6)
    rows = [json.loads(line) for line in (out / "lexical_weights.jsonl").read_text().splitlines()]
    for row, want in zip(rows, expected["lexical_weights"], strict=True):
        assert sorted(row["lexical_weights"]) == sorted(want)
        for token, weight in want.items():
            assert abs(row["lexical_weights"][token] - weight) <= 1e-6
    got = colbert_vectors(out, range(len(TEXTS)))
    for vecs, want in zip(got, expected["colbert_vecs"], strict=True):
        np.testing.assert_allclose(vecs, want, atol=1e-6)
    assert len(list(out.glob("shard-*.npz"))) == 3


def test_encode_resumes_and_refuses_other_settings(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "texts.tsv"
    path.write_text("".join(f"t{i}\t{t}\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "out"
    args = encode_args(
        tiny_model_dir, out, "--input", str(path), "--shard-size", "2",
        "--colbert-format", "safetensors", "--sparse-format", "indices",
    )  # fmt: skip
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    shards = sorted(out.glob("shard-*.safetensors"))
    assert len(shards) == 4
    umask = os.umask(0)
    os.umask(umask)
    # safetensors writes 0600; the shards are for others to read too
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())
    # As if the run had stopped after the third shard, before writing the final files.
    shards[-1].unlink()
    for name in ("dense.npy", "lexical_weights.jsonl", "colbert_index.npy", "ids.txt"):
        (out / name).unlink()
    kept = {p: p.stat().st_mtime_ns for p in shards[:-1]}
    assert main(args) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "finished shards re-encoded"
    row = json.loads((out / "lexical_weights.jsonl").read_text().splitlines()[0])
    assert sorted(row) == ["id", "indices", "values"] and row["id"] == "t0"

    capsys.readouterr()
    assert main([*args, "--max-length", "64"]) == 1
    assert "manifest.json: this cache was written for other settings (max_length: 512 -> 64)" in (
        capsys.readouterr().err
    )


def test_encode_checks_max_length_before_writing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(encode_args(tiny_model_dir, out, "--max-length", "100000", "text")) == 1
    assert "exceeds" in capsys.readouterr().err and not (out / "manifest.json").exists()


# score -----------------------------------------------------------------------------------------


def test_score_matches_compute_score(embedder, tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{q}\t{p}\n" for q, p in PAIRS))
    args = ["score", "--model", str(tiny_model_dir), "--input", str(path), "--quiet"]
    capsys.readouterr()
    assert main([*args, "--weights", "0.4,0.2,0.4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = embedder.compute_score(PAIRS, weights_for_different_modes=[0.4, 0.2, 0.4])
    for mode in MODES:
        np.testing.assert_allclose([r[mode] for r in rows], expected[mode], atol=1e-6)


# convert, evaluate, train (each thin over code tested elsewhere) -------------------------------


def test_convert_round_trip(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    torch_dir, back = tmp_path / "torch", tmp_path / "back"
    assert main(["convert", "to-pytorch", str(tiny_model_dir), str(torch_dir), "--quiet"]) == 0
    assert (torch_dir / "colbert_linear.pt").is_file()
    assert main(["convert", "from-pytorch", str(torch_dir), str(back)]) == 0
    assert (back / "m3_jax_config.json").is_file()


def test_evaluate(tiny_model_dir, tmp_path):
    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    docs = {f"d{i}": t for i, t in enumerate(TEXTS)}
    (data / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in docs.items())
    )
    (data / "queries.jsonl").write_text('{"_id": "q0", "text": "lazy dog"}\n')
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td5\t1\n")
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--quiet"]
    assert main([*args, "--modes", "dense,sparse", "--k", "5", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert sorted(metrics) == ["dense", "sparse"]


@pytest.mark.slow
def test_train_refuses_unknown_keys_and_bad_values_before_training(tmp_path):
    """A typo'd key or a value the typed config rejects is a usage error (exit 2), raised before
    any data is read. (Whole runs through `m3-jax train` are in test_training_loop.py; the typed
    config's checks in test_configs.py.)"""
    command = [sys.executable, "-m", "m3_jax.cli", "train", "--config", "configs/demo_cpu.py"]
    command += [f"--config.workdir={tmp_path / 'run'}", "--config.loss.kd_loss_type=kl"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "kd_loss_type" in result.stderr, result.stderr[-2000:]
    typo = subprocess.run(
        [*command[:6], "--config.optim.no_such_key=1"], cwd=ROOT, capture_output=True, text=True
    )
    assert typo.returncode == 2 and "no_such_key" in typo.stderr
    assert not (tmp_path / "run").exists()


def test_train_usage_errors_exit_2(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.py")]) == 2
    assert "missing.py: no such file" in capsys.readouterr().err
