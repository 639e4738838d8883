"""The first hour's mistakes through the real command line: each ends in one `error:` line that
says what and where, with exit code 1 (bad input) or 2 (bad command line), and nothing written.
(Resume refusals and stop signals are in test_training_loop.py, which trains.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from m3_jax.cli.train import load_config, report, resume_command

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs/demo_cpu.py"
GOOD = '{"query": "q", "pos": ["p"], "neg": ["n"]}\n'


def command_line(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def assert_one_error_line(result: subprocess.CompletedProcess, code: int, *parts: str) -> str:
    """The run's exit code is `code` and stderr ends in one `error:` line holding every part,
    with no traceback before it."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr[-3000:]
    assert all(part in errors[0] for part in parts), errors[0]
    assert "\\n" not in errors[0]
    return errors[0]


def train_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "train/main.py"),
        f"--config={DEMO_CONFIG}",
        f"--config.workdir={tmp_path / 'run'}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (GOOD + '{"query": "q2", "neg": ["n"]}\n', "bad.jsonl:2: field 'pos'"),
        (GOOD.encode() + b'{"query": "caf\xe9", "pos": ["p"]}\n', "bad.jsonl:2: not UTF-8"),
    ],
    ids=["missing field", "not utf-8"],
)
def test_bad_training_data(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = command_line(train_args(tmp_path, f"--config.data.train_files={bad}"), tmp_path)
    assert_one_error_line(result, 1, message)
    assert not (tmp_path / "run").exists()
    published = [p for p in (tmp_path / "cache").glob("*") if not p.name.endswith(".incomplete")]
    assert not published


def test_not_utf8_text_to_encode(tiny_model_dir, tmp_path):
    bad = tmp_path / "texts.txt"
    bad.write_bytes(b"first\ncaf\xe9\n")
    out = tmp_path / "out"
    args = ["-m", "m3_jax.cli", "encode", "--model", str(tiny_model_dir), "--input", str(bad)]
    result = command_line([*args, "--output", str(out), "--quiet"], tmp_path)
    assert_one_error_line(result, 1, f"{bad}:2: not UTF-8 (byte 0xe9 at column 4)")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optim.lrr=1", "config.optim has no key 'lrr' (did you mean 'lr'?)"),
        ("--config.optm.lr=1", "config has no key 'optm' (did you mean 'optim'?)"),
        ("--config.optim.lr.x=1", "config.optim.lr is a value, not a section"),
        ("--config.optim.lr=fast", "could not convert string to float: 'fast'"),
    ],
)
def test_config_mistakes_are_usage_errors(tmp_path, override, message):
    result = command_line(train_args(tmp_path, override), tmp_path)
    assert_one_error_line(result, 2, message)
    assert not (tmp_path / "run").exists()


def test_shipped_config_finds_its_data_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_config(str(DEMO_CONFIG))
    for path in (c.model.tokenizer, c.data.train_files, c.eval.heldout_file, c.eval.corpus_file):
        assert Path(path).exists(), path
    assert c.workdir == "runs/demo_cpu"  # the run itself goes where the command runs


def test_resume_command_is_the_command_run():
    argv = ["--config", "configs/demo_cpu.py", "--config.workdir=runs/a b"]
    assert resume_command("train/main.py", argv) == (
        "python train/main.py --config configs/demo_cpu.py '--config.workdir=runs/a b'"
    )
    assert resume_command("m3-jax train", argv[:2]) == "m3-jax train --config configs/demo_cpu.py"


def test_end_of_run_report_names_every_output(tmp_path):
    summary = {
        "final_step": 1200,
        "train_seconds": 421.7,
        "final_losses": {"loss/loss": 1.5, "loss/dense": 0.25},
        "eval_before": {"dense/ndcg@10": 0.128, "sparse/ndcg@10": 0.163},
        "eval_after": {"dense/ndcg@10": 0.384, "sparse/ndcg@10": 0.523},
        "export": str(tmp_path / "export"),
        "best": {"step": 1000, "colbert+sparse+dense/ndcg@10": 0.66, "dir": str(tmp_path / "best")},
    }
    text = report(summary, tmp_path)
    assert "trained 1200 steps in 422 s" in text
    assert "loss/loss 1.5000, loss/dense 0.2500" in text
    assert any(line.split() == ["dense/ndcg@10", "0.1280", "0.3840"] for line in text.splitlines())
    for name in ("export", "best", "summary.json"):
        assert str(tmp_path / name) in text
    assert "step 1000, colbert+sparse+dense/ndcg@10 0.6600" in text
