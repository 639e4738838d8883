"""One training group per example: 1 positive + G-1 negatives, and the instruction prefixes.

The sampling follows FlagEmbedding's `AbsEmbedderTrainDataset` (a positive drawn uniformly, the
negatives sampled without replacement, repeated when too few) but draws from an explicit numpy
Generator, so the loader can make every group a pure function of (seed, epoch, step, row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from m3_jax.config import DataConfig


def sample_negative_indices(num_negatives: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into the negatives: without replacement when there are enough; otherwise
    the index list is repeated ceil(count / n) times and sampled from, so repeats are possible
    (FlagEmbedding's behaviour)."""
    pool = np.arange(num_negatives)
    if num_negatives < count:
        pool = np.tile(pool, math.ceil(count / num_negatives))
    return rng.choice(pool, size=count, replace=False)


def sample_group(
    num_pos: int,
    num_neg: int,
    group_size: int,
    rng: np.random.Generator,
    *,
    neg_scores: np.ndarray | None = None,
    sort_negatives_by_teacher: bool = False,
) -> tuple[int, np.ndarray]:
    """(index of the positive, indices of the `group_size - 1` negatives) of one group: the
    positive drawn uniformly, then the negatives by `sample_negative_indices`.

    `sort_negatives_by_teacher` orders the sampled negatives by `neg_scores`, descending, as the
    old FlagEmbedding loader did; the order matters for the m3 KD loss, where each member
    competes with the members after it.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if group_size > 1 and num_neg == 0:
        raise ValueError(f"group_size={group_size} needs negatives; the example has none")
    pos_index = int(rng.integers(num_pos))
    if group_size == 1:
        return pos_index, np.zeros(0, dtype=np.int64)
    neg_indices = sample_negative_indices(num_neg, group_size - 1, rng)
    if sort_negatives_by_teacher:
        if neg_scores is None:
            raise ValueError("sort_negatives_by_teacher needs teacher scores")
        # Stable, so equal scores keep their sampled order and the result stays seed-determined.
        neg_indices = neg_indices[np.argsort(-neg_scores[neg_indices], kind="stable")]
    return pos_index, neg_indices


# Record types whose passages are texts of the query's kind: they take the query's instruction.
SYMMETRIC_TEXT_TYPES = ("symmetric_sts", "symmetric_clustering")


def apply_instructions(
    query: str,
    passages: Sequence[str],
    prompt: str | None,
    data: DataConfig,
    record_type: str | None = None,
) -> tuple[str, list[str]]:
    """The query and passages with their instruction prefixes (`data.query_instruction`,
    `data.passage_instruction`, joined by `data.instruction_format`).

    A record's `prompt` replaces the query instruction (an empty prompt means no prefix). For
    the types in SYMMETRIC_TEXT_TYPES the passages take the query's instruction instead of the
    passage instruction, as in FlagEmbedding. A missing instruction adds nothing: the new
    FlagEmbedding code can prefix the literal text "None" when no instruction is set, which we
    do not copy.
    """
    instruction = prompt if prompt is not None else data.query_instruction
    if instruction:
        query = data.instruction_format.format(instruction, query)
    passage_instruction = data.passage_instruction
    if record_type in SYMMETRIC_TEXT_TYPES:
        passage_instruction = instruction
    if passage_instruction:
        passages = [data.instruction_format.format(passage_instruction, p) for p in passages]
    return query, list(passages)
