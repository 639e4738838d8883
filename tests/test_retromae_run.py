"""RetroMAE pre-training runs (`objective="retromae"`, configs/demo_cpu_retromae.py cut down to
seconds): plain-text records, the export (encoder + fresh heads + MLM head), bitwise-exact
resume, and the init from a model directory with extended positions."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import demo_cpu_retromae
from m3_jax.config import RunConfig
from m3_jax.inference import M3Embedder
from m3_jax.loading import load_params
from m3_jax.model import RetroMAEModel
from m3_jax.run_dir import MLM_HEAD_DIR, restore_mlm_head, save_model_dir
from m3_jax.tiny import random_params
from m3_jax.training.loop import load_initial_model, train

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "train" / "demo_data" / "texts.jsonl"


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    out.write_text("".join(TEXTS.read_text(encoding="utf-8").splitlines(True)[:160]))
    return out


def config(workdir: Path, texts: Path, cache: Path, steps: int) -> RunConfig:
    c = demo_cpu_retromae.get_config()
    c.workdir = str(workdir)
    c.data.train_files = str(texts)
    c.data.cache_dir = str(workdir.parent / "data_cache")
    c.data.passage_max_len = 128
    c.train.num_steps = steps
    c.train.save_every = 3
    c.train.log_every = 1
    c.train.progress = False
    c.train.compilation_cache_dir = str(cache)
    c.train.peak_flops_per_s = 1e11
    c.eval.heldout_file = ""
    return RunConfig.from_config_dict(c)


def leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, texts_file, xla_cache):
    workdir = tmp_path_factory.mktemp("retromae") / "run"
    return workdir, train(config(workdir, texts_file, xla_cache, 6))


def test_run_learns_and_exports_the_encoder_and_mlm_head(uninterrupted):
    workdir, summary = uninterrupted
    assert summary["final_step"] == 6
    assert set(summary["final_losses"]) == {"loss/encoder", "loss/decoder", "loss/loss"}
    export = Path(summary["export"])
    assert (export / MLM_HEAD_DIR).is_dir()
    state = load_params(workdir)  # the newest checkpoint: its encoder and MLM head
    exported = load_params(export)
    assert state.mlm_head is not None and set(state.params) == set(exported.params)
    assert leaves(exported.params["encoder"]).keys() == leaves(state.params["encoder"]).keys()
    for key, value in leaves(state.params["encoder"]).items():
        np.testing.assert_array_equal(leaves(exported.params["encoder"])[key], value, key)
    for key, value in leaves(state.mlm_head).items():
        np.testing.assert_array_equal(leaves(exported.mlm_head)[key], value, key)
    vectors = M3Embedder.from_pretrained(export, show_progress=False).encode(["a b c", "d e"])
    assert np.isfinite(vectors["dense_vecs"]).all()


def test_resume_is_bitwise_exact(uninterrupted, tmp_path, texts_file, xla_cache):
    """The run's checkpoint of step 3 trained on to step 6 gives the uninterrupted params: the
    masks of every batch come from its rows' seeds, not from the order batches were made."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    for later in ("checkpoints/6", "export", "summary.json"):
        path = workdir / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    summary = train(config(workdir, texts_file, xla_cache, 6))  # resumes from step 3
    assert summary["final_step"] == 6
    before, after = load_params(uninterrupted[0]), load_params(workdir)
    assert after.step == 6
    want = leaves({"encoder": before.params["encoder"], "lm_head": before.mlm_head})
    got = leaves({"encoder": after.params["encoder"], "lm_head": after.mlm_head})
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_init_from_a_model_dir_with_mlm_head_and_longer_positions(tiny_model_dir, tmp_path):
    """model.init_from + model.max_length: positions tiled, the MLM head kept, a fresh decoder."""
    loaded = load_params(tiny_model_dir)
    head = random_params(loaded.config, seed=3, model_class=RetroMAEModel)["lm_head"]
    source = save_model_dir(
        tmp_path / "src", loaded.config, loaded.params, tiny_model_dir, mlm_head=head
    )
    c = demo_cpu_retromae.get_config()
    c.model.init_from = str(source)
    c.model.tokenizer = ""
    c.model.max_length = 700
    model_config, params, _ = load_initial_model(RunConfig.from_config_dict(c))
    assert model_config.max_position_embeddings == 702
    assert params["encoder"]["embeddings"]["position_embeddings"]["embedding"].shape[0] == 702
    for key, value in leaves(restore_mlm_head(source, loaded.config)).items():
        np.testing.assert_array_equal(leaves(params["lm_head"])[key], value, key)
    assert set(params) == {"encoder", "lm_head", "decoder"}
