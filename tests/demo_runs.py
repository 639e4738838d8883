"""Small training runs of the demo config, shared by the tests that train.

`demo_config` is the demo recipe cut down to seconds: the first 240 demo records (two length
buckets), 12 steps, a checkpoint every 4, no held-out evaluation. The session fixture `demo_run`
(conftest.py) trains it once; the loop, export and conversion tests all read that run.
"""

from __future__ import annotations

from pathlib import Path

from configs import demo_cpu

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 12
SAVE_EVERY = 4
# The keys demo_config changes, as command-line overrides of configs/demo_cpu.py.
OVERRIDDEN = [
    "workdir", "data.train_files", "data.cache_dir", "data.passage_max_len", "train.num_steps",
    "train.save_every", "train.log_every", "train.progress", "train.compilation_cache_dir",
    "train.peak_flops_per_s", "eval.heldout_file", "model.tokenizer",
]  # fmt: skip


def demo_config(workdir: Path, train_file: Path, cache: Path):
    c = demo_cpu.get_config()
    c.workdir = str(workdir)
    c.data.train_files = str(train_file)
    c.data.cache_dir = str(workdir.parent / "data_cache")
    c.data.passage_max_len = 256
    c.train.num_steps = NUM_STEPS
    c.train.save_every = SAVE_EVERY
    c.train.log_every = 1
    c.train.progress = False
    c.train.compilation_cache_dir = str(cache)
    c.train.peak_flops_per_s = 1e11
    c.eval.heldout_file = ""
    return c


def overrides(c) -> list[str]:
    """`--config.KEY=VALUE` for every key demo_config sets."""
    out = []
    for key in OVERRIDDEN:
        value = c
        for part in key.split("."):
            value = value[part]
        out.append(f"--config.{key}={value}")
    return out
