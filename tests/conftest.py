"""Shared fixtures: a locally trained tokenizer and a tiny random m3_jax model directory."""

from __future__ import annotations

import os

# Tests never touch the network; 8 CPU devices for sharding tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from m3_jax.tiny import build_tiny_model_dir, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
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
