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
from demo_runs import ROOT

from m3_jax.loading import load_params

pytestmark = pytest.mark.slow  # each test starts training processes

NUM_STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def command(
    workdir: Path, train_file: Path, cache: Path, *extra: str, steps: int = NUM_STEPS
) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train/main.py"),
        f"--config={ROOT / 'configs/demo_cpu.py'}",
        f"--config.workdir={workdir}",
        f"--config.data.train_files={train_file}",
        "--config.data.passage_max_len=128",  # one bucket: one compile per process
        f"--config.train.num_steps={steps}",
        # Batch sizes and local loss groups fixed, not tied to the device count, so that the
        # run can move between 8 and 4 devices.
        "--config.data.batch_multiple=8",
        "--config.loss.num_shards=8",
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
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
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


@pytest.fixture(scope="module")
def train_file(demo_train_file) -> Path:
    return demo_train_file


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_file, xla_cache) -> dict[str, Path]:
    """NUM_STEPS steps in one process with 8 devices, and in two processes with 4 each."""
    root = tmp_path_factory.mktemp("runs")
    cache = xla_cache
    single, multi = root / "single", root / "multi"
    run([command(single, train_file, cache)], devices=8)
    port = free_port()
    distributed = [
        "--config.distributed.initialize=True",
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.num_processes=2",
    ]
    run(
        [
            command(multi, train_file, cache, *distributed, f"--config.distributed.process_id={i}")
            for i in range(2)
        ],
        devices=4,
    )
    return {"single": single, "multi": multi, "cache": cache}


def test_two_processes_train_like_one_process_with_eight_devices(runs):
    single, multi = runs["single"], runs["multi"]
    want, got = losses(single), losses(multi)
    assert len(want) == len(got) == NUM_STEPS
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    # Both wrote checkpoints of the same steps and an export of the same params.
    steps = sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["2", "3"]
    single_params = load_params(single / "export").params
    multi_params = load_params(multi / "export").params
    for a, b in zip(jax.tree.leaves(multi_params), jax.tree.leaves(single_params), strict=True):
        # Adam turns reduction-order rounding in near-zero gradients into steps of up to lr.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def test_resume_on_fewer_devices_and_hosts_continues_the_run(runs, train_file):
    # Two more steps: the 8-device run in place, the 2-process run's checkpoint in one process
    # on 4 devices.
    single, multi, cache = runs["single"], runs["multi"], runs["cache"]
    run([command(single, train_file, cache, steps=NUM_STEPS + 2)], devices=8)
    run([command(multi, train_file, cache, steps=NUM_STEPS + 2)], devices=4)
    want, got = losses(single), losses(multi)
    assert len(want) == len(got) == NUM_STEPS + 2
    for a, b in zip(got[NUM_STEPS:], want[NUM_STEPS:], strict=True):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
