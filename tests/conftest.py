"""Shared fixtures: a locally trained tokenizer and a tiny random m3_jax model directory.

The environment set here is inherited by every process the tests start (training runs,
multi-process runs, notebook kernels):
- no network; 8 CPU devices for the sharding tests;
- XLA's backend optimisations off, and its older CPU fusion emitters (about half the compile
  time of the new ones): the tests check numbers, not speed, and on these tiny programs the
  optimisation passes cost more compile time than they ever save;
- one persistent compilation cache for the whole run, so a program compiled by one test or
  process (a train step, say, before and after a resume) is read back by the others;
- MTEB's result cache in a temporary directory.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CHEAP_CPU_COMPILES = "--xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CHEAP_CPU_COMPILES}")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="m3_jax_tests_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# `import mteb` creates its result cache directory (default ~/.cache/mteb): keep it in /tmp.
os.environ.setdefault("MTEB_CACHE", tempfile.mkdtemp(prefix="m3_jax_tests_mteb_"))

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from demo_runs import demo_config  # noqa: E402

from m3_jax.config import RunConfig  # noqa: E402
from m3_jax.tiny import build_tiny_model_dir, train_tokenizer  # noqa: E402
from m3_jax.training.loop import train  # noqa: E402


@pytest.fixture(scope="session")
def xla_cache() -> Path:
    """The session's persistent compilation cache (what `train.compilation_cache_dir` points to
    in the tests' training runs)."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def demo_train_file(tmp_path_factory) -> Path:
    """The first 240 records of the bundled demo training data (a few length buckets)."""
    root = Path(__file__).resolve().parents[1]
    lines = (root / "train/demo_data/train.jsonl").read_text().splitlines()[:240]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def full_precision_matmuls():
    """Comparisons with fp32 PyTorch need true fp32 matmuls (a no-op on CPU; GPUs use TF32)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_train_file, xla_cache) -> tuple[Path, dict]:
    """(run directory, summary) of one uninterrupted `demo_config` run, trained once per session:
    checkpoints at steps 4, 8 and 12, metrics.jsonl, model_info/ and export/. Read it, never
    write to it (copy it first)."""
    workdir = tmp_path_factory.mktemp("demo_run") / "run"
    summary = train(RunConfig.from_config_dict(demo_config(workdir, demo_train_file, xla_cache)))
    return workdir, summary


# Each pytest-xdist worker builds its own session fixtures (tokenizers, tiny models, the demo
# run); past a few workers that duplication costs more than the extra cores give.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's worksteal, worker i starts on the i-th contiguous share of the
    collection: deal the slow tests (processes, notebooks) round-robin to the shares' fronts, so
    that they run side by side rather than one after another on one worker."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    slow = [item for item in items if item.get_closest_marker("slow")]
    fast = [item for item in items if not item.get_closest_marker("slow")]
    order = []
    for share in range(workers):
        # The share sizes worksteal hands out: what is left, split evenly over the workers left.
        size = (len(items) - len(order)) // (workers - share)
        front = slow[share::workers]
        take = max(0, size - len(front))
        order += front + fast[:take]
        fast = fast[take:]
    items[:] = order + fast
