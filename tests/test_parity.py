"""M3Embedder against the independent PyTorch reference (tests/torch_reference.py).

A tiny BGE-M3-layout checkpoint is written with PyTorch only (safetensors and pytorch_model.bin,
the same weights), loaded by `M3Embedder.from_pretrained` and compared with FlagEmbedding's
inference path run in fp32 PyTorch: dense vectors, lexical weights, colbert vectors and all five
`compute_score` outputs, over texts of 1 to ~500 tokens in several scripts, with heavy padding,
truncation, and "xla" and "chunked" attention.

Run with `pytest -s tests/test_parity.py` to see the measured max abs differences.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from torch_reference import (  # noqa: E402
    SCORE_MODES,
    TorchM3Reference,
    build_torch_m3_dir,
    make_texts,
    sentencepiece_ids,
)

from m3_jax.convert.from_torch import load_bge_m3  # noqa: E402
from m3_jax.inference import M3Embedder  # noqa: E402
from m3_jax.model import model_from_params  # noqa: E402
from m3_jax.tokenization import load_tokenizer, tokenize  # noqa: E402

TOL = 1e-5
MAX_LENGTH = 512
REF_BATCH = 4  # the reference's plain sequential batches, each padded to its longest text
CHUNK = 16  # chunked attention with blocks much shorter than the inputs

# Few bucket lengths keep the number of compiled programs (about 1 s each) down.
BUCKETS = (32, 128, 512)
# name -> (checkpoint format, embedder options)
VARIANTS = {
    "safetensors/xla": ("safetensors", dict(attention_impl="xla", bucket_lengths=BUCKETS)),
    # One 512-token bucket and 4-row batches: a 3-token text is padded to 512.
    "bin/xla/padded": ("bin", dict(attention_impl="xla", bucket_lengths=(512,), batch_size=4)),
    "safetensors/chunked16": (
        "safetensors",
        dict(attention_impl="chunked", chunk_size=CHUNK, bucket_lengths=BUCKETS),
    ),
}
SCORE_LENGTHS = dict(max_query_length=32, max_passage_length=128)

MAX_DIFFS: dict[str, float] = {}


def record(name: str, value: float) -> None:
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), float(value))
    print(f"max |diff| {name}: {value:.3g}")


@pytest.fixture(scope="module", autouse=True)
def full_precision_matmuls():
    """fp32 parity at 1e-5 needs true fp32 matmuls (a no-op on CPU; GPUs default to TF32)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", autouse=True)
def diff_summary():
    yield
    if not MAX_DIFFS:
        return
    by_output: dict[str, float] = {}
    for name, value in MAX_DIFFS.items():
        output = name.split(" [")[0]
        by_output[output] = max(by_output.get(output, 0.0), value)
    lines = [f"  {name:<48} {value:.3g}" for name, value in sorted(MAX_DIFFS.items())]
    lines += ["  per output (over all variants):"]
    lines += [f"    {name:<46} {value:.3g}" for name, value in sorted(by_output.items())]
    print("\nPyTorch parity, max abs differences (tolerance 1e-5):\n" + "\n".join(lines))


# Fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_dirs(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_torch")
    return {
        fmt: build_torch_m3_dir(root / fmt, tokenizer_dir, seed=1, serialization=fmt)
        for fmt in ("safetensors", "bin")
    }


@pytest.fixture(scope="module")
def references(torch_dirs):
    return {fmt: TorchM3Reference(path) for fmt, path in torch_dirs.items()}


@pytest.fixture(scope="module")
def texts(references):
    """Test texts ordered so that every reference batch mixes short and long texts."""
    by_length = sorted(make_texts(references["safetensors"].tokenizer, seed=3), key=len)
    mixed = []
    while by_length:
        mixed.append(by_length.pop(0))
        if by_length:
            mixed.append(by_length.pop())
    return mixed


@pytest.fixture(scope="module")
def pairs(texts):
    """(query, passage) pairs: short/long both ways, identical texts, shared and disjoint words."""
    n = len(texts)
    index_pairs = [(0, 1), (1, 0), (2, n - 1), (n - 1, 2), (3, 3), (4, 7), (5, 6), (n - 2, n - 3)]
    index_pairs += [(i, (i + 5) % n) for i in range(0, n, 3)]
    out = [(texts[i], texts[j]) for i, j in index_pairs]
    shared = "абв гд " + texts[3]
    out += [("абв абв ζηθ", shared), (shared, "абв абв ζηθ 的一是")]
    # <unk> on both sides must not match (a special id); <mask> on both sides does match.
    unk_text = next(t for t in texts if "😀" in t)
    mask_text = next(t for t in texts if "<mask>" in t)
    out += [("😀 ☃ абв", unk_text), ("<mask> ζηθ", mask_text)]
    return out


@pytest.fixture(scope="module")
def embedder(torch_dirs):
    """embedder(variant) -> M3Embedder, built once per variant."""
    _embedders: dict[str, M3Embedder] = {}

    def get(variant: str) -> M3Embedder:
        if variant not in _embedders:
            fmt, options = VARIANTS[variant]
            options = dict(options)
            chunk_size = options.pop("chunk_size", None)
            if chunk_size is None:
                _embedders[variant] = M3Embedder.from_pretrained(
                    torch_dirs[fmt], show_progress=False, **options
                )
            else:
                # from_pretrained takes no chunk size: build the model from the loaded params.
                impl = options.pop("attention_impl")
                config, params, src = load_bge_m3(
                    torch_dirs[fmt], attention_impl=impl, attention_chunk_size=chunk_size
                )
                model = model_from_params(config, params)
                _embedders[variant] = M3Embedder(
                    model, load_tokenizer(src), show_progress=False, **options
                )
        return _embedders[variant]

    return get


# Comparison helpers ----------------------------------------------------------------------------


def compare_encode(ours: dict, ref: dict, tag: str) -> None:
    assert ours["dense_vecs"].shape == ref["dense_vecs"].shape
    assert ours["dense_vecs"].dtype == np.float32
    diff = np.abs(ours["dense_vecs"] - ref["dense_vecs"]).max()
    record(f"dense_vecs [{tag}]", diff)
    assert diff <= TOL, f"dense differs by {diff}"

    assert len(ours["lexical_weights"]) == len(ref["lexical_weights"])
    lex_diff = 0.0
    for i, (a, b) in enumerate(zip(ours["lexical_weights"], ref["lexical_weights"], strict=True)):
        only_ours, only_ref = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        assert not only_ours and not only_ref, (
            f"text {i}: lexical keys differ; only ours {only_ours}, only reference {only_ref}"
        )
        for key in a:
            assert isinstance(key, str) and key.isdigit(), f"lexical key {key!r} is not an id"
            lex_diff = max(lex_diff, abs(float(a[key]) - float(b[key])))
    record(f"lexical_weights [{tag}]", lex_diff)
    assert lex_diff <= TOL, f"lexical weights differ by {lex_diff}"

    col_diff = 0.0
    for i, (a, b) in enumerate(zip(ours["colbert_vecs"], ref["colbert_vecs"], strict=True)):
        assert a.shape == b.shape, f"text {i}: colbert shape {a.shape}, reference {b.shape}"
        col_diff = max(col_diff, float(np.abs(a - b).max()))
    record(f"colbert_vecs [{tag}]", col_diff)
    assert col_diff <= TOL, f"colbert vectors differ by {col_diff}"


def compare_scores(ours: dict, ref: dict, tag: str) -> None:
    assert set(ours) == set(SCORE_MODES)
    for mode in SCORE_MODES:
        a, b = np.asarray(ours[mode], np.float64), np.asarray(ref[mode], np.float64)
        assert a.shape == b.shape, f"{mode}: {a.shape} scores, reference {b.shape}"
        diff = float(np.abs(a - b).max())
        record(f"compute_score {mode} [{tag}]", diff)
        assert diff <= TOL, f"compute_score[{mode!r}] differs by {diff}"


def encode_all(embedder: M3Embedder, texts, max_length: int) -> dict:
    return embedder.encode(
        texts,
        max_length=max_length,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )


# The fixture itself is informative -------------------------------------------------------------


def test_outputs_are_informative(references, embedder, texts):
    """m3_jax's outputs on the parity checkpoint are varied enough for parity to mean anything,
    drop <unk> from the lexical weights and have unit-norm ColBERT rows."""
    ref = references["safetensors"]
    lengths = [len(ids) for ids in ref.tokenizer(texts)["input_ids"]]
    assert min(lengths) == 3, "no text of a single content token"
    assert max(lengths) > MAX_LENGTH, "no text long enough to be truncated at 512"
    out = encode_all(embedder("safetensors/xla"), texts, MAX_LENGTH)

    dense = out["dense_vecs"]
    cosine = dense @ dense.T
    off_diagonal = cosine[~np.eye(len(texts), dtype=bool)]
    assert off_diagonal.min() < 0.9, "dense vectors are nearly identical for all texts"

    kept = sum(len(d) for d in out["lexical_weights"])
    distinct = sum(
        len(set(ids) - set(ref.unused_tokens)) for ids in ref.tokenizer(texts)["input_ids"]
    )
    share = kept / distinct
    assert 0.2 < share < 0.95, f"{share:.0%} of distinct tokens have a positive sparse weight"
    values = np.concatenate([np.fromiter(d.values(), np.float32) for d in out["lexical_weights"]])
    assert values.std() > 0.05, "sparse weights are nearly constant"

    # <unk> (characters outside the vocab) appears in the input but never in the dict.
    unk = str(ref.tokenizer.unk_token_id)
    assert any(ref.tokenizer.unk_token_id in ids for ids in ref.tokenizer(texts)["input_ids"])
    assert all(unk not in d for d in out["lexical_weights"])

    rows = np.concatenate(out["colbert_vecs"])
    assert np.allclose(np.linalg.norm(rows, axis=-1), 1.0, atol=1e-5)
    assert (rows @ rows.T).min() < 0.0, "colbert vectors all point the same way"


# Tokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [MAX_LENGTH, 16, 3])
def test_tokenizer_ids_match_hf_and_sentencepiece(
    embedder, references, torch_dirs, texts, max_length
):
    ours = tokenize(embedder("safetensors/xla").tokenizer, texts, max_length)
    hf = references["safetensors"].tokenizer(texts, truncation=True, max_length=max_length)
    assert ours == [list(ids) for ids in hf["input_ids"]]
    spm = [sentencepiece_ids(torch_dirs["safetensors"], t, max_length) for t in texts]
    assert ours == spm
    assert all(ids[0] == 0 and ids[-1] == 2 and len(ids) <= max_length for ids in ours)


# encode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_parity(embedder, references, texts, variant):
    fmt = VARIANTS[variant][0]
    ref = references[fmt].encode(texts, MAX_LENGTH, REF_BATCH)
    ours = encode_all(embedder(variant), texts, MAX_LENGTH)
    compare_encode(ours, ref, variant)


@pytest.mark.parametrize("variant", ["safetensors/xla", "bin/xla/padded", "safetensors/chunked16"])
@pytest.mark.parametrize("max_length", [16, 3])
def test_encode_truncation_parity(embedder, references, texts, variant, max_length):
    fmt = VARIANTS[variant][0]
    ref = references[fmt].encode(texts, max_length, REF_BATCH)
    ours = encode_all(embedder(variant), texts, max_length)
    assert max(len(v) for v in ours["colbert_vecs"]) == max_length - 1
    compare_encode(ours, ref, f"{variant} max_length={max_length}")


def test_encode_single_text(embedder, references, texts):
    """A single string gives single items, equal to the reference's."""
    text = texts[-1]
    ref = references["safetensors"].encode([text], MAX_LENGTH, 1)
    ours = encode_all(embedder("safetensors/xla"), text, MAX_LENGTH)
    assert ours["dense_vecs"].ndim == 1 and isinstance(ours["lexical_weights"], dict)
    batched = {k: (v[None] if k == "dense_vecs" else [v]) for k, v in ours.items()}
    compare_encode(batched, ref, "safetensors/xla single")


def test_encode_is_batch_independent(embedder, texts):
    """Padding and batch mates do not change a text's outputs (beyond float noise)."""
    alone = encode_all(embedder("safetensors/xla"), texts[:1], MAX_LENGTH)
    together = encode_all(embedder("bin/xla/padded"), texts, MAX_LENGTH)
    diff = np.abs(alone["dense_vecs"][0] - together["dense_vecs"][0]).max()
    record("dense_vecs [alone vs padded batch]", diff)
    assert diff <= TOL
    assert alone["lexical_weights"][0].keys() == together["lexical_weights"][0].keys()


# compute_score ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compute_score_parity(embedder, references, pairs, variant):
    fmt = VARIANTS[variant][0]
    ref = references[fmt].compute_score(pairs, batch_size=REF_BATCH, **SCORE_LENGTHS)
    ours = embedder(variant).compute_score(pairs, **SCORE_LENGTHS)
    compare_scores(ours, ref, variant)
    # Informational: FlagEmbedding's batched maxsim floors each query token at 0 when the passage
    # is padded; we (and its unpadded colbert_score) do not.
    quirk = float(np.abs(np.subtract(ref["colbert"], ref["colbert_batched"])).max())
    print(f"reference colbert: unpadded vs batched (padding floor) max |diff| {quirk:.3g}")
    assert max(ref["sparse"]) > 0.1 and min(ref["sparse"]) == 0.0, "pairs lack lexical variety"


def test_compute_score_weights(embedder, references, pairs):
    """README weights [0.4, 0.2, 0.4] in the two combinations."""
    weights = [0.4, 0.2, 0.4]
    ref = references["safetensors"].compute_score(
        pairs, weights_for_different_modes=weights, batch_size=REF_BATCH, **SCORE_LENGTHS
    )
    ours = embedder("safetensors/xla").compute_score(
        pairs, weights_for_different_modes=weights, **SCORE_LENGTHS
    )
    compare_scores(ours, ref, "safetensors/xla weights=[0.4,0.2,0.4]")


def test_compute_score_long_passages(embedder, references, pairs):
    """Passages up to 512 tokens, queries up to 64, every pair padded to those lengths."""
    kw = dict(max_query_length=64, max_passage_length=MAX_LENGTH)
    ref = references["bin"].compute_score(pairs, batch_size=REF_BATCH, **kw)
    ours = embedder("bin/xla/padded").compute_score(pairs, **kw)
    compare_scores(ours, ref, "bin/xla/padded 64/512")
