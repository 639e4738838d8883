"""M3Embedder on the tiny model directory: bucket invariance, formats, scores, errors, MCLS."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from m3_jax.bucketing import BucketSpec, plan_batches
from m3_jax.inference import M3Embedder
from m3_jax.loading import load_params
from m3_jax.model import model_from_params
from m3_jax.tokenization import insert_mcls, load_tokenizer

TOL = dict(rtol=1e-5, atol=1e-5)
SPECIALS = {0, 1, 2, 3}

TEXTS = [
    "hello world abc",
    "Привет мир как дела у тебя сегодня",
    "中国人民 大学",
    "αβγ δεζ",
    "ab ab ab ab ab cd cd",
    "the quick brown fox jumps over the lazy dog",
    "x",
    "مرحبا بالعالم",
    "lorem ipsum dolor sit amet, lorem ipsum dolor sit amet",
]
PAIRS = [
    ("hello world", "hello world abc and more"),
    ("ab cd", "ab ab ab ab ab cd cd"),
    ("中国人民", "中国人民 大学 北京"),
    ("the lazy dog", "Привет мир как дела"),
    ("αβγ", "the quick brown fox αβγ"),
]


# Fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """(config, params, model, tokenizer) straight from the directory, not through M3Embedder."""
    loaded = load_params(tiny_model_dir)
    config, params = loaded.config, loaded.params
    return config, params, model_from_params(config, params), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return M3Embedder.from_pretrained(tiny_model_dir, show_progress=False)


def make_embedder(loaded, **kwargs) -> M3Embedder:
    _, _, model, tokenizer = loaded
    return M3Embedder(model, tokenizer, show_progress=False, **kwargs)


def n_tokens(tokenizer, text: str, max_length: int = 512) -> int:
    return len(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def encode_all(emb: M3Embedder, texts, **kwargs):
    return emb.encode(
        texts, return_dense=True, return_sparse=True, return_colbert_vecs=True, **kwargs
    )


def assert_same_lexical(got: dict, expected: dict) -> None:
    """Same weights per token id; an id may be absent on one side only if its weight is ~0."""
    for key in got.keys() | expected.keys():
        assert float(got.get(key, 0.0)) == pytest.approx(
            float(expected.get(key, 0.0)), rel=1e-5, abs=1e-6
        ), key


def assert_same_encoding(a: dict, b: dict) -> None:
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], **TOL)
    assert len(a["lexical_weights"]) == len(b["lexical_weights"])
    for lw_a, lw_b in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        assert_same_lexical(lw_a, lw_b)
    for ca, cb in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True):
        assert ca.shape == cb.shape
        np.testing.assert_allclose(ca, cb, **TOL)


# Numpy heads on the model's own encoder -------------------------------------------------------


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


HIDDEN_PAD = 256


@pytest.fixture(scope="module")
def hidden_states(loaded):
    """Last hidden states [n, hidden] of one sequence, from the model's encoder called directly
    (one jitted program: always 1 row padded to 256, unlike any bucket M3Embedder uses here)."""
    graphdef, state = nnx.split(loaded[2].encoder)
    run = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))

    def hidden(ids: list[int]) -> np.ndarray:
        arr = np.full((1, HIDDEN_PAD), 1, np.int32)
        arr[0, : len(ids)] = ids
        mask = (np.arange(HIDDEN_PAD) < len(ids)).astype(np.int32)[None]
        return np.asarray(run(state, arr, mask), np.float64)[0, : len(ids)]

    return hidden


def sparse_dict(params, ids: list[int], h: np.ndarray) -> dict[str, float]:
    sp = params["sparse_linear"]
    w = np.maximum(h @ np.asarray(sp["kernel"]) + np.asarray(sp["bias"]), 0.0)[:, 0]
    out: dict[str, float] = {}
    for token, weight in zip(ids, w, strict=True):
        if token not in SPECIALS and weight > 0:
            out[str(token)] = max(out.get(str(token), 0.0), float(weight))
    return out


def colbert_rows(params, h: np.ndarray) -> np.ndarray:
    cb = params["colbert_linear"]
    return normalize(h @ np.asarray(cb["kernel"]) + np.asarray(cb["bias"]))


# Encoding against the model itself --------------------------------------------------------------


def test_encode_matches_model_heads(embedder, loaded, hidden_states):
    _, params, _, tokenizer = loaded
    out = encode_all(embedder, TEXTS)
    assert out["dense_vecs"].shape == (len(TEXTS), 64)
    assert out["dense_vecs"].dtype == np.float32
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text)["input_ids"]
        h = hidden_states(ids)
        np.testing.assert_allclose(out["dense_vecs"][i], normalize(h[0]), **TOL)
        assert_same_lexical(out["lexical_weights"][i], sparse_dict(params, ids, h))
        cv = out["colbert_vecs"][i]
        assert cv.shape == (len(ids) - 1, 64)
        np.testing.assert_allclose(cv, colbert_rows(params, h[1:]), **TOL)


def test_lexical_weights_format(embedder, loaded):
    tokenizer = loaded[3]
    out = encode_all(embedder, TEXTS)
    total = 0
    for text, lw in zip(TEXTS, out["lexical_weights"], strict=True):
        ids = set(tokenizer(text)["input_ids"])
        for key, value in lw.items():
            assert isinstance(key, str) and key.isdigit()
            assert int(key) not in SPECIALS
            assert int(key) in ids
            assert value > 0 and isinstance(value, np.float32)
        total += len(lw)
    assert total > 0


def test_colbert_vecs_rows(embedder, loaded):
    tokenizer = loaded[3]
    out = encode_all(embedder, TEXTS)
    for text, vecs in zip(TEXTS, out["colbert_vecs"], strict=True):
        assert vecs.shape == (n_tokens(tokenizer, text) - 1, 64)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=-1), 1.0, rtol=1e-5)
    # Truncation keeps </s>: max_length tokens -> max_length - 1 rows.
    out = encode_all(embedder, TEXTS[-1], max_length=16)
    assert out["colbert_vecs"].shape == (15, 64)


# Bucket padding and order never change results ---------------------------------------------------


@pytest.fixture(scope="module")
def encoded_alone(embedder):
    """Each text encoded on its own (a batch of one, no other text to pad against)."""
    alone = [encode_all(embedder, [text]) for text in TEXTS]
    return {
        "dense_vecs": np.concatenate([a["dense_vecs"] for a in alone]),
        "lexical_weights": [a["lexical_weights"][0] for a in alone],
        "colbert_vecs": [a["colbert_vecs"][0] for a in alone],
    }


@pytest.mark.parametrize(
    "settings",
    [
        None,  # the default embedder
        dict(batch_size=2),
        dict(bucket_lengths=(8, 24, 48), max_tokens_per_batch=64),
        dict(batch_size=3, bucket_lengths=(128,)),
    ],
)
def test_bucketing_never_changes_outputs(embedder, loaded, encoded_alone, settings):
    emb = embedder if settings is None else make_embedder(loaded, **settings)
    together = encode_all(emb, TEXTS)
    assert_same_encoding(together, encoded_alone)
    # Reversed input comes back reversed (input order, not bucket order).
    backwards = encode_all(emb, TEXTS[::-1])
    backwards = {k: v[::-1] for k, v in backwards.items()}
    assert_same_encoding(backwards, encoded_alone)


def test_encode_batch_size_argument(embedder):
    reference = encode_all(embedder, TEXTS)
    assert_same_encoding(encode_all(embedder, TEXTS, batch_size=1), reference)
    assert_same_encoding(encode_all(embedder, TEXTS, batch_size=4), reference)


def test_compute_score_never_depends_on_batching(embedder, loaded):
    weights = dict(weights_for_different_modes=[0.4, 0.2, 0.4])
    together = embedder.compute_score(PAIRS, **weights)
    alone = [embedder.compute_score([pair], **weights) for pair in PAIRS]
    # Every pair padded to 128 tokens in one batch of 8 rows (3 all-padding rows).
    other = make_embedder(loaded, batch_size=8, bucket_lengths=(128,))
    together_other = other.compute_score(PAIRS, **weights)
    for mode, values in together.items():
        assert len(values) == len(PAIRS)
        np.testing.assert_allclose(values, [a[mode][0] for a in alone], **TOL)
        np.testing.assert_allclose(together_other[mode], values, **TOL)
    backwards = embedder.compute_score(PAIRS[::-1], **weights)
    for mode, values in together.items():
        np.testing.assert_allclose(backwards[mode][::-1], values, **TOL)


def test_compiled_programs_one_per_bucket_shape(loaded):
    settings = dict(batch_size=4, bucket_lengths=(8, 16, 32), max_tokens_per_batch=64)
    emb = make_embedder(loaded, **settings)
    tokenizer = loaded[3]
    texts = TEXTS + [t + " zz" for t in TEXTS] + ["q w e r t y"] * 3
    max_length = 40
    lengths = [n_tokens(tokenizer, t, max_length) for t in texts]
    spec = BucketSpec(lengths=(8, 16, 32), batch_size=4, max_tokens=64)
    expected = {b.shape for b in plan_batches(lengths, spec, max_length)}
    assert len(expected) > 2
    assert emb.compiled_program_count() == 0
    first = emb.encode(texts, max_length=max_length)
    assert emb.compiled_program_count() == len(expected)
    second = emb.encode(texts, max_length=max_length)
    assert emb.compiled_program_count() == len(expected)  # nothing new
    np.testing.assert_array_equal(first["dense_vecs"], second["dense_vecs"])


# Single items and scores -------------------------------------------------------------------------


def test_single_string_gives_single_items(embedder):
    single = encode_all(embedder, TEXTS[0])
    listed = encode_all(embedder, [TEXTS[0]])
    assert single["dense_vecs"].shape == (64,)
    assert isinstance(single["lexical_weights"], dict)
    assert single["colbert_vecs"].ndim == 2
    np.testing.assert_array_equal(single["dense_vecs"], listed["dense_vecs"][0])
    assert single["lexical_weights"] == listed["lexical_weights"][0]
    np.testing.assert_array_equal(single["colbert_vecs"], listed["colbert_vecs"][0])
    only_sparse = embedder.encode(TEXTS[0], return_dense=False, return_sparse=True)
    assert only_sparse["dense_vecs"] is None and only_sparse["colbert_vecs"] is None
    assert only_sparse["lexical_weights"] == pytest.approx(single["lexical_weights"], rel=1e-5)


def test_compute_score_single_pair_returns_floats(embedder):
    single = embedder.compute_score(PAIRS[1])
    listed = embedder.compute_score([PAIRS[1]])
    assert set(single) == {"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}
    for mode, value in single.items():
        assert isinstance(value, float)
        assert value == pytest.approx(listed[mode][0], rel=1e-6, abs=1e-7)
    single_tuple = embedder.compute_score(tuple(PAIRS[1]))
    assert single_tuple == single


def test_compute_score_matches_encode_and_helpers(embedder):
    weights = [0.4, 0.2, 0.4]
    got = embedder.compute_score(PAIRS, weights_for_different_modes=weights)
    default = embedder.compute_score(PAIRS)
    q = encode_all(embedder, [p[0] for p in PAIRS])
    p = encode_all(embedder, [p[1] for p in PAIRS])
    dense = np.sum(q["dense_vecs"].astype(np.float64) * p["dense_vecs"], axis=-1)
    sparse, colbert = [], []
    for i in range(len(PAIRS)):
        lq, lp = q["lexical_weights"][i], p["lexical_weights"][i]
        ref_sparse = sum(float(w) * float(lp[t]) for t, w in lq.items() if t in lp)
        assert embedder.compute_lexical_matching_score(lq, lp) == pytest.approx(
            ref_sparse, rel=1e-5, abs=1e-6
        )
        sparse.append(ref_sparse)
        cq, cp = q["colbert_vecs"][i].astype(np.float64), p["colbert_vecs"][i]
        ref_colbert = float((cq @ cp.T).max(axis=1).mean())
        assert embedder.colbert_score(cq, cp) == pytest.approx(ref_colbert, rel=1e-5, abs=1e-6)
        colbert.append(ref_colbert)
    dense, sparse, colbert = np.array(dense), np.array(sparse), np.array(colbert)
    assert np.any(sparse > 0)
    np.testing.assert_allclose(got["dense"], dense, **TOL)
    np.testing.assert_allclose(got["sparse"], sparse, **TOL)
    np.testing.assert_allclose(got["colbert"], colbert, **TOL)
    np.testing.assert_allclose(got["sparse+dense"], (0.4 * dense + 0.2 * sparse) / 0.6, **TOL)
    np.testing.assert_allclose(
        got["colbert+sparse+dense"], (0.4 * dense + 0.2 * sparse + 0.4 * colbert) / 1.0, **TOL
    )
    np.testing.assert_allclose(default["sparse+dense"], (dense + sparse) / 2, **TOL)
    np.testing.assert_allclose(
        default["colbert+sparse+dense"], (dense + sparse + colbert) / 3, **TOL
    )


def test_colbert_score_errors(embedder):
    with pytest.raises(ValueError, match="colbert_score needs"):
        embedder.colbert_score(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="colbert_score needs"):
        embedder.colbert_score(np.ones((0, 4)), np.ones((3, 4)))


def test_convert_id_to_token(embedder, loaded):
    tokenizer = loaded[3]
    lws = embedder.encode(TEXTS[:3], return_dense=False, return_sparse=True)["lexical_weights"]
    converted = embedder.convert_id_to_token(lws)
    assert isinstance(converted, list) and len(converted) == 3
    for lw, tokens in zip(lws, converted, strict=True):
        expected = {}
        for key, weight in lw.items():
            piece = tokenizer.convert_ids_to_tokens(int(key))
            expected[piece.replace("\u2581", " ").strip()] = weight
        assert tokens == expected
        assert all(isinstance(t, str) for t in tokens)
    assert embedder.convert_id_to_token(lws[0]) == converted[0]


def test_encode_takes_other_libraries_arguments(embedder, capsys):
    """sentence-transformers' and FlagEmbedding's encode arguments: prompt and instruction
    prepend, the output descriptions that hold are accepted, placement is ignored."""
    texts = ["what is a panda", "pandas eat bamboo"]
    plain = embedder.encode(["query: " + t for t in texts])["dense_vecs"]
    for kwargs in (
        dict(prompt="query: "),
        dict(instruction="query: "),
        dict(instruction="query", instruction_format="{}: {}"),
    ):
        got = embedder.encode(texts, **kwargs)["dense_vecs"]
        np.testing.assert_array_equal(got, plain)
    same = embedder.encode(
        texts,
        convert_to_numpy=True,
        normalize_embeddings=True,
        device="cpu",
        precision="float32",
        output_value="sentence_embedding",
        show_progress_bar=False,
    )["dense_vecs"]
    np.testing.assert_array_equal(same, embedder.encode(texts)["dense_vecs"])
    many = [f"text number {i}" for i in range(6)]  # 6 batches of 1: a bar unless turned off
    capsys.readouterr()
    embedder.encode(many, batch_size=1, show_progress_bar=True)
    assert "encode" in capsys.readouterr().err
    embedder.encode(many, batch_size=1, show_progress_bar=False)
    assert "encode" not in capsys.readouterr().err


# Errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sentences, kwargs, error, match",
    [
        ("", {}, ValueError, r"sentences\[0\] is an empty or blank"),
        (["ok", "  \n\t"], {}, ValueError, r"sentences\[1\] is an empty or blank"),
        (["ok", 3], {}, TypeError, r"sentences\[1\] is int"),
        ([], {}, ValueError, "sentences is empty"),
        (None, {}, TypeError, "must be a string or a list of strings"),
        (b"bytes", {}, TypeError, "must be a string or a list of strings"),
        ("ok", dict(max_length=513), ValueError, "max_length=513 exceeds"),
        ("ok", dict(max_length=1), ValueError, "max_length must be an int >= 2"),
        ("ok", dict(max_length=0), ValueError, "max_length must be an int >= 2"),
        ("ok", dict(return_dense=False), ValueError, "nothing to return"),
        ("ok", dict(mcls_interval=0), ValueError, "MCLS interval must be positive"),
        ("ok", dict(normalise=True), TypeError, "unexpected keyword argument 'normalise'"),
        ("ok", dict(normalize_embeddings=False), ValueError, "expected normalize_embeddings=True"),
        ("ok", dict(convert_to_tensor=True), ValueError, "expected convert_to_tensor=False"),
        ("ok", dict(precision="int8"), ValueError, "expected precision='float32'"),
        ("ok", dict(truncate_dim=8), ValueError, "expected truncate_dim=None"),
    ],
)
def test_encode_bad_input(embedder, sentences, kwargs, error, match):
    with pytest.raises(error, match=match):
        embedder.encode(sentences, **kwargs)


@pytest.mark.parametrize(
    "pairs, kwargs, error, match",
    [
        ([], {}, ValueError, "non-empty list"),
        ("ab", {}, ValueError, "non-empty list"),
        ([("q", "p", "x")], {}, ValueError, r"sentence_pairs\[0\] is not a \(query, passage\)"),
        (["q", "p", "x"], {}, ValueError, r"sentence_pairs\[0\] is not a \(query, passage\)"),
        ([("q", "p"), "qp"], {}, ValueError, r"sentence_pairs\[1\] is not a \(query, passage\)"),
        ([("q", 5)], {}, TypeError, r"passages\[0\] is int"),
        ([("", "p")], {}, ValueError, r"queries\[0\] is an empty or blank"),
        ([("q", "p")], dict(weights_for_different_modes=[1, 1]), ValueError, "needs 3 values"),
        ([("q", "p")], dict(max_query_length=600), ValueError, "max_query_length=600 exceeds"),
        ([("q", "p")], dict(max_passage_length=513), ValueError, "max_passage_length=513"),
        ([("q", "p")], dict(max_passage_length=0), ValueError, "max_passage_length must be"),
    ],
)
def test_compute_score_bad_input(embedder, pairs, kwargs, error, match):
    with pytest.raises(error, match=match):
        embedder.compute_score(pairs, **kwargs)


# MCLS --------------------------------------------------------------------------------------------


def test_insert_mcls_positions():
    content = list(range(10, 20))
    ids = [0, *content, 2]
    assert insert_mcls(ids, 4, 0, 100) == [0, 10, 11, 12, 13, 0, 14, 15, 16, 17, 0, 18, 19, 2]
    assert insert_mcls(ids, 5, 0, 100) == [0, 10, 11, 12, 13, 14, 0, 15, 16, 17, 18, 19, 2]
    assert insert_mcls(ids, 10, 0, 100) == ids  # one chunk: unchanged
    assert insert_mcls(ids, 256, 0, 100) == ids
    assert insert_mcls([0, 2], 4, 0, 100) == [0, 2]
    every_token = [t for c in content for t in (0, c)] + [2]
    assert insert_mcls(ids, 1, 0, 100) == every_token


def test_insert_mcls_truncation_keeps_eos():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 60))
        interval = int(rng.integers(1, 12))
        max_length = int(rng.integers(2, 80))
        content = rng.integers(4, 1000, size=n).tolist()
        out = insert_mcls([0, *content, 2], interval, 0, max_length)
        assert len(out) <= max(max_length, 2)
        assert out[0] == 0 and out[-1] == 2
        kept = [t for t in out[1:-1] if t != 0]
        assert kept == content[: len(kept)]  # truncated from the end, order kept
        # A [CLS] heads each chunk of `interval` content tokens, none dangling before </s>.
        chunks = []
        for token in out[:-1]:
            if token == 0:
                chunks.append([])
            else:
                chunks[-1].append(token)
        assert all(len(c) == interval for c in chunks[:-1])
        assert 0 < len(chunks[-1]) <= interval or kept == []
        # As many content tokens as fit.
        if len(kept) < n:
            extra = len(kept) + 1
            assert extra + -(-extra // interval) + 1 > max_length
    with pytest.raises(ValueError, match="must be positive"):
        insert_mcls([0, 5, 2], 0, 0, 10)
    with pytest.raises(ValueError, match="start with cls id 0"):
        insert_mcls([7, 5, 2], 4, 0, 10)


def test_mcls_short_text_equals_plain_encode(embedder, loaded):
    tokenizer = loaded[3]
    short = [t for t in TEXTS if n_tokens(tokenizer, t) - 2 <= 64]
    assert len(short) >= 3
    plain = encode_all(embedder, short)
    mcls = encode_all(embedder, short, mcls_interval=64)
    assert_same_encoding(mcls, plain)


def test_mcls_long_text(embedder, loaded, hidden_states):
    _, params, _, tokenizer = loaded
    interval = 8
    texts = [TEXTS[5], TEXTS[8], TEXTS[1]]
    out = encode_all(embedder, texts, mcls_interval=interval)
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        content = ids[1:-1]
        assert len(content) > 2 * interval
        # Expected sequence built by hand: <s> c1..c8 <s> c9..c16 <s> ... </s>.
        seq = []
        for start in range(0, len(content), interval):
            seq += [0, *content[start : start + interval]]
        seq.append(2)
        assert insert_mcls(ids, interval, 0, len(seq)) == seq
        h = hidden_states(seq)
        cls_rows = [j for j, t in enumerate(seq) if t == 0]
        assert len(cls_rows) == -(-len(content) // interval)
        np.testing.assert_allclose(out["dense_vecs"][i], normalize(h[cls_rows].mean(axis=0)), **TOL)
        # Not just the first [CLS]:
        assert np.max(np.abs(out["dense_vecs"][i] - normalize(h[0]))) > 1e-3
        rows = [j for j in range(1, len(seq)) if seq[j] != 0]
        cv = out["colbert_vecs"][i]
        assert cv.shape == (len(ids) - 1, 64)  # inserted [CLS] rows left out
        np.testing.assert_allclose(cv, colbert_rows(params, h[rows]), **TOL)
        assert "0" not in out["lexical_weights"][i]
        assert_same_lexical(out["lexical_weights"][i], sparse_dict(params, seq, h))


def test_mcls_respects_max_length(embedder, loaded):
    tokenizer = loaded[3]
    text = TEXTS[8]
    assert n_tokens(tokenizer, text) > 20
    out = encode_all(embedder, text, mcls_interval=4, max_length=20)
    # 20 tokens = <s> + content + inserted [CLS] + </s>: n + ceil(n/4) = 19 -> n = 15 content tokens.
    assert out["colbert_vecs"].shape == (15 + 1, 64)
    assert np.all(np.isfinite(out["dense_vecs"]))


def test_jax_arrays_are_not_leaked(embedder):
    out = encode_all(embedder, TEXTS[:2])
    assert isinstance(out["dense_vecs"], np.ndarray)
    assert all(
        isinstance(v, np.ndarray) and not isinstance(v, jax.Array) for v in out["colbert_vecs"]
    )
