"""Conversion of PyTorch BGE-M3 checkpoints (m3_jax.convert.from_torch, tools/convert_from_pytorch.py).

The source checkpoints are written with PyTorch only (tests/torch_reference.py) in an odd geometry
(3 layers, 3 heads, hidden 48, 258 positions, LayerNorm eps 1e-3), so that a geometry field that
is not carried over shows up as a shape error or an output difference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_reference import (  # noqa: E402
    TOKENIZER_FILES,
    TorchM3Reference,
    build_torch_m3_dir,
    make_texts,
    read_torch_state,
    write_torch_state,
)

from m3_jax.convert.from_torch import convert_checkpoint, load_bge_m3  # noqa: E402
from m3_jax.inference import M3Embedder  # noqa: E402
from m3_jax.loading import load_params  # noqa: E402
from m3_jax.run_dir import CONFIG_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "tools" / "convert_from_pytorch.py"
GEOMETRY = dict(
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=3,
    intermediate_size=80,
    max_position_embeddings=258,
    layer_norm_eps=1e-3,
)
MAX_LENGTH = 256  # the most 258 RoBERTa positions allow
EMBEDDER_KW = dict(
    query_max_length=MAX_LENGTH,
    passage_max_length=MAX_LENGTH,
    bucket_lengths=(64, MAX_LENGTH),
    show_progress=False,
)
SEED = 7


# Fixtures --------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


@pytest.fixture(scope="module")
def build_root(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def torch_dir(build_root, tokenizer_dir):
    return build_torch_m3_dir(build_root / "src", tokenizer_dir, seed=SEED, **GEOMETRY)


@pytest.fixture(scope="module")
def converted_dir(build_root, torch_dir):
    return convert_checkpoint(torch_dir, build_root / "converted")


@pytest.fixture(scope="module")
def direct_params(torch_dir):
    config, params, _ = load_bge_m3(torch_dir)
    return config, params


@pytest.fixture(scope="module")
def texts(torch_dir):
    return make_texts(TorchM3Reference(torch_dir).tokenizer, seed=11)


@pytest.fixture
def src_copy(torch_dir, tmp_path):
    """A writable copy of the source checkpoint, to break in one way per test."""
    return Path(shutil.copytree(torch_dir, tmp_path / "src"))


def leaves(params) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def assert_same_params(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        assert la[key].dtype == np.float32, f"{key} is {la[key].dtype}"
        assert la[key].shape == lb[key].shape, key
        np.testing.assert_array_equal(la[key], lb[key], err_msg=key)


def encode_all(embedder: M3Embedder, texts) -> dict:
    return embedder.encode(
        texts, max_length=MAX_LENGTH, return_sparse=True, return_colbert_vecs=True
    )


def max_diffs(a: dict, b: dict) -> dict[str, float]:
    diffs = {"dense_vecs": float(np.abs(a["dense_vecs"] - b["dense_vecs"]).max())}
    lexical = 0.0
    for x, y in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        assert x.keys() == y.keys()
        lexical = max([lexical, *(abs(float(x[k]) - float(y[k])) for k in x)])
    diffs["lexical_weights"] = lexical
    colbert = 0.0
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True):
        assert x.shape == y.shape
        colbert = max(colbert, float(np.abs(x - y).max()))
    diffs["colbert_vecs"] = colbert
    return diffs


# A converted directory -------------------------------------------------------------------------


def test_converted_dir_layout(converted_dir, tokenizer_dir):
    assert (converted_dir / CONFIG_FILE).is_file()
    assert (converted_dir / "params").is_dir()
    for name in TOKENIZER_FILES:
        assert (converted_dir / name).read_bytes() == (Path(tokenizer_dir) / name).read_bytes()
    # Nothing of the PyTorch checkpoint is needed any more.
    assert not list(converted_dir.glob("*.pt")) and not list(converted_dir.glob("*.bin"))


def test_config_geometry_carried_over(converted_dir, torch_dir):
    hf = json.loads((torch_dir / "config.json").read_text())
    ours = json.loads((converted_dir / CONFIG_FILE).read_text())
    for field in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
        "pad_token_id",
        "eos_token_id",
    ):
        assert ours[field] == hf[field], field
    assert ours["cls_token_id"] == hf["bos_token_id"]
    assert ours["hidden_size"] == 48 and ours["layer_norm_eps"] == 1e-3  # not the defaults
    assert ours["colbert_dim"] <= 0 or ours["colbert_dim"] == hf["hidden_size"]


def test_converted_params_equal_direct_load(converted_dir, direct_params):
    config, params = direct_params
    loaded = load_params(converted_dir)
    loaded_config, loaded = loaded.config, loaded.params
    assert loaded_config == config
    assert_same_params(loaded, params)


def test_fp16_heads_upcast_exactly(converted_dir, torch_dir):
    params = load_params(converted_dir).params
    for name, ours in (("colbert_linear", 48), ("sparse_linear", 1)):
        state = torch.load(torch_dir / f"{name}.pt", weights_only=True)
        assert state["weight"].dtype == torch.float16  # as in the release
        kernel = np.asarray(params[name]["kernel"])
        bias = np.asarray(params[name]["bias"])
        assert kernel.dtype == bias.dtype == np.float32
        assert kernel.shape == (48, ours)
        np.testing.assert_array_equal(kernel, state["weight"].float().numpy().T)
        np.testing.assert_array_equal(bias, state["bias"].float().numpy())


def test_converted_outputs_match_torch_dir_and_reference(converted_dir, torch_dir, texts):
    from_converted = M3Embedder.from_pretrained(converted_dir, **EMBEDDER_KW)
    from_torch = M3Embedder.from_pretrained(torch_dir, **EMBEDDER_KW)
    a, b = encode_all(from_converted, texts), encode_all(from_torch, texts)
    for output, diff in max_diffs(a, b).items():
        print(f"max |diff| converted vs torch dir, {output}: {diff:.3g}")
        assert diff <= 1e-6, output

    # And the odd geometry (3 heads of 16, eps 1e-3) against the PyTorch reference; measured
    # differences reach 8e-6 here (test_parity.py holds the 1e-5 parity checks).
    ref = TorchM3Reference(torch_dir).encode(texts, MAX_LENGTH)
    for output, diff in max_diffs(a, ref).items():
        print(f"max |diff| converted vs PyTorch reference, {output}: {diff:.3g}")
        assert diff <= 2e-5, output


# Accepted variants of the source ---------------------------------------------------------------


def test_pooler_is_ignored(src_copy, direct_params):
    """save_pretrained of XLMRobertaModel writes pooler.dense.*, which M3 never uses: a source
    without them, or with pooler tensors of any shape, loads to the same params."""
    state = read_torch_state(src_copy)
    pooler = {k: state.pop(k) for k in ("pooler.dense.weight", "pooler.dense.bias")}
    write_torch_state(src_copy, state)
    assert_same_params(load_bge_m3(src_copy)[1], direct_params[1])
    write_torch_state(src_copy, {**state, **{k: torch.zeros(3) for k in pooler}})
    assert_same_params(load_bge_m3(src_copy)[1], direct_params[1])


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_masked_lm_checkpoint_accepted(build_root, tokenizer_dir, direct_params, serialization):
    """XLMRobertaForMaskedLM keys: 'roberta.' prefix and lm_head.*; same encoder weights."""
    src = build_torch_m3_dir(
        build_root / f"mlm_{serialization}",
        tokenizer_dir,
        seed=SEED,
        serialization=serialization,
        masked_lm=True,
        **GEOMETRY,
    )
    keys = set(read_torch_state(src))
    assert "roberta.embeddings.word_embeddings.weight" in keys
    assert any(k.startswith("lm_head.") for k in keys)
    assert not any(k.startswith(("embeddings.", "encoder.")) for k in keys)
    config, params, _ = load_bge_m3(src)
    assert config == direct_params[0]
    assert_same_params(params, direct_params[1])


def test_pytorch_model_bin_accepted(build_root, tokenizer_dir, direct_params):
    src = build_torch_m3_dir(
        build_root / "bin", tokenizer_dir, seed=SEED, serialization="bin", **GEOMETRY
    )
    assert (src / "pytorch_model.bin").is_file() and not (src / "model.safetensors").exists()
    _, params, _ = load_bge_m3(src)
    assert_same_params(params, direct_params[1])


def test_fresh_heads_when_both_head_files_are_missing(src_copy, tmp_path, direct_params, texts):
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        (src_copy / name).unlink()
    with pytest.raises(FileNotFoundError, match="fresh_heads"):
        convert_checkpoint(src_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    out = convert_checkpoint(src_copy, tmp_path / "out", fresh_heads=True)
    params = load_params(out).params
    ours, theirs = leaves(params), leaves(direct_params[1])
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key.startswith("['encoder']"):
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
        else:
            assert ours[key].shape == theirs[key].shape and np.isfinite(ours[key]).all()
            assert not np.array_equal(ours[key], theirs[key]), f"{key} was not freshly made"


# Errors ----------------------------------------------------------------------------------------


def _delete(*names):
    def mutate(src: Path) -> None:
        for name in names:
            (src / name).unlink()

    return mutate


def _edit_state(edit):
    def mutate(src: Path) -> None:
        state = read_torch_state(src)
        edit(state)
        write_torch_state(src, state)

    return mutate


ERROR_CASES = {
    "no config.json": (_delete("config.json"), FileNotFoundError, ["config.json"]),
    "no weights": (
        _delete("model.safetensors"),
        FileNotFoundError,
        ["model.safetensors", "pytorch_model.bin"],
    ),
    "no sparse head": (
        _delete("sparse_linear.pt"),
        FileNotFoundError,
        ["sparse_linear.pt", "colbert_linear.pt"],
    ),
    "no colbert head": (
        _delete("colbert_linear.pt"),
        FileNotFoundError,
        ["colbert_linear.pt", "sparse_linear.pt"],
    ),
    "no heads": (
        _delete("colbert_linear.pt", "sparse_linear.pt"),
        FileNotFoundError,
        ["colbert_linear.pt", "sparse_linear.pt", "fresh_heads"],
    ),
    "unknown key": (
        _edit_state(
            lambda s: s.__setitem__("encoder.layer.1.attention.self.rotary.weight", torch.ones(4))
        ),
        ValueError,
        ["encoder.layer.1.attention.self.rotary.weight"],
    ),
    "missing key": (
        _edit_state(lambda s: s.pop("encoder.layer.2.output.dense.bias")),
        ValueError,
        ["encoder.layer.2.output.dense.bias", "missing"],
    ),
    "wrong shape": (
        _edit_state(
            lambda s: s.__setitem__("encoder.layer.0.intermediate.dense.weight", torch.ones(64, 48))
        ),
        ValueError,
        ["encoder.layer.0.intermediate.dense.weight", "(64, 48)", "(80, 48)"],
    ),
    "transposed": (
        _edit_state(
            lambda s: s.__setitem__("encoder.layer.1.output.dense.weight", torch.ones(80, 48))
        ),
        ValueError,
        ["encoder.layer.1.output.dense.weight", "(80, 48)", "(48, 80)"],
    ),
    # Same number of elements as the right shape: a reshape alone would not notice.
    "wrong query shape": (
        _edit_state(
            lambda s: s.__setitem__(
                "encoder.layer.0.attention.self.query.weight", torch.ones(24, 96)
            )
        ),
        ValueError,
        ["encoder.layer.0.attention.self.query.weight", "(24, 96)", "(48, 48)"],
    ),
    "wrong head shape": (
        lambda src: torch.save(
            torch.nn.Linear(48, 2).half().state_dict(), src / "sparse_linear.pt"
        ),
        ValueError,
        ["sparse_linear.pt", "(2, 48)", "(1, 48)"],
    ),
    "unknown head key": (
        lambda src: torch.save(
            {**torch.load(src / "colbert_linear.pt", weights_only=True), "scale": torch.ones(1)},
            src / "colbert_linear.pt",
        ),
        ValueError,
        ["colbert_linear.pt", "scale"],
    ),
    "bad config.json": (
        lambda src: (src / "config.json").write_text('{"hidden_size": 48,\n oops}'),
        ValueError,
        ["config.json", ":2"],
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_checkpoint_errors_name_the_problem(src_copy, tmp_path, case):
    mutate, error, fragments = ERROR_CASES[case]
    mutate(src_copy)
    with pytest.raises(error) as info:
        load_bge_m3(src_copy)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error: {message}"
    out = tmp_path / "out"
    with pytest.raises(error):
        convert_checkpoint(src_copy, out)
    assert not out.exists(), "a failed conversion left an output directory behind"


@pytest.mark.parametrize("missing", ["./nope", "nope/deeper/still", "/definitely/not/here"])
def test_missing_local_path(tmp_path, missing, monkeypatch):
    """Local-looking paths never go to the hub (hub ids are not tested: no network)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope|not/here"):
        load_bge_m3(missing)
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(missing, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        M3Embedder.from_pretrained(missing)


def test_non_empty_output_dir_is_refused(torch_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(torch_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


# The command line tool -------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    if not CLI.is_file():
        pytest.skip(f"{CLI.relative_to(ROOT)} does not exist yet")
    return subprocess.run(
        [sys.executable, str(CLI), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_cli_converts(torch_dir, tmp_path, direct_params):
    result = run_cli(str(torch_dir), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    params = load_params(tmp_path / "out").params
    assert_same_params(params, direct_params[1])


def test_cli_fresh_heads_flag(src_copy, tmp_path):
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        (src_copy / name).unlink()
    refused = run_cli(str(src_copy), str(tmp_path / "refused"))
    assert refused.returncode != 0
    assert "--fresh-heads" in refused.stderr and "colbert_linear.pt" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "refused").exists()
    done = run_cli(str(src_copy), str(tmp_path / "out"), "--fresh-heads")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / CONFIG_FILE).is_file()
