"""Static-shape batching: group token sequences into a few (rows, length) bucket shapes.

XLA compiles one program per distinct input shape. Sequences are sorted by length, assigned the
smallest bucket length that holds them, cut into batches of a bucket-specific row count, and the
last batch of a bucket is padded up to a power of two (its spare rows filled with the next
bucket's longest sequences), so a whole corpus compiles a handful of programs and short texts are
never padded to the longest one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Two lengths per octave: a text is padded by less than half its length (about a sixth on
# average, against a third with powers of two alone) for twice the programs.
DEFAULT_LENGTHS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """Which static shapes to use.

    lengths: bucket lengths in tokens (ascending); `max_length` is appended when larger.
    batch_size: most rows per batch.
    max_tokens: most rows x length per batch; long buckets get fewer rows (at least 1).
    """

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    batch_size: int = 256
    max_tokens: int = 65536

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise ValueError(f"bucket lengths must be positive, got {self.lengths}")
        if list(self.lengths) != sorted(set(self.lengths)):
            raise ValueError(f"bucket lengths must be strictly ascending, got {self.lengths}")

    def lengths_up_to(self, max_length: int) -> tuple[int, ...]:
        return tuple(n for n in self.lengths if n < max_length) + (max_length,)

    def rows_for(self, length: int) -> int:
        return max(1, min(self.batch_size, self.max_tokens // length))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Indices (into the input list) of the sequences in one padded [rows, length] batch."""

    indices: np.ndarray
    rows: int
    length: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.length)


def _padded_rows(n: int, max_rows: int) -> int:
    return min(max_rows, 1 << (n - 1).bit_length())


def bucket_length(length: int, lengths: Sequence[int]) -> int:
    for bucket in lengths:
        if length <= bucket:
            return bucket
    raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {lengths[-1]}")


def plan_batches(seq_lengths: Sequence[int], spec: BucketSpec, max_length: int) -> list[Batch]:
    """Batches covering every sequence once, longest first (so memory errors surface early).

    The last batch of a bucket has its rows padded to a power of two; those spare rows take the
    longest sequences of the next buckets (they fit, and the rows are computed anyway), which
    saves their own buckets that work.
    """
    lengths = spec.lengths_up_to(max_length)
    order = np.argsort(-np.asarray(seq_lengths), kind="stable")
    buckets = np.asarray([bucket_length(int(seq_lengths[i]), lengths) for i in order])
    batches = []
    start = 0
    while start < len(order):
        length = int(buckets[start])
        rows = spec.rows_for(length)
        members = int(np.sum(buckets[start : start + rows] == length))
        padded = _padded_rows(members, rows)
        batches.append(Batch(order[start : start + padded], padded, length))
        start += padded
    return batches


def pad_batch(
    token_ids: Sequence[Sequence[int]], batch: Batch, pad_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """([rows, length] int32 ids, [rows, length] int32 mask), right-padded; spare rows all pad."""
    ids = np.full(batch.shape, pad_token_id, dtype=np.int32)
    mask = np.zeros(batch.shape, dtype=np.int32)
    for row, index in enumerate(batch.indices):
        seq = token_ids[index]
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask
