"""Encode and score a few sentences with M3Embedder, printing all three outputs and the scores.

    python tools/quickstart.py                 # builds a tiny random model offline (seconds)
    python tools/quickstart.py --model DIR     # an m3_jax dir, a BGE-M3 PyTorch dir, or BAAI/bge-m3

With the tiny random model the numbers are meaningless; the shapes and formats are the real ones.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from m3_jax import M3Embedder
from m3_jax.tiny import build_tiny_model_dir

QUERIES = ["What is BGE M3?", "Defination of BM25"]
PASSAGES = [
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model dir or hub id (default: a tiny random model)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = args.model or build_tiny_model_dir(Path(tmp) / "tiny-m3")
        print(f"model: {source}")
        model = M3Embedder.from_pretrained(source)
        np.set_printoptions(precision=4, suppress=True)

        q = model.encode(QUERIES, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        p = model.encode(PASSAGES, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        print("\ndense_vecs:", q["dense_vecs"].shape, "\n", q["dense_vecs"][:, :6], "...")
        print("dense scores (queries x passages):\n", q["dense_vecs"] @ p["dense_vecs"].T)
        tokens = model.convert_id_to_token(q["lexical_weights"][0])
        print("\nlexical_weights[0]:", {t: round(float(w), 4) for t, w in tokens.items()})
        print(
            "lexical score q0-p0:",
            model.compute_lexical_matching_score(q["lexical_weights"][0], p["lexical_weights"][0]),
        )
        print("\ncolbert_vecs shapes:", [v.shape for v in q["colbert_vecs"]])
        print(
            "colbert score q0-p0:", model.colbert_score(q["colbert_vecs"][0], p["colbert_vecs"][0])
        )

        pairs = [(a, b) for a in QUERIES for b in PASSAGES]
        result = model.compute_score(
            pairs, max_passage_length=128, weights_for_different_modes=[0.4, 0.2, 0.4]
        )
        print("\ncompute_score (weights [0.4, 0.2, 0.4]):")
        for mode, values in result.items():
            print(f"  {mode:>22}: {np.round(values, 4).tolist()}")


if __name__ == "__main__":
    main()
