"""m3_jax.config.run and configs/*.py: every config file builds a valid typed RunConfig, every
key is documented, and bad keys or values fail with a message that names them."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from m3_jax.config import DataConfig, LossConfig, RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
VARIANTS = {
    "tpu_v4": ["pod"],
    "tpu_v4_retromae": ["pod"],
    "tpu_v4_unsupervised": ["pod"],
    "gpu": ["multi"],
    "demo_cpu": ["pipeline"],
}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_builds_a_typed_config(name):
    module = importlib.import_module(f"configs.{name}")
    for arg in [None, *VARIANTS.get(name, [])]:
        c = module.get_config(arg)
        run = RunConfig.from_config_dict(c)
        # The typed config holds every key of the file, unchanged (lists become tuples).
        assert RunConfig.from_config_dict(run.to_config_dict()) == run
        assert run.to_config_dict().to_dict() == ConfigDict(c).to_dict()
    if VARIANTS.get(name) in (["pod"], ["multi"]):
        assert module.get_config(VARIANTS[name][0]).distributed.initialize
        assert not module.get_config().distributed.initialize
        with pytest.raises(ValueError, match=f"':{VARIANTS[name][0]}'"):
            module.get_config("v5")


def test_every_key_is_documented():
    rows = RunConfig().doc_lines()
    assert len({key for key, _, _ in rows}) == len(rows) > 80
    assert all(doc for _, _, doc in rows), [key for key, _, doc in rows if not doc]


def test_unknown_keys_and_bad_values_are_errors():
    c = RunConfig().to_config_dict()
    c.optim.lrr = 1.0
    with pytest.raises(ValueError, match=r"unknown config keys \['optim.lrr'\]"):
        RunConfig.from_config_dict(c)
    c = RunConfig().to_config_dict()
    c.optm = ConfigDict({"lr": 1.0})
    with pytest.raises(ValueError, match=r"unknown config keys \['optm'\]"):
        RunConfig.from_config_dict(c)
    with pytest.raises(ValueError, match="kd_loss_type"):
        RunConfig.from_config_dict({"loss": {"kd_loss_type": "kl"}})
    with pytest.raises(ValueError, match="eval.mode"):
        RunConfig.from_config_dict({"eval": {"mode": "best"}})
    with pytest.raises(ValueError, match=r"data.instruction_format '\{1\}\{0\}'.*then the text"):
        RunConfig.from_config_dict({"data": {"instruction_format": "{1}{0}"}})
    with pytest.raises(ValueError, match="at least 3"):
        DataConfig(query_max_len=2)


def test_sections_keep_their_types():
    run = RunConfig.from_config_dict(
        {"data": {"passage_buckets": [128, 512]}, "model": {"geometry": {"hidden_size": 32}}}
    )
    assert run.data.passage_buckets == (128, 512)
    assert run.model.geometry == {"hidden_size": 32}
    assert run.loss == LossConfig()
