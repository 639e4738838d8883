"""Encode texts into files: dense vectors, lexical weights and ColBERT vectors, resumable.

    m3-jax encode --model checkpoints/bge-m3 --output out/ "first text" "second text"
    m3-jax encode --model checkpoints/bge-m3 --input corpus.jsonl --output out/corpus

Input: texts on the command line, or --input FILE: .jsonl (--text-field, optional --id-field),
.tsv (id <TAB> text, or text alone) or .txt (one text per line). Texts without an id are numbered
from 0. Output, row i being the i-th input text:
  ids.txt                  one id per line
  dense.npy                [N, D] float32, L2-normalised
  lexical_weights.jsonl    {"id", "lexical_weights": {token id: weight}} per line (FlagEmbedding's
                           dict), or {"id", "indices", "values"} with --sparse-format indices
  colbert_index.npy        [N, 3] int64: (shard, first row, number of rows) of text i's vectors
                           in shard-SHARD.{npz,safetensors}, array "colbert_vecs" [T, D] float32
  shard-NNNNN.*, manifest.json   the finished shards (texts in length order) and their settings
Rerunning the same command after an interruption encodes only the shards not yet on disk; other
texts or settings are refused with the differences named.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m3_jax.cli.common import add_model_arguments, load_embedder, model_fingerprint, write_atomic
from m3_jax.cli.inputs import read_texts
from m3_jax.evaluation.encoding import (
    OUTPUTS,
    SHARD_FORMATS,
    assemble,
    encode_shards,
    load_shard,
    shard_path,
)
from m3_jax.inference import DEFAULT_BATCH_SIZE
from m3_jax.input_files import InputError

SPARSE_FORMATS = ("dict", "indices")
COLBERT_INDEX = "colbert_index.npy"
# The shard arrays each output needs in memory; ColBERT vectors stay in their shard files.
SHARD_KEYS = {
    "dense": ("dense",),
    "sparse": ("sparse_indptr", "sparse_indices", "sparse_values"),
    "colbert": ("colbert_lengths",),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*", default=[], help="texts to encode (or use --input)")
    parser.add_argument("--input", default=None, help=".jsonl, .tsv or .txt file of texts")
    parser.add_argument("--text-field", default="text", help="the text's key in .jsonl input")
    parser.add_argument("--id-field", default="id", help="the id's key in .jsonl input (optional)")
    parser.add_argument("--output", required=True, help="output directory (created if missing)")
    parser.add_argument(
        "--what", default=",".join(OUTPUTS), help=f"comma-separated outputs from {OUTPUTS}"
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per text (None: 512 or the model's)"
    )
    parser.add_argument(
        "--shard-size", type=int, default=8192, help="texts per resumable shard on disk"
    )
    parser.add_argument(
        "--sparse-format", default="dict", choices=SPARSE_FORMATS, help="lexical_weights.jsonl rows"
    )
    parser.add_argument(
        "--colbert-format", default="npz", choices=SHARD_FORMATS, help="shard file format"
    )
    add_model_arguments(parser, batch_size=DEFAULT_BATCH_SIZE)


def _inputs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if bool(args.texts) == bool(args.input):
        raise InputError("give texts on the command line or --input FILE (one of the two)")
    if args.input:
        return read_texts(args.input, args.text_field, args.id_field)
    for i, text in enumerate(args.texts):
        if not text.strip():
            raise InputError(f"text {i} on the command line is empty")
    return [str(i) for i in range(len(args.texts))], list(args.texts)


def _outputs(what: str) -> tuple[str, ...]:
    names = [w.strip() for w in what.split(",") if w.strip()]
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown or not names:
        raise InputError(f"--what {what!r}: expected a comma-separated subset of {OUTPUTS}")
    return tuple(o for o in OUTPUTS if o in names)


def lexical_rows(ids: Sequence[str], csr, sparse_format: str) -> list[dict]:
    """One lexical_weights.jsonl record per text, from a CSR matrix [N, vocab] in input order."""
    rows = []
    for i, id_ in enumerate(ids):
        start, end = csr.indptr[i], csr.indptr[i + 1]
        indices, values = csr.indices[start:end].tolist(), csr.data[start:end].tolist()
        if sparse_format == "dict":
            rows.append(
                {"id": id_, "lexical_weights": dict(zip(map(str, indices), values, strict=True))}
            )
        else:
            rows.append({"id": id_, "indices": indices, "values": values})
    return rows


def colbert_index(shards: Sequence[np.ndarray], lengths: Sequence[np.ndarray]) -> np.ndarray:
    """[N, 3] (shard, first row, number of rows) in input order, from each shard's input indices
    and per-text vector counts."""
    index = np.zeros((sum(len(s) for s in shards), 3), np.int64)
    for number, (shard, counts) in enumerate(zip(shards, lengths, strict=True)):
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        index[shard] = np.stack([np.full(len(shard), number), starts, counts], axis=1)
    return index


def colbert_vectors(output_dir: str | Path, rows: Sequence[int]) -> list[np.ndarray]:
    """The ColBERT vectors [n_i, D] of the given rows of an `m3-jax encode` output directory."""
    output_dir = Path(output_dir)
    index = np.load(output_dir / COLBERT_INDEX)
    shard_format = json.loads((output_dir / "manifest.json").read_text())["shard_format"]
    out: list[np.ndarray] = []
    loaded: dict[int, np.ndarray] = {}
    for row in rows:
        shard, start, length = (int(x) for x in index[row])
        if shard not in loaded:
            path = shard_path(output_dir, shard, shard_format)
            loaded[shard] = load_shard(path, ["colbert_vecs"])["colbert_vecs"]
        out.append(loaded[shard][start : start + length])
    return out


def run(args: argparse.Namespace) -> int:
    ids, texts = _inputs(args)
    outputs = _outputs(args.what)
    # The constructor checks --max-length against the model before any manifest is written.
    embedder = load_embedder(args, passage_max_length=args.max_length)
    out = Path(args.output)
    shards, parts = [], []
    for shard, arrays in encode_shards(
        embedder,
        texts,
        max_length=embedder.passage_max_length,
        outputs=outputs,
        shard_size=args.shard_size,
        cache_dir=out,
        model_fingerprint=model_fingerprint(args.model),
        settings={"dtype": embedder.config.dtype, "attention_impl": embedder.config.attention_impl},
        shard_format=args.colbert_format,
        keys=[k for name in outputs for k in SHARD_KEYS[name]],
        progress=not args.quiet,
    ):
        shards.append(shard)
        parts.append(arrays)
    in_memory = tuple(o for o in outputs if o != "colbert")
    encoded = assemble(parts, np.concatenate(shards), in_memory, embedder.config.vocab_size)

    write_atomic(out / "ids.txt", lambda f: f.write("".join(f"{i}\n" for i in ids).encode()))
    if "dense" in outputs:
        write_atomic(out / "dense.npy", lambda f: np.save(f, encoded.dense))
    if "sparse" in outputs:
        lines = (
            json.dumps(r) + "\n" for r in lexical_rows(ids, encoded.sparse, args.sparse_format)
        )
        write_atomic(out / "lexical_weights.jsonl", lambda f: f.write("".join(lines).encode()))
    if "colbert" in outputs:
        index = colbert_index(shards, [p["colbert_lengths"] for p in parts])
        write_atomic(out / COLBERT_INDEX, lambda f: np.save(f, index))
    print(f"encoded {len(texts)} texts ({', '.join(outputs)}) into {out}")
    return 0
