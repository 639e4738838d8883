"""configs/*.py: every config loads with its variants, and the tpu_v4 recipe runs end to end on
CPU (splash falls back to chunked attention) once it points at an imported model."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_keeps_every_base_key(name):
    base = importlib.import_module("configs.base").get_config()
    c = importlib.import_module(f"configs.{name}").get_config()
    flat = lambda d: set(json.loads(d.to_json_best_effort()))  # noqa: E731
    assert flat(c) == flat(base)
    for section in ("model", "data", "loss", "mesh", "optim", "train"):
        assert set(c[section].keys()) == set(base[section].keys()), section


def test_accelerator_recipes():
    tpu = importlib.import_module("configs.tpu_v4")
    gpu = importlib.import_module("configs.gpu")
    c = tpu.get_config()
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)
    assert c.model.attention_impl == "splash" and c.model.dtype == "bfloat16"
    assert c.data.batch_size_preset == "flag_embedding" and c.data.batch_multiple == -1
    assert not c.distributed.initialize and tpu.get_config("pod").distributed.initialize
    assert gpu.get_config().model.attention_impl == "cudnn"
    assert gpu.get_config("multi").distributed.initialize
    with pytest.raises(ValueError, match="':pod'"):
        tpu.get_config("v5")
