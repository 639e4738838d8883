"""The training loop end to end on a tiny config: resume after SIGKILL / SIGTERM is bitwise
exact, every bucket compiles once up front, bad data and non-finite losses stop cleanly."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from demo_runs import NUM_STEPS, ROOT, SAVE_EVERY, demo_config, overrides

from m3_jax.checkpoint import CheckpointError
from m3_jax.config import RunConfig
from m3_jax.input_files import InputError
from m3_jax.loading import load_params
from m3_jax.run_dir import save_model_dir
from m3_jax.training.loop import NonFiniteLossError, check_same_plan, train


@pytest.fixture(scope="module")
def train_file(demo_train_file) -> Path:
    return demo_train_file


@pytest.fixture(scope="module")
def cache(xla_cache) -> Path:
    return xla_cache


@pytest.fixture(scope="module")
def uninterrupted(demo_run):
    return demo_run


def export_params(workdir: Path):
    return load_params(workdir / "export").params


def assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def main_command(c) -> list[str]:
    main = [sys.executable, str(ROOT / "train/main.py"), f"--config={ROOT / 'configs/demo_cpu.py'}"]
    return main + overrides(c)


def wait_for_checkpoint(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    target = workdir / "checkpoints" / str(step)
    while not target.is_dir():
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_uninterrupted_run_learns_and_compiles_each_bucket_once(uninterrupted):
    workdir, summary = uninterrupted
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    losses = [r["loss/loss"] for r in records]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert all(np.isfinite(r["mfu"]) and r["tokens_per_s"] > 0 for r in records)
    shapes = summary["compile_seconds"]
    assert len(shapes) >= 2, "the data should span more than one bucket"
    assert summary["final_step"] == NUM_STEPS


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill_is_bitwise_exact(
    tmp_path, caplog, train_file, cache, uninterrupted
):
    """SIGTERM saves and exits; SIGKILL loses nothing saved before it; the run then finishes
    with exactly the uninterrupted run's params. The first launch goes through train/main.py,
    the second through `m3-jax train` (the same command), the last calls `train()` here."""
    c = demo_config(tmp_path / "run", train_file, cache)
    console = [
        sys.executable,
        "-m",
        "m3_jax.cli",
        "train",
        f"--config={ROOT / 'configs/demo_cpu.py'}",
    ]
    for command, step, sig in (
        (main_command(c), SAVE_EVERY, signal.SIGTERM),
        (console + overrides(c), 2 * SAVE_EVERY, signal.SIGKILL),
    ):
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_for_checkpoint(tmp_path / "run", step, proc)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig)
        # SIGTERM arrives at step 4 or later and saves the step it stops at, then says how to
        # resume: the command as it was run.
        resume = f"to resume, rerun: python {shlex.join(command[1:])}".encode()
        assert (b"stopped by SIGTERM after saving step" in err) == (sig == signal.SIGTERM)
        assert (resume in err) == (sig == signal.SIGTERM)
        assert (b"resumed from step" in err) == (sig == signal.SIGKILL)
        assert not (tmp_path / "run" / "export").exists()
    with caplog.at_level(logging.INFO, logger="m3_jax.training.loop"):
        summary = train(RunConfig.from_config_dict(c))
    assert "resumed from step 8" in caplog.text and summary["final_step"] == NUM_STEPS
    assert_bitwise_equal(export_params(tmp_path / "run"), export_params(uninterrupted[0]))


def copy_of_run(run: Path, out: Path) -> Path:
    """A copy of a finished run without its export, so that finishing it again exports."""
    shutil.copytree(run, out)
    shutil.rmtree(out / "export")
    return out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["array file", "metadata"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(
    tmp_path, caplog, train_file, cache, uninterrupted, damage
):
    """A finished checkpoint with a truncated file does not restore: the run says so, sets it
    aside, resumes from the step before and ends with the uninterrupted run's params."""
    run = copy_of_run(uninterrupted[0], tmp_path / "run")
    newest = run / "checkpoints" / str(NUM_STEPS)
    truncate(largest_array_file(newest) if damage == "array file" else newest / "state/_METADATA")
    unfinished = run / "checkpoints" / f"{NUM_STEPS + SAVE_EVERY}.orbax-checkpoint-tmp-1"
    shutil.copytree(newest, unfinished)  # a later save that a crash cut short
    with caplog.at_level(logging.INFO, logger="m3_jax"):
        summary = train(RunConfig.from_config_dict(demo_config(run, train_file, cache)))
    assert f"checkpoint {newest} does not restore" in caplog.text
    assert f"ignoring unfinished checkpoints in {run / 'checkpoints'}" in caplog.text
    assert f"resumed from step {NUM_STEPS - SAVE_EVERY}" in caplog.text
    assert (run / "unreadable_checkpoints" / str(NUM_STEPS) / "state").is_dir()
    assert summary["final_step"] == NUM_STEPS
    assert_bitwise_equal(export_params(run), export_params(uninterrupted[0]))


@pytest.mark.slow
def test_resume_with_no_restorable_checkpoint_is_one_error(
    tmp_path, train_file, cache, uninterrupted
):
    run = copy_of_run(uninterrupted[0], tmp_path / "run")
    for step in range(SAVE_EVERY, NUM_STEPS + 1, SAVE_EVERY):
        truncate(run / "checkpoints" / str(step) / "state/_METADATA")
    pattern = rf"no checkpoint in {run / 'checkpoints'} restores \(step {NUM_STEPS}: .*workdir"
    with pytest.raises(CheckpointError, match=pattern):
        train(RunConfig.from_config_dict(demo_config(run, train_file, cache)))
    assert not (run / "unreadable_checkpoints").exists()  # nothing moved: settings may be the cause


@pytest.mark.slow
def test_a_dead_sparse_head_is_measured_and_warned_about_once(
    tmp_path, caplog, train_file, cache, uninterrupted
):
    """The trained demo model with its sparse bias far below zero: every sparse weight is 0 (the
    ReLU is dead), the health metric says so and the run warns once."""
    loaded = load_params(uninterrupted[0] / "export")
    params = jax.tree.map(np.asarray, loaded.params)
    params["sparse_linear"]["bias"] = np.full_like(params["sparse_linear"]["bias"], -1e3)
    dead = tmp_path / "dead"
    save_model_dir(dead, loaded.config, params, loaded.tokenizer_dir)
    c = demo_config(tmp_path / "run", train_file, cache)
    c.model.init_from = str(dead)
    c.data.passage_max_len = 128  # one bucket to compile
    c.train.num_steps = c.train.save_every = 3
    with caplog.at_level(logging.INFO, logger="m3_jax"):
        train(RunConfig.from_config_dict(c))
    assert caplog.text.count("the sparse head is collapsing: 0.00% of content tokens") == 1
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/loss" in r]
    assert len(steps) == 3 and all(r["health/sparse_active"] == 0.0 for r in steps)
    assert all(0.0 < r["health/dense_cosine"] < 1.0 for r in steps)


def test_malformed_data_fails_before_writing(tmp_path, cache):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n{"query": "q2", "neg": ["n"]}\n')
    workdir = tmp_path / "run"
    with pytest.raises(InputError, match=r"bad\.jsonl:2.*pos"):
        train(RunConfig.from_config_dict(demo_config(workdir, bad, cache)))
    assert not workdir.exists()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, train_file, cache):
    c = demo_config(tmp_path / "run", train_file, cache)
    c.data.passage_max_len = 128  # one bucket to compile
    c.optim.lr = 1e30
    c.optim.max_grad_norm = 0.0
    c.optim.warmup_steps = 0
    c.train.save_every = 1
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step"):
        train(RunConfig.from_config_dict(c))
    steps = sorted(
        int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()
    )
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss/loss"]) for m in metrics)
    assert steps and steps[-1] == len(metrics)


@pytest.mark.slow
def test_periodic_evaluation_keeps_the_best_params_and_dev_loss(tmp_path, train_file, cache):
    c = demo_config(tmp_path / "run", train_file, cache)
    c.data.passage_max_len = 128  # one bucket: one train and one eval program to compile
    c.train.num_steps, c.eval.every = 4, 2
    c.eval.loss_files = str(train_file)
    c.eval.metric = "score"
    scores = iter([0.1, 0.9, 0.5])  # before training, step 2, the end (step 4)
    seen = []

    def eval_fn(config, params, tokenizer_dir):
        seen.append(float(np.asarray(params["sparse_linear"]["bias"]).sum()))
        assert Path(tokenizer_dir, "tokenizer.json").is_file()
        return {"score": next(scores)}

    summary = train(RunConfig.from_config_dict(c), eval_fn)
    assert summary["best"]["step"] == 2 and summary["best"]["score"] == 0.9
    assert len(set(seen)) == 3, "each evaluation sees the params of its step"
    info = json.loads((tmp_path / "run/best/best.json").read_text())
    assert info["step"] == 2 and info["metrics"]["score"] == 0.9
    best = load_params(tmp_path / "run/best").params
    assert float(np.asarray(best["sparse_linear"]["bias"]).sum()) == pytest.approx(seen[1])
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/score" in r]
    assert [(r["step"], r["eval/score"]) for r in evals] == [(0, 0.1), (2, 0.9), (4, 0.5)]
    assert 0 < evals[1]["eval/dev_loss/loss"] < 100
    assert summary["eval_before"]["dev_loss/loss"] > summary["eval_after"]["dev_loss/loss"]
    assert summary["eval_after"]["dev_loss/loss"] == evals[2]["eval/dev_loss/loss"]
    assert (tmp_path / "run/model_info/m3_jax_config.json").is_file()


@pytest.mark.slow
def test_flag_embedding_types_and_no_in_batch_neg_train_one_program_each(
    tmp_path, train_file, cache
):
    """An only_1neg file and a `*no_in_batch_neg` directory: one compiled program per batch
    shape (group size 2 with in-batch negatives; the run's group without), both trained."""
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    one = tmp_path / "retrieval" / "one.jsonl"
    own = tmp_path / "qa_no_in_batch_neg" / "own.jsonl"
    for path, part in [(one, rows[:120]), (own, rows[120:])]:
        path.parent.mkdir()
        extra = {"type": "only_1neg"} if path == one else {}
        path.write_text("".join(json.dumps({**r, **extra}) + "\n" for r in part))
    c = demo_config(tmp_path / "run", train_file, cache)
    c.data.train_files = f"{one.parent},{own.parent}"
    c.data.passage_max_len = 128  # one length bucket per dataset
    c.train.num_steps = 6
    summary = train(RunConfig.from_config_dict(c))
    group = c.data.group_size
    labels = sorted(label.split("_g")[1] for label in summary["compile_seconds"])
    assert labels == sorted(["2", f"{group}_no_in_batch_neg"])
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(np.isfinite(r["loss/loss"]) for r in records)


@pytest.mark.slow
def test_resume_with_another_batch_plan_names_the_change(tmp_path, train_file, cache):
    c = demo_config(tmp_path / "run", train_file, cache)
    c.data.passage_max_len = 128  # one bucket to compile
    c.train.num_steps = c.train.save_every = 2
    train(RunConfig.from_config_dict(c))
    saved = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    # Other batch sizes: (epoch, step) would name other batches. Through the command line.
    command = [*main_command(c), "--config.train.num_steps=4", "--config.data.batch_multiple=16"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume: the checkpoint's batch plan differs"), last
    assert "changed settings: data.batch_multiple -1 -> 16" in last
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == saved


def test_plan_check_hints_at_batch_multiple_when_devices_change():
    class FakeLoader:
        steps_per_epoch = 3

        def bucket_shapes(self):
            return [(12, 32, 128)]

    settings = {"data.batch_multiple": -1, "seed": 0, "data_parallel_size": 4}
    saved = {
        "epoch": 0,
        "step": 1,
        "plan": {
            "bucket_shapes": [[16, 32, 128]],
            "data_parallel_size": 8,
            "settings": {**settings, "data_parallel_size": 8},
        },
    }
    with pytest.raises(ValueError, match="data_parallel_size 8 -> 4.*batch_multiple=8"):
        check_same_plan(saved, FakeLoader(), settings)
    saved["plan"]["bucket_shapes"] = [[12, 32, 128]]
    check_same_plan(saved, FakeLoader(), settings)  # same batches: resuming on 4 devices is fine
