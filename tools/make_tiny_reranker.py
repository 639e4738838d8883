"""Write a tiny random cross-encoder in the PyTorch layout of BAAI/bge-reranker-v2-m3
(XLMRobertaForSequenceClassification with one label, and its tokenizer), for demos and tests.

    python tools/make_tiny_reranker.py runs/hn/tiny-reranker

Its scores are those of random weights: it exercises the reranking and teacher-score paths, it is
not a teacher worth learning from (the M3 self-teacher, `--teacher m3:DIR`, is).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m3_jax.tiny import build_tiny_reranker_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "out", type=Path, help="the directory to write (must not exist or be empty)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {build_tiny_reranker_dir(args.out, seed=args.seed)}")


if __name__ == "__main__":
    main()
