"""Two processes with `jax.distributed` on localhost (4 CPU devices each, CPU collectives over
gloo), each reading its own slice of every global batch, train exactly like one process with 8
devices: the same losses at every step and the same exported params. Their checkpoint then
resumes in one process on 4 devices and continues like the 8-device run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import CHEAP_CPU_COMPILES
from demo_runs import ROOT

from m3_jax.loading import load_params
from m3_jax.run_dir import checkpoint_steps

pytestmark = pytest.mark.slow  # each test starts training processes

NUM_STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def command(
    workdir: Path,
    train_file: Path,
    cache: Path,
    *extra: str,
    steps: int = NUM_STEPS,
) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train/main.py"),
        f"--config={ROOT / 'configs/demo_cpu.py'}",
        f"--config.workdir={workdir}",
        f"--config.data.train_files={train_file}",
        f"--config.data.cache_dir={workdir.parent / 'data_cache'}",  # prepared by each host
        "--config.data.passage_max_len=128",  # one bucket: one compile per process
        f"--config.train.num_steps={steps}",
        # Batch sizes and local loss groups fixed, not tied to the device count, so that the
        # run can move between 8 and 4 devices.
        "--config.data.batch_multiple=8",
        "--config.loss.num_shards=8",
        # The tolerances below bound reduction-order rounding carried through Adam steps, which
        # grows with the step size: they are set for this learning rate, not the demo's.
        "--config.optim.lr=1e-3",
        "--config.train.log_every=1",
        "--config.train.save_every=2",
        "--config.train.progress=False",
        f"--config.train.compilation_cache_dir={cache}",
        "--config.train.peak_flops_per_s=1e11",
        "--config.eval.heldout_file=",
        f"--config.model.tokenizer={ROOT / 'train/demo_data/tokenizer'}",
        *extra,
    ]


def run(commands: list[list[str]], devices: int, timeout: float = 600) -> None:
    # XLA's optimisations on, as in real runs: the comparison across device layouts is at fp32
    # rounding, and unoptimised programs round reductions differently on 4 and 8 devices.
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CHEAP_CPU_COMPILES}",
        JAX_DISABLE_MOST_OPTIMIZATIONS="0",
    )
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]


def losses(workdir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k.startswith("loss/")} for row in rows]


def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(
    tmp_path, demo_train_file, xla_cache
):
    """NUM_STEPS steps in two processes of 4 devices equal NUM_STEPS in one process of 8
    devices; both runs then go on for two more steps, the two-process run's checkpoint in one
    process on 4 devices, and stay equal. (One test, so that pytest-xdist runs the four launches
    once, on one worker.)"""
    single, multi = tmp_path / "single", tmp_path / "multi"
    run([command(single, demo_train_file, xla_cache)], devices=8)
    port = free_port()
    distributed = [
        "--config.distributed.initialize=True",
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.num_processes=2",
    ]
    run(
        [
            command(
                multi, demo_train_file, xla_cache, *distributed,
                f"--config.distributed.process_id={i}",
            )
            for i in range(2)
        ],
        devices=4,
    )  # fmt: skip
    assert_same_losses(losses(multi), losses(single), NUM_STEPS)
    # Both processes wrote the same checkpoints (a periodic one and the last) and one export.
    assert checkpoint_steps(multi) == [2, NUM_STEPS]
    assert_params_close(load_params(multi / "export").params, load_params(single / "export").params)

    # Two more steps: the 8-device run in place, the two-process run on 4 devices in one process.
    # (A longer run has another learning-rate schedule, so the reference is extended too.)
    total = NUM_STEPS + 2
    run([command(single, demo_train_file, xla_cache, steps=total)], devices=8)
    run([command(multi, demo_train_file, xla_cache, steps=total)], devices=4)
    assert_same_losses(losses(multi)[NUM_STEPS:], losses(single)[NUM_STEPS:], 2)
    assert_params_close(load_params(multi / "export").params, load_params(single / "export").params)


def assert_same_losses(got: list[dict], want: list[dict], count: int) -> None:
    assert len(got) == len(want) == count
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


def assert_params_close(got, want) -> None:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # Adam turns reduction-order rounding in near-zero gradients into steps of up to lr.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
