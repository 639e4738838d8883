"""Export to the BGE-M3 PyTorch layout (m3_jax.convert.to_torch, m3_jax.loading,
tools/convert_to_pytorch.py).

Round trips: a PyTorch directory → m3_jax → PyTorch gives identical tensors; a model trained a
few steps by the m3_jax loop, exported from its checkpoint and loaded by
`XLMRobertaModel.from_pretrained` plus the reference head formulas (tests/torch_reference.py), gives
m3_jax's dense, sparse and colbert outputs within 1e-5 (fp32); sentence-transformers gives the
dense vectors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from demo_runs import NUM_STEPS  # noqa: E402
from torch import nn  # noqa: E402
from torch_reference import (  # noqa: E402
    TOKENIZER_FILES,
    TorchM3Reference,
    build_torch_m3_dir,
    make_texts,
    read_torch_state,
)

from m3_jax.convert.from_torch import convert_checkpoint  # noqa: E402
from m3_jax.convert.to_torch import convert_to_pytorch, export_torch_dir  # noqa: E402
from m3_jax.inference import M3Embedder  # noqa: E402
from m3_jax.loading import load_params  # noqa: E402
from m3_jax.model import model_from_params  # noqa: E402
from m3_jax.tokenization import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=80,
    max_position_embeddings=258,
    layer_norm_eps=1e-3,
)
MAX_LENGTH = 128


pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("to_torch")


@pytest.fixture(scope="module")
def torch_dir(root, tokenizer_dir):
    return build_torch_m3_dir(root / "src", tokenizer_dir, seed=3, **GEOMETRY)


@pytest.fixture(scope="module")
def model_dir(root, torch_dir):
    return convert_checkpoint(torch_dir, root / "m3_jax")


@pytest.fixture(scope="module")
def run_dir(demo_run):
    """The session's demo training run: checkpoints at steps 4, 8 and 12, and export/."""
    return demo_run[0]


class ExportedReference(TorchM3Reference):
    """The reference formulas over `XLMRobertaModel.from_pretrained(dir)` and the head files as
    written (fp32 or fp16), i.e. exactly what a transformers user loads."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer, XLMRobertaModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = XLMRobertaModel.from_pretrained(
            str(model_dir), attn_implementation="eager", add_pooling_layer=False
        ).eval()
        self.colbert_linear = self._load_head(model_dir / "colbert_linear.pt")
        self.sparse_linear = self._load_head(model_dir / "sparse_linear.pt")
        self.vocab_size = self.model.config.vocab_size
        tok = self.tokenizer
        self.unused_tokens = sorted(
            {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
        )

    @staticmethod
    def _load_head(path: Path) -> nn.Linear:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict({k: v.float() for k, v in state.items()})
        return head.eval()


def max_diffs(a: dict, b: dict) -> dict[str, float]:
    diffs = {"dense": float(np.abs(a["dense_vecs"] - b["dense_vecs"]).max())}
    lexical = 0.0
    for x, y in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        assert x.keys() == y.keys()
        lexical = max([lexical, *(abs(float(x[k]) - float(y[k])) for k in x)])
    diffs["sparse"] = lexical
    diffs["colbert"] = max(
        float(np.abs(x - y).max())
        for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True)
    )
    return diffs


# PyTorch → m3_jax → PyTorch --------------------------------------------------------------------


def test_round_trip_gives_identical_tensors(root, torch_dir, model_dir):
    out = convert_to_pytorch(model_dir, root / "back", head_dtype="float16", progress=False)
    source = {k: v for k, v in read_torch_state(torch_dir).items() if not k.startswith("pooler.")}
    exported = read_torch_state(out)
    assert exported.keys() == source.keys()
    for key, value in source.items():
        assert exported[key].dtype == torch.float32, key
        assert torch.equal(exported[key], value), key
    for head in ("colbert_linear.pt", "sparse_linear.pt"):
        a = torch.load(torch_dir / head, weights_only=True)
        b = torch.load(out / head, weights_only=True)
        assert list(b) == ["weight", "bias"]
        for key in a:
            assert b[key].dtype == torch.float16  # as requested, like the release
            assert torch.equal(a[key], b[key]), (head, key)
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (torch_dir / name).read_bytes(), name
    hf_in = json.loads((torch_dir / "config.json").read_text())
    hf_out = json.loads((out / "config.json").read_text())
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
        "bos_token_id",
        "eos_token_id",
        "hidden_act",
        "model_type",
    ):
        assert hf_out[field] == hf_in[field], field
    assert hf_out["architectures"] == ["XLMRobertaModel"] and hf_out["dtype"] == "float32"
    # And back again: the exported directory imports to the same params.
    params = load_params(model_dir).params
    again = load_params(convert_checkpoint(out, root / "again")).params
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(again), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


def test_fp32_heads_bin_file_and_sentence_transformers_files(root, model_dir):
    out = convert_to_pytorch(model_dir, root / "with_bin", write_bin=True, progress=False)
    from safetensors.torch import load_file

    safetensors = load_file(str(out / "model.safetensors"))
    pickled = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert pickled.keys() == safetensors.keys()
    assert all(torch.equal(pickled[k], safetensors[k]) for k in pickled)
    loaded = load_params(model_dir)
    config, params = loaded.config, loaded.params
    colbert = torch.load(out / "colbert_linear.pt", weights_only=True)
    assert colbert["weight"].dtype == torch.float32
    np.testing.assert_array_equal(colbert["weight"].numpy().T, params["colbert_linear"]["kernel"])
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == [
        "Transformer",
        "Pooling",
        "Normalize",
    ]
    pooling = json.loads((out / "1_Pooling/config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
    assert pooling["word_embedding_dimension"] == config.hidden_size
    st = json.loads((out / "sentence_bert_config.json").read_text())
    assert st["max_seq_length"] == config.max_length == 256


def test_export_gets_the_users_umask_not_private_modes(root, model_dir):
    """A serving container or a colleague reads the export: modes are what mkdir / open give."""
    old = os.umask(0o022)
    try:
        out = convert_to_pytorch(model_dir, root / "modes", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files
    ]


def test_sentence_transformers_gives_the_dense_embedding(root, model_dir, tokenizer_dir):
    st = pytest.importorskip("sentence_transformers")
    out = convert_to_pytorch(model_dir, root / "st", progress=False)
    texts = make_texts(load_tokenizer(tokenizer_dir), seed=5)[:8]
    model = st.SentenceTransformer(str(out), device="cpu")
    theirs = model.encode(texts, convert_to_numpy=True, batch_size=4)
    ours = M3Embedder.from_pretrained(model_dir, show_progress=False).encode(texts)["dense_vecs"]
    diff = float(np.abs(theirs - ours).max())
    print(f"max |diff| sentence-transformers vs m3_jax dense: {diff:.3g}")
    assert diff <= 1e-5


def test_refuses_a_non_empty_directory_unless_asked(root, model_dir):
    out = root / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty.*overwrite"):
        convert_to_pytorch(model_dir, out, progress=False)
    assert (out / "keep.txt").is_file()
    convert_to_pytorch(model_dir, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".busy")]  # no temp dir left


def test_bad_dtype_and_missing_source(root, model_dir):
    loaded = load_params(model_dir)
    config, params = loaded.config, loaded.params
    with pytest.raises(ValueError, match="head_dtype='bfloat16'"):
        export_torch_dir(
            config, params, root / "x", tokenizer_source=model_dir, head_dtype="bfloat16"
        )
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        convert_to_pytorch(root / "missing", root / "y")
    # Anything load_params reads is a source, a PyTorch directory too: it comes back the same.
    again = convert_to_pytorch(root / "src", root / "z", progress=False)
    for a, b in zip(
        jax.tree.leaves(load_params(root / "src").params),
        jax.tree.leaves(load_params(again).params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


# A model trained in m3_jax ---------------------------------------------------------------------


@pytest.mark.slow
def test_trained_checkpoint_matches_transformers_and_reference_heads(root, run_dir):
    src = load_params(run_dir)  # newest checkpoint
    assert src.step == NUM_STEPS
    # The checkpoint's params are exactly what the loop exported at the end.
    exported = load_params(run_dir / "export").params
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(src.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    out = convert_to_pytorch(run_dir, root / "trained", progress=False)

    embedder = M3Embedder(
        model_from_params(src.config, src.params),
        load_tokenizer(src.tokenizer_dir),
        show_progress=False,
    )
    texts = make_texts(embedder.tokenizer, seed=9)
    ours = embedder.encode(
        texts, max_length=MAX_LENGTH, return_sparse=True, return_colbert_vecs=True
    )
    theirs = ExportedReference(out).encode(texts, MAX_LENGTH)
    for output, diff in max_diffs(ours, theirs).items():
        print(f"max |diff| m3_jax vs transformers + reference heads, {output}: {diff:.3g}")
        assert diff <= 1e-5, output


@pytest.mark.slow
def test_checkpoint_steps_and_paths(root, run_dir):
    newest = load_params(run_dir / "checkpoints")
    step_dir = load_params(run_dir / "checkpoints" / "8")
    by_arg = load_params(run_dir, step=8)
    assert (newest.step, step_dir.step, by_arg.step) == (12, 8, 8)
    kernel = ("encoder", "layers", 0, "intermediate", "kernel")

    def get(params):
        for key in kernel:
            params = params[key]
        return params

    np.testing.assert_array_equal(get(step_dir.params), get(by_arg.params))
    assert not np.array_equal(get(step_dir.params), get(newest.params))  # training moved them
    with pytest.raises(ValueError, match="no checkpoint for step 7; have \\[4, 8, 12\\]"):
        load_params(run_dir, step=7)


@pytest.mark.slow
def test_run_without_export_needs_config_and_tokenizer(root, run_dir):
    bare = root / "bare_run"
    shutil.copytree(run_dir / "checkpoints", bare / "checkpoints")
    with pytest.raises(FileNotFoundError, match="--config"):
        load_params(bare)
    src = load_params(
        bare,
        config_file=run_dir / "export" / "m3_jax_config.json",
        tokenizer_dir=run_dir / "export",
    )
    assert src.step == NUM_STEPS


@pytest.mark.slow
def test_cli(root, run_dir, capsys):
    spec = importlib.util.spec_from_file_location(
        "to_pytorch", ROOT / "tools/convert_to_pytorch.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = root / "cli"
    assert cli.main([str(run_dir), str(out), "--step", "8", "--fp16-heads", "--quiet"]) == 0
    assert torch.load(out / "sparse_linear.pt", weights_only=True)["bias"].dtype == torch.float16
    assert cli.main([str(run_dir), str(out)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_sharded_checkpoint_converts_without_a_device_gather(root, torch_dir, model_dir):
    """A train state whose params are split over 8 devices restores straight to host arrays."""
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from m3_jax import checkpoint
    from m3_jax.run_dir import write_run_info
    from m3_jax.training.state import init_state

    if jax.device_count() < 8:
        pytest.skip("needs the 8 CPU devices conftest asks for")
    loaded = load_params(model_dir)
    config, params = loaded.config, loaded.params
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))

    def shard(x):
        spec = PartitionSpec("fsdp") if x.shape and x.shape[0] % 8 == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    state = init_state(jax.tree.map(shard, params), optax.adam(1e-3), seed=0)
    assert (
        len(
            state.params["encoder"]["embeddings"]["word_embeddings"][
                "embedding"
            ].sharding.device_set
        )
        == 8
    )
    run = root / "sharded_run"
    manager = checkpoint.make_manager(run / "checkpoints", keep=1, async_save=False)
    checkpoint.save(manager, 5, state, {"epoch": 0, "step": 5})
    manager.wait_until_finished()
    manager.close()
    write_run_info(run, config, str(model_dir))
    src = load_params(run)
    assert src.step == 5 and src.config == config.replace(param_dtype="float32")
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(src.params), strict=True
    ):
        assert type(b) is np.ndarray, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
    out = convert_to_pytorch(run, root / "from_sharded", progress=False)
    assert read_torch_state(out).keys() == read_torch_state(torch_dir).keys() - {
        "pooler.dense.weight",
        "pooler.dense.bias",
    }


def test_release_geometry_config_files():
    """For the bge-m3 geometry: the config.json and sentence-transformers values of the release."""
    from m3_jax.config import bge_m3
    from m3_jax.convert.to_torch import hf_config, sentence_transformers_files

    hf = hf_config(bge_m3(), "float32")
    assert (hf["max_position_embeddings"], hf["vocab_size"], hf["hidden_size"]) == (
        8194,
        250002,
        1024,
    )
    assert (hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"]) == (
        24,
        16,
        4096,
    )
    assert (hf["type_vocab_size"], hf["layer_norm_eps"], hf["pad_token_id"]) == (1, 1e-5, 1)
    assert hf["torch_dtype"] == hf["dtype"] == "float32"
    st = sentence_transformers_files(bge_m3())
    assert st["sentence_bert_config.json"]["max_seq_length"] == 8192
    assert st["1_Pooling/config.json"]["word_embedding_dimension"] == 1024
