"""m3_jax's Reranker against transformers' XLMRobertaForSequenceClassification and FlagEmbedding's
FlagReranker, on cross-encoder checkpoints written by PyTorch code in the test.

Tolerance: 1e-5 absolute on the logits (fp32 on CPU; the logits are of order 1).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from torch_reference import build_torch_reranker_dir, make_texts

from m3_jax.convert.reranker import export_reranker, load_reranker
from m3_jax.reranker import Reranker
from tools.flag_reranker import default_cache_root, run_flag_reranker, side_environment

TOL = 1e-5
MAX_LENGTH = 64  # short enough that many pairs are cut


@pytest.fixture(scope="module", autouse=True)
def full_precision(full_precision_matmuls):
    yield


@pytest.fixture(scope="module")
def torch_dirs(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reranker_torch")
    return {
        fmt: build_torch_reranker_dir(root / fmt, tokenizer_dir, seed=2, serialization=fmt)
        for fmt in ("safetensors", "bin")
    }


@pytest.fixture(scope="module")
def hf_tokenizer(torch_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(torch_dirs["safetensors"]))


@pytest.fixture(scope="module")
def pairs(hf_tokenizer):
    """From one-token queries and passages to pairs cut on both sides, in several scripts."""
    texts = make_texts(hf_tokenizer, seed=5)
    n = len(texts)
    index_pairs = [(0, 1), (1, 0), (0, n - 2), (n - 2, 0), (n - 2, n - 1), (3, 3), (5, 6)]
    index_pairs += [(i, (i + 4) % n) for i in range(0, n, 2)]
    return [(texts[i], texts[j]) for i, j in index_pairs]


@pytest.fixture(scope="module")
def reranker(torch_dirs):
    return Reranker.from_pretrained(torch_dirs["safetensors"], max_length=MAX_LENGTH)


def reference_pair_ids(tokenizer, query: str, passage: str, max_length: int) -> list[int]:
    """FlagReranker's tokenization written out: both sides alone without special tokens, the
    query cut to 3/4 of max_length, then `<s> q </s></s> p </s>` with only the passage cut."""
    q = tokenizer(query, add_special_tokens=False, truncation=True, max_length=max_length * 3 // 4)
    p = tokenizer(passage, add_special_tokens=False, truncation=True, max_length=max_length)
    q_ids, p_ids = q["input_ids"], p["input_ids"]
    excess = len(q_ids) + len(p_ids) + 4 - max_length
    if excess > 0:
        p_ids = p_ids[:-excess]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [cls, *q_ids, sep, sep, *p_ids, sep]


@torch.no_grad()
def transformers_logits(model_dir: Path, tokenizer, pairs, max_length: int) -> np.ndarray:
    """XLMRobertaForSequenceClassification (eager attention, fp32), one unpadded pair at a time."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), attn_implementation="eager"
    ).eval()
    out = []
    for query, passage in pairs:
        ids = torch.tensor([reference_pair_ids(tokenizer, query, passage, max_length)])
        out.append(model(input_ids=ids).logits.view(-1).item())
    return np.array(out)


# Tokenization ------------------------------------------------------------------------------------


def test_pair_tokenization_cuts_only_the_passage(reranker, hf_tokenizer, pairs):
    from m3_jax.tokenization import tokenize_pairs

    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    ours = tokenize_pairs(hf_tokenizer, queries, passages, MAX_LENGTH * 3 // 4, MAX_LENGTH)
    reference = [reference_pair_ids(hf_tokenizer, q, p, MAX_LENGTH) for q, p in pairs]
    assert ours == reference
    assert max(len(ids) for ids in ours) == MAX_LENGTH
    assert min(len(ids) for ids in ours) < 8  # a one-token query, a passage of one or two
    # Tokenizing the pair in one call shortens the query too: another input for long queries.
    long_query = max(pairs, key=lambda p: len(hf_tokenizer(p[0])["input_ids"]) + len(p[1]))
    joint = hf_tokenizer(*long_query, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    assert joint != reference_pair_ids(hf_tokenizer, *long_query, MAX_LENGTH)


def test_a_query_that_leaves_no_room_is_refused(reranker, pairs):
    long_pair = max(pairs, key=lambda p: len(p[0]))
    with pytest.raises(ValueError, match="leave no room for the passage within max_length=16"):
        reranker.compute_score(long_pair, max_length=16, query_max_length=14)


# Scores ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_scores_match_transformers(torch_dirs, hf_tokenizer, pairs, fmt):
    ours = Reranker.from_pretrained(torch_dirs[fmt], max_length=MAX_LENGTH).compute_score(pairs)
    reference = transformers_logits(torch_dirs[fmt], hf_tokenizer, pairs, MAX_LENGTH)
    assert np.std(reference) > 0.05  # scores that tell the pairs apart
    np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)


def test_scores_match_flag_reranker(torch_dirs, pairs, tmp_path):
    try:
        side_env = side_environment(default_cache_root())
    except subprocess.CalledProcessError as e:  # no package index reachable
        pytest.skip(f"could not install FlagEmbedding's side environment: {e.stderr[-300:]}")
    cases = [
        ("safetensors", dict(batch_size=4, max_length=MAX_LENGTH)),
        ("safetensors", dict(normalize=True)),
        ("bin", dict(batch_size=8, max_length=MAX_LENGTH)),
    ]
    for index, (fmt, kwargs) in enumerate(cases):
        model_dir = torch_dirs[fmt]
        reference = run_flag_reranker(
            side_env, model_dir, pairs, tmp_path / f"{index}.json", **kwargs
        )
        ours = Reranker.from_pretrained(model_dir, batch_size=4).compute_score(pairs, **kwargs)
        np.testing.assert_allclose(
            ours, reference["scores"], atol=TOL, rtol=0, err_msg=f"{fmt} {kwargs}"
        )


def test_one_pair_is_a_float_and_normalize_is_the_sigmoid(reranker, pairs):
    logit = reranker.compute_score(pairs[2])
    assert isinstance(logit, float)
    assert reranker.compute_score(list(pairs[2])) == logit
    probability = reranker.compute_score(pairs[2], normalize=True)
    assert probability == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-7)
    assert reranker.compute_score([pairs[2]]) == [logit]


def test_scores_do_not_depend_on_batching(reranker, pairs):
    together = reranker.compute_score(pairs)
    in_pairs = reranker.compute_score(pairs, batch_size=2)
    np.testing.assert_allclose(in_pairs, together, atol=TOL, rtol=0)
    # One program per (rows, bucket length) shape, whatever the number of pairs.
    assert reranker.compiled_program_count() <= 8


def test_instructions_are_prepended(torch_dirs, reranker, pairs):
    instructed = Reranker.from_pretrained(
        torch_dirs["safetensors"],
        max_length=MAX_LENGTH,
        query_instruction_for_rerank="query: ",
        passage_instruction_for_rerank="passage: ",
    )
    expected = reranker.compute_score([("query: " + q, "passage: " + p) for q, p in pairs[:4]])
    np.testing.assert_allclose(instructed.compute_score(pairs[:4]), expected, atol=1e-6)


def test_bad_pairs_are_refused(reranker):
    with pytest.raises(ValueError, match="non-empty list"):
        reranker.compute_score([])
    with pytest.raises(ValueError, match=r"sentence_pairs\[1\] is not a \(query, passage\) pair"):
        reranker.compute_score([("q", "p"), ("only one",)])
    with pytest.raises(ValueError, match="passages"):
        reranker.compute_score([("q", "  ")])
    with pytest.raises(ValueError, match="position embeddings"):
        reranker.compute_score([("q", "p")], max_length=4096)


# Import and export -----------------------------------------------------------------------------


def test_export_round_trips_through_transformers(torch_dirs, hf_tokenizer, pairs, tmp_path):
    src = torch_dirs["safetensors"]
    config, params, _ = load_reranker(src)
    out = export_reranker(config, params, tmp_path / "exported", tokenizer_source=src)
    original, exported = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    reference = transformers_logits(src, hf_tokenizer, pairs[:6], MAX_LENGTH)
    np.testing.assert_allclose(
        transformers_logits(out, hf_tokenizer, pairs[:6], MAX_LENGTH), reference, atol=TOL
    )
    with pytest.raises(FileExistsError, match="not empty"):
        export_reranker(config, params, out, tokenizer_source=src)


def _copy_dir(src: Path, out: Path) -> Path:
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_import_is_strict(torch_dirs, tmp_path):
    src = torch_dirs["safetensors"]
    state = load_file(src / "model.safetensors")

    two_labels = _copy_dir(src, tmp_path / "two_labels")
    hf = json.loads((src / "config.json").read_text())
    hf["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    (two_labels / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="one output label, this model has 2"):
        Reranker.from_pretrained(two_labels)

    missing = _copy_dir(src, tmp_path / "missing")
    save_file(
        {k: v for k, v in state.items() if k != "classifier.out_proj.bias"},
        str(missing / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="missing classifier.out_proj.bias"):
        Reranker.from_pretrained(missing)

    misshapen = _copy_dir(src, tmp_path / "misshapen")
    bad = dict(state, **{"classifier.dense.weight": state["classifier.dense.weight"][:, :8]})
    save_file(bad, str(misshapen / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"classifier.dense.weight has shape \(64, 8\)"):
        Reranker.from_pretrained(misshapen)

    with pytest.raises(FileNotFoundError, match="no such model directory"):
        Reranker.from_pretrained(tmp_path / "absent")


def test_tiny_reranker_is_a_transformers_checkpoint(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from m3_jax.tiny import build_tiny_reranker_dir

    out = build_tiny_reranker_dir(tmp_path / "tiny_reranker")
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    pairs = [("абв гд", "абв ζηθ gh"), ("one two", "three")]
    with torch.no_grad():
        reference = [
            model(input_ids=torch.tensor([reference_pair_ids(tokenizer, q, p, 512)])).logits.item()
            for q, p in pairs
        ]
    ours = Reranker.from_pretrained(out).compute_score(pairs)
    np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)
