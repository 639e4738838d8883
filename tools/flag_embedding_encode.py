"""The official side of tools/benchmark_encode.py: FlagEmbedding's BGEM3FlagModel encoding a text
file.

    python tools/flag_embedding_encode.py MODEL_DIR TEXTS.json OUT_DIR --batch-size 32 --max-length 512

Runs in its own process (and possibly another interpreter, since FlagEmbedding pins transformers
4.x while m3_jax uses whatever is current), so it imports nothing from m3_jax. Encodes the texts
`--repeats` times after one warm-up call, dense + sparse + colbert in fp32, and writes
OUT_DIR/result.json (fastest seconds, warm-up seconds, peak RSS) and OUT_DIR/dense.npy.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from FlagEmbedding import BGEM3FlagModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("texts", type=Path, help="a JSON list of strings")
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--colbert-dim", type=int, default=-1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    texts = json.loads(args.texts.read_text())
    model = BGEM3FlagModel(
        args.model_dir,
        use_fp16=args.device != "cpu",
        devices=args.device,
        colbert_dim=args.colbert_dim,
    )
    kw = dict(
        batch_size=args.batch_size,
        max_length=args.max_length,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    start = time.perf_counter()
    out = model.encode(texts, **kw)
    warmup = time.perf_counter() - start
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.encode(texts, **kw)
        best = min(best, time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "dense.npy", np.asarray(out["dense_vecs"], np.float32))
    peak = (
        torch.cuda.max_memory_allocated()
        if args.device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result = {"seconds": best, "warmup_seconds": warmup, "peak_memory_bytes": peak}
    (args.out / "result.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
