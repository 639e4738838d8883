"""Teacher scores for knowledge distillation: `pos_scores` / `neg_scores` for every training
record, index-aligned with its `pos` / `neg`, written so that a killed run resumes.

Teachers:
- a cross-encoder reranker (`m3_jax.Reranker`; the paper's teacher, e.g. bge-reranker-v2-m3):
  its raw logit per (query, passage) pair, as FlagEmbedding users write them (training turns
  them into targets with a softmax without temperature);
- an M3 model, the paper's self-teacher: s_inter = w_dense·s_dense + w_sparse·s_sparse +
  w_colbert·s_colbert with w = (1, 0.3, 1), divided by the training temperature (0.02) so the
  softmax over a record's passages is the distribution self-distillation uses as its target
  (`losses.py` scores every head as s / temperature).

Resuming: records are scored in chunks; each chunk's output lines are appended to `OUT.partial`
and flushed to disk before the next chunk starts, next to `OUT.partial.json`, which pins the
inputs (their sha256), the teacher and its settings. A rerun with the same settings drops any
half-written last line, skips the records already written, and scores only the rest, so no
pair is scored twice; when all are written the partial file is renamed to OUT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3_jax.data.records import SCORE_FIELDS, Record

M3_TEACHER_WEIGHTS = (1.0, 0.3, 1.0)  # (dense, sparse, colbert): the paper's s_inter
M3_TEACHER_TEMPERATURE = 0.02

# (query, passage) pairs → one float32 score per pair.
Scorer = Callable[[list[tuple[str, str]]], np.ndarray]


def reranker_scorer(reranker: Any, **compute_score_kwargs: Any) -> Scorer:
    """Raw logits of an `m3_jax.Reranker` (its compute_score with normalize=False)."""

    def score(pairs: list[tuple[str, str]]) -> np.ndarray:
        values = reranker.compute_score(pairs, normalize=False, **compute_score_kwargs)
        return np.asarray(values, np.float32).reshape(len(pairs))

    return score


def m3_scorer(
    embedder: Any,
    weights: Sequence[float] = M3_TEACHER_WEIGHTS,
    temperature: float = M3_TEACHER_TEMPERATURE,
    **compute_score_kwargs: Any,
) -> Scorer:
    """s_inter / temperature of an `M3Embedder` (see the module docstring)."""
    if len(weights) != 3 or temperature <= 0:
        raise ValueError(
            f"the M3 teacher needs 3 weights (dense, sparse, colbert) and a temperature > 0, "
            f"got {tuple(weights)} and {temperature}"
        )

    def score(pairs: list[tuple[str, str]]) -> np.ndarray:
        out = embedder.compute_score(pairs, **compute_score_kwargs)
        heads = [
            np.asarray(out[m], np.float64).reshape(len(pairs))
            for m in ("dense", "sparse", "colbert")
        ]
        s_inter = sum(w * s for w, s in zip(weights, heads, strict=True))
        return (s_inter / temperature).astype(np.float32)

    return score


def record_pairs(record: Record) -> list[tuple[str, str]]:
    """The record's (query, passage) pairs: every positive, then every negative."""
    return [(record.query, p) for p in (*record.pos, *record.neg)]


def with_scores(obj: dict[str, Any], record: Record, scores: np.ndarray) -> dict[str, Any]:
    """The input object with `pos_scores` / `neg_scores` set (replacing any it had)."""
    n_pos = len(record.pos)
    row = {k: v for k, v in obj.items() if k not in SCORE_FIELDS}
    row["pos_scores"] = [float(s) for s in scores[:n_pos]]
    row["neg_scores"] = [float(s) for s in scores[n_pos:]]
    return row


def inputs_fingerprint(files: Sequence[Path]) -> list[dict[str, Any]]:
    """Path, size and sha256 of every input file, for the resume manifest."""
    out = []
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out.append({"path": str(file), "bytes": file.stat().st_size, "sha256": digest.hexdigest()})
    return out


@dataclasses.dataclass(frozen=True)
class ScoringSummary:
    records: int
    pairs_scored: int  # by this run
    resumed_from: int  # records found written by an earlier run


def partial_paths(out: Path) -> tuple[Path, Path]:
    """(the partial output, its manifest) next to `out`."""
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")


def _resume_point(partial: Path, manifest_path: Path, manifest: dict[str, Any]) -> int:
    """How many complete records `partial` holds (a torn last line is cut off), after checking
    it was written with the same settings; 0 when there is nothing to resume."""
    if not partial.is_file():
        return 0
    if not manifest_path.is_file():
        raise ValueError(
            f"{partial}: a partial output without its manifest {manifest_path.name}; delete it "
            "to start again"
        )
    found = json.loads(manifest_path.read_text())
    changed = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
    if changed:
        raise ValueError(
            f"{partial}: written by a run with other {', '.join(changed)}; delete {partial.name} "
            f"and {manifest_path.name} to start again, or rerun with the same settings"
        )
    lines, complete, offset = 0, 0, 0
    with open(partial, "r+b") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # a large file is not read whole
            lines += block.count(b"\n")
            if b"\n" in block:
                complete = offset + block.rfind(b"\n") + 1
            offset += len(block)
        if complete < offset:
            f.truncate(complete)  # the line a kill interrupted
    return lines


def write_teacher_scores(
    objects: Sequence[dict[str, Any]],
    records: Sequence[Record],
    scorer: Scorer,
    out: str | os.PathLike,
    *,
    manifest: dict[str, Any],
    chunk_records: int = 1024,
    progress: bool = True,
) -> ScoringSummary:
    """Writes every object with its teacher scores to `out` as jsonl, in input order, resuming
    a partial output written with the same `manifest` (JSON values naming the inputs, the
    teacher and its settings)."""
    if chunk_records < 1:
        raise ValueError(f"chunk_records must be >= 1, got {chunk_records}")
    out = Path(out)
    partial, manifest_path = partial_paths(out)
    done = _resume_point(partial, manifest_path, manifest)
    if done > len(records):
        raise ValueError(f"{partial}: holds {done} records, more than the {len(records)} inputs")
    if done == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        partial.write_bytes(b"")
    pairs_scored = 0
    bar = tqdm(
        total=len(records), initial=done, desc="teacher", unit="record", disable=not progress
    )
    with bar, open(partial, "ab") as f:
        for start in range(done, len(records), chunk_records):
            chunk = range(start, min(start + chunk_records, len(records)))
            pairs = [pair for i in chunk for pair in record_pairs(records[i])]
            scores = scorer(pairs)
            lines, offset = [], 0
            for i in chunk:
                n = len(records[i].pos) + len(records[i].neg)
                row = with_scores(objects[i], records[i], scores[offset : offset + n])
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                offset += n
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())  # a chunk on disk is never scored again
            pairs_scored += len(pairs)
            bar.update(len(chunk))
    os.replace(partial, out)
    manifest_path.unlink()
    return ScoringSummary(len(records), pairs_scored, done)
