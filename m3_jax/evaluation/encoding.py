"""Encoding a corpus (or queries) for retrieval: length-ordered shards, resumable on disk.

Texts are ordered by character length (longest first, as FlagEmbedding sorts) and cut into shards
of `shard_size` (texts already tokenized, as token-id arrays, by their length in tokens); `M3Embedder.encode` then packs each shard into its static length buckets, so
similar lengths share padded shapes. With `cache_dir`, every finished shard is written as
`shard-NNNNN.npz` or `.safetensors` (atomically: temporary name, then rename) next to a
`manifest.json` that pins the texts, model fingerprint, max length, outputs and any caller settings;
a rerun loads the finished shards and encodes only the rest, so an interrupted encoding of a large
corpus resumes where it stopped. `encode_shards` streams the shards (the `m3-jax encode` command
writes its files from them); `encode_texts` assembles them in memory.

Shard arrays (texts in length order): `dense` [n, D]; `sparse_indptr` [n + 1], `sparse_indices`,
`sparse_values` (CSR rows); `colbert_vecs` [T, D] (every text's vectors, concatenated) and
`colbert_lengths` [n].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3_jax.file_modes import apply_umask
from m3_jax.sparse_formats import to_csr

OUTPUTS = ("dense", "sparse", "colbert")
MANIFEST = "manifest.json"
SHARD_FORMATS = ("npz", "safetensors")


@dataclasses.dataclass
class EncodedTexts:
    """Embeddings of N texts in input order; an output not asked for is None."""

    dense: np.ndarray | None  # [N, D] float32, L2-normalised
    sparse: Any  # scipy.sparse.csr_matrix [N, vocab] float32 (lexical weights)
    colbert_vecs: np.ndarray | None  # [T, D]: every text's colbert vectors, concatenated
    colbert_offsets: np.ndarray | None  # [N + 1] int64: text i owns rows offsets[i]:offsets[i+1]

    @property
    def num_texts(self) -> int:
        if self.dense is not None:
            return len(self.dense)
        if self.sparse is not None:
            return self.sparse.shape[0]
        return len(self.colbert_offsets) - 1

    def colbert(self, i: int) -> np.ndarray:
        return self.colbert_vecs[self.colbert_offsets[i] : self.colbert_offsets[i + 1]]


def _check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown or not outputs:
        raise ValueError(f"outputs {list(outputs)}: expected a non-empty subset of {OUTPUTS}")
    return tuple(o for o in OUTPUTS if o in outputs)


def _encode_shard(embedder, texts: list, max_length: int, outputs) -> dict[str, np.ndarray]:
    tokenized = not isinstance(texts[0], str)
    out = (embedder.encode_token_ids if tokenized else embedder.encode)(
        texts,
        max_length=max_length,
        return_dense="dense" in outputs,
        return_sparse="sparse" in outputs,
        return_colbert_vecs="colbert" in outputs,
    )
    arrays: dict[str, np.ndarray] = {}
    if "dense" in outputs:
        arrays["dense"] = np.asarray(out["dense_vecs"], np.float32)
    if "sparse" in outputs:
        csr = to_csr(out["lexical_weights"], embedder.config.vocab_size)
        arrays.update(sparse_indptr=csr.indptr, sparse_indices=csr.indices, sparse_values=csr.data)
    if "colbert" in outputs:
        vecs = out["colbert_vecs"]
        arrays["colbert_vecs"] = np.concatenate(vecs).astype(np.float32)
        arrays["colbert_lengths"] = np.array([len(v) for v in vecs], np.int64)
    return arrays


def _fingerprint(texts: Sequence[str] | Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        if isinstance(text, str):
            digest.update(text.encode("utf-8"))
        else:  # token ids: tagged, so no text list can collide with an id list
            digest.update(b"ids:" + np.asarray(text, np.int64).tobytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _check_manifest(cache_dir: Path, manifest: dict) -> None:
    path = cache_dir / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        changed = [
            f"{k}: {found.get(k)!r:.80} -> {manifest[k]!r:.80}"
            for k in manifest
            if found.get(k) != manifest[k]
        ]
        if changed:
            raise ValueError(
                f"{path}: this cache was written for other settings ({'; '.join(changed)}); "
                "delete the directory or choose another cache directory"
            )
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2) + "\n")


def shard_path(cache_dir: Path, index: int, shard_format: str = "npz") -> Path:
    return cache_dir / f"shard-{index:05d}.{shard_format}"


def _save_shard(path: Path, arrays: dict[str, np.ndarray], shard_format: str) -> None:
    # Written under a temporary name and renamed, so a shard on disk is always complete.
    tmp = path.with_name(f"{path.stem}.tmp.{shard_format}")
    if shard_format == "npz":
        np.savez(tmp, **arrays)
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        apply_umask(tmp)  # safetensors writes 0600
    tmp.replace(path)


def load_shard(path: Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of one shard file (`keys` only, when given: the others are never read)."""
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in (data.files if keys is None else keys)}
    from safetensors import safe_open

    with safe_open(str(path), "np") as data:
        return {k: data.get_tensor(k) for k in (data.keys() if keys is None else keys)}


def shard_order(texts: Sequence[str] | Sequence[np.ndarray], shard_size: int) -> list[np.ndarray]:
    """Input indices of each shard's texts: longest first, cut into runs of `shard_size`."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    order = np.array(sorted(range(len(texts)), key=lambda i: -len(texts[i])), np.int64)
    return [order[s : s + shard_size] for s in range(0, len(order), shard_size)]


def encode_shards(
    embedder,
    texts: Sequence[str] | Sequence[np.ndarray],
    *,
    max_length: int,
    outputs: Sequence[str] = OUTPUTS,
    shard_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    model_fingerprint: str = "",
    settings: Mapping[str, Any] | None = None,
    shard_format: str = "npz",
    keys: Sequence[str] | None = None,
    progress: bool = True,
    desc: str = "encode",
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yields (input indices, arrays) per length-ordered shard, loading finished shards from
    `cache_dir` and encoding (and saving) the rest; see the module docstring for the arrays.

    model_fingerprint: anything that identifies the weights (e.g. a model path and step); a cache
    written under another fingerprint, text list, max length, shard size, output set, shard format
    or `settings` (other JSON values the caller's results depend on) is refused.
    keys: yield only these arrays (a finished shard's other arrays are never read).
    """
    outputs = _check_outputs(outputs)
    if not texts:
        raise ValueError(f"{desc}: no texts to encode")
    if shard_format not in SHARD_FORMATS:
        raise ValueError(f"shard_format {shard_format!r}: expected one of {SHARD_FORMATS}")
    shards = shard_order(texts, shard_size)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        manifest = dict(
            num_texts=len(texts),
            texts_sha256=_fingerprint(texts),
            model=model_fingerprint,
            max_length=max_length,
            outputs=list(outputs),
            shard_size=shard_size,
            shard_format=shard_format,
            **(settings or {}),
        )
        _check_manifest(cache, manifest)

    inner_progress = embedder.show_progress
    embedder.show_progress = progress and len(shards) == 1
    try:
        bar = tqdm(shards, desc=desc, disable=not progress or len(shards) == 1, unit="shard")
        for index, shard in enumerate(bar):
            path = shard_path(cache, index, shard_format) if cache is not None else None
            if path is not None and path.is_file():
                yield shard, load_shard(path, keys)
                continue
            arrays = _encode_shard(embedder, [texts[i] for i in shard], max_length, outputs)
            if path is not None:
                _save_shard(path, arrays, shard_format)
            yield shard, arrays if keys is None else {k: arrays[k] for k in keys}
    finally:
        embedder.show_progress = inner_progress


def encode_texts(
    embedder,
    texts: Sequence[str] | Sequence[np.ndarray],
    *,
    max_length: int,
    outputs: Sequence[str] = OUTPUTS,
    **kwargs: Any,
) -> EncodedTexts:
    """Embeds `texts` with an `M3Embedder` in length-ordered shards, in memory and in input
    order; keyword arguments (shard_size, cache_dir, model_fingerprint, ...) as `encode_shards`."""
    outputs = _check_outputs(outputs)
    orders, parts = [], []
    for shard, arrays in encode_shards(
        embedder, texts, max_length=max_length, outputs=outputs, **kwargs
    ):
        orders.append(shard)
        parts.append(arrays)
    return assemble(parts, np.concatenate(orders), outputs, embedder.config.vocab_size)


def assemble(parts, order: np.ndarray, outputs, vocab_size: int) -> EncodedTexts:
    """Concatenates shards (in length order; `order` their input indices, concatenated) and puts
    the rows back in input order."""
    from scipy import sparse

    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    dense = csr = vecs = offsets = None
    if "dense" in outputs:
        dense = np.concatenate([p["dense"] for p in parts])[inverse]
    if "sparse" in outputs:
        blocks = [
            sparse.csr_matrix(
                (p["sparse_values"], p["sparse_indices"], p["sparse_indptr"]),
                shape=(len(p["sparse_indptr"]) - 1, vocab_size),
            )
            for p in parts
        ]
        csr = sparse.vstack(blocks, format="csr")[inverse]
    if "colbert" in outputs:
        lengths = np.concatenate([p["colbert_lengths"] for p in parts])
        sorted_vecs = np.concatenate([p["colbert_vecs"] for p in parts])
        starts = np.concatenate([[0], np.cumsum(lengths)])
        offsets = np.concatenate([[0], np.cumsum(lengths[inverse])]).astype(np.int64)
        # Row r of text i (input order) sits at starts[inverse[i]] + r in the sorted arrays.
        new_lengths = lengths[inverse]
        rows = np.repeat(starts[:-1][inverse], new_lengths)
        rows += np.arange(offsets[-1]) - np.repeat(offsets[:-1], new_lengths)
        vecs = sorted_vecs[rows]
    return EncodedTexts(dense, csr, vecs, offsets)
