"""Encode throughput of m3_jax against the PyTorch reference on the same weights and texts.

    python tools/benchmark.py --geometry tiny            # seconds
    python tools/benchmark.py --geometry base --num-texts 256 --max-length 512

Both sides produce dense + sparse + colbert outputs in fp32 from identical random weights.
PyTorch follows FlagEmbedding's M3Embedder: texts sorted by length, each batch padded to its
longest. m3_jax uses its static length buckets. Prints a table and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from m3_jax import config as configs
from m3_jax.inference import M3Embedder, lexical_weights
from m3_jax.model_dir import model_from_params
from m3_jax.tiny import random_params, synthetic_corpus, train_tokenizer
from m3_jax.tokenization import load_tokenizer

GEOMETRIES = {"tiny": configs.tiny, "base": configs.base_size, "bge-m3": configs.bge_m3}


def mixed_length_texts(num_texts: int, max_words: int, seed: int) -> list[str]:
    """Log-normal word counts: many short texts, a tail up to `max_words`."""
    rng = np.random.default_rng(seed)
    words = " ".join(synthetic_corpus(4000, seed)).split()
    counts = np.clip(rng.lognormal(mean=3.5, sigma=1.0, size=num_texts), 3, max_words).astype(int)
    starts = rng.integers(0, len(words) - max_words, size=num_texts)
    return [" ".join(words[s : s + n]) for s, n in zip(starts, counts, strict=True)]


def torch_encoder(config, params):
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from m3_jax.convert.to_torch import ENCODER, torch_state_dicts

    state = torch_state_dicts(config, params)
    model = XLMRobertaModel(XLMRobertaConfig(**config.to_hf_config()), add_pooling_layer=False)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state[ENCODER].items()}, strict=True)
    heads = {}
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        w = torch.from_numpy(state[name]["weight"])
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({k: torch.from_numpy(v) for k, v in state[name].items()})
        heads[name] = linear
    return model.eval(), heads["colbert_linear.pt"], heads["sparse_linear.pt"]


def torch_encode(model, colbert_linear, sparse_linear, tokenizer, texts, batch_size, max_length):
    """FlagEmbedding-style: sort by length (longest first), pad each batch to its longest."""
    import torch

    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([-len(x) for x in encoded], kind="stable")
    dense = np.zeros((len(texts), model.config.hidden_size), np.float32)
    lexical, colbert = [None] * len(texts), [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            d = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
            s = torch.relu(sparse_linear(hidden)).squeeze(-1)
            c = colbert_linear(hidden[:, 1:]) * batch["attention_mask"][:, 1:, None]
            c = torch.nn.functional.normalize(c, dim=-1)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                dense[i] = d[row].numpy()
                ids = batch["input_ids"][row, :n].numpy()
                w = s[row, :n].numpy() * ~np.isin(ids, [0, 1, 2, 3])
                lexical[i] = lexical_weights(ids, w)
                colbert[i] = c[row, : n - 1].numpy()
    return dense, lexical, colbert


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--num-texts", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = train_tokenizer(Path(tmp) / "tok", seed=args.seed)
        tokenizer = load_tokenizer(tokenizer_dir)
    config = GEOMETRIES[args.geometry](
        vocab_size=len(tokenizer), max_position_embeddings=args.max_length + 2
    )
    params = random_params(config, args.seed)
    texts = mixed_length_texts(args.num_texts, args.max_length, args.seed)
    real_tokens = sum(
        len(x) for x in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    )

    embedder = M3Embedder(
        model_from_params(config, params),
        tokenizer,
        batch_size=args.batch_size,
        show_progress=False,
    )
    kw = dict(
        max_length=args.max_length, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    start = time.perf_counter()
    jax_out = embedder.encode(texts, **kw)
    first_call = time.perf_counter() - start
    jax_time = timed(lambda: embedder.encode(texts, **kw), args.repeats)

    model, colbert_linear, sparse_linear = torch_encoder(config, params)
    run_torch = lambda: torch_encode(  # noqa: E731
        model, colbert_linear, sparse_linear, tokenizer, texts, args.batch_size, args.max_length
    )
    torch_out = run_torch()
    torch_time = timed(run_torch, args.repeats)
    max_dense_diff = float(np.abs(jax_out["dense_vecs"] - torch_out[0]).max())

    results = {
        "geometry": args.geometry,
        "num_texts": args.num_texts,
        "real_tokens": real_tokens,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "m3_jax_tokens_per_s": real_tokens / jax_time,
        "torch_tokens_per_s": real_tokens / torch_time,
        "speedup": torch_time / jax_time,
        "m3_jax_first_call_s": first_call,
        "compiled_programs": embedder.compiled_program_count(),
        "max_abs_dense_diff": max_dense_diff,
    }
    print(
        f"\nencode, geometry={args.geometry}, {args.num_texts} texts, {real_tokens} real tokens, fp32, dense+sparse+colbert"
    )
    print(f"{'implementation':<28}{'tokens/s':>12}{'ratio':>8}")
    print(
        f"{'PyTorch (sorted, pad-to-longest)':<28}{results['torch_tokens_per_s']:>12.0f}{1.0:>8.2f}"
    )
    print(
        f"{'m3_jax (static buckets)':<28}{results['m3_jax_tokens_per_s']:>12.0f}{results['speedup']:>8.2f}"
    )
    print(
        f"m3_jax first call (incl. {results['compiled_programs']} compiles): {first_call:.1f}s; "
        f"max |dense diff| {max_dense_diff:.2e}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
