"""Static shapes: a few bucket lengths that every batch is padded to, for inference and training.

XLA compiles one program per distinct input shape, so token sequences are padded to the smallest
bucket length that holds them (`bucket_index`, `pad`), and batches come in a handful of
(rows, length) shapes. Inference (`plan_batches`) sorts texts by length and cuts each bucket into
batches whose row count comes from a token budget; training (`m3_jax.data.plan`) puts each
example in the bucket of its longest passage and draws whole batches from one bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Inference: two lengths per octave, so a text is padded by less than half its length (about a
# sixth on average, against a third with powers of two alone) for twice the programs; a forward
# pass compiles in seconds.
DEFAULT_LENGTHS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)  # fmt: skip
# Training: one length per octave from 128. Each bucket's program is a whole train step (forward,
# backward, optimizer), which takes minutes to compile for BGE-M3 on an accelerator, and an
# example's length is that of its longest passage, so short buckets would rarely fill.
TRAINING_LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)


def check_lengths(lengths: Sequence[int]) -> tuple[int, ...]:
    lengths = tuple(int(n) for n in lengths)
    if not lengths or any(n <= 0 for n in lengths) or list(lengths) != sorted(set(lengths)):
        raise ValueError(f"bucket lengths must be positive and strictly ascending, got {lengths}")
    return lengths


def lengths_up_to(lengths: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The bucket lengths below `max_length`, then `max_length` itself (the longest any input
    can be after truncation)."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    return tuple(n for n in check_lengths(lengths) if n < max_length) + (max_length,)


def bucket_index(seq_lengths: Sequence[int] | np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """[N] index into `lengths` of the smallest bucket that holds each sequence."""
    seq_lengths = np.asarray(seq_lengths)
    if seq_lengths.size and seq_lengths.max() > lengths[-1]:
        raise ValueError(
            f"a sequence of {seq_lengths.max()} tokens exceeds the largest bucket {lengths[-1]}"
        )
    return np.searchsorted(np.asarray(lengths), seq_lengths, side="left")


def bucket_length(length: int, lengths: Sequence[int]) -> int:
    return int(lengths[int(bucket_index([length], lengths)[0])])


def pad(
    token_ids: Sequence[Sequence[int]], rows: int, length: int, pad_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """([rows, length] int32 ids, [rows, length] int32 mask), right-padded; rows past
    `len(token_ids)` are all padding."""
    if len(token_ids) > rows:
        raise ValueError(f"{len(token_ids)} sequences do not fit a batch of {rows} rows")
    ids = np.full((rows, length), pad_token_id, dtype=np.int32)
    mask = np.zeros((rows, length), dtype=np.int32)
    for row, seq in enumerate(token_ids):
        if len(seq) > length:
            raise ValueError(f"a sequence of {len(seq)} tokens does not fit bucket length {length}")
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


# Inference batches -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """Which static shapes inference uses.

    lengths: bucket lengths in tokens (ascending); the max length is appended when larger.
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
        check_lengths(self.lengths)

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

    def pad(self, token_ids: Sequence[Sequence[int]], pad_token_id: int):
        """(ids, mask) [rows, length] of this batch's sequences of `token_ids`."""
        members = [token_ids[i] for i in self.indices]
        return pad(members, self.rows, self.length, pad_token_id)


def _padded_rows(n: int, max_rows: int) -> int:
    return min(max_rows, 1 << (n - 1).bit_length())


def plan_batches(seq_lengths: Sequence[int], spec: BucketSpec, max_length: int) -> list[Batch]:
    """Batches covering every sequence once, longest first (so memory errors surface early).

    The last batch of a bucket has its rows padded to a power of two; those spare rows take the
    longest sequences of the next buckets (they fit, and the rows are computed anyway), which
    saves their own buckets that work.
    """
    lengths = lengths_up_to(spec.lengths, max_length)
    order = np.argsort(-np.asarray(seq_lengths), kind="stable")
    buckets = np.asarray(lengths)[bucket_index(np.asarray(seq_lengths)[order], lengths)]
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
