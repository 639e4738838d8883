"""One training group per record: 1 positive + G-1 negatives, and the instruction prefixes.

The sampling follows FlagEmbedding's `AbsEmbedderTrainDataset` (a positive drawn uniformly, the
negatives sampled without replacement, repeated when too few) but draws from an explicit numpy Generator, so
the loader can make every group a pure function of (seed, epoch, step, row).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from m3_jax.config import DataConfig
from m3_jax.data.records import Record
from m3_jax.input_files import InputError


@dataclasses.dataclass(frozen=True)
class Group:
    """passages: [positive, negative_1, ..., negative_{G-1}]; teacher_scores: [G] float32 or None."""

    passages: list[str]
    teacher_scores: np.ndarray | None


def check_record_for_group(record: Record, group_size: int, *, needs_scores: bool) -> None:
    """Raises InputError (naming the record's `path:line`) if `record` cannot fill a group."""
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if group_size > 1 and not record.neg:
        raise InputError(
            f"{record.source}: field 'neg': missing or empty, but group_size={group_size} needs "
            f"{group_size - 1} negatives per query"
        )
    if needs_scores:
        if record.pos_scores is None:
            raise InputError(
                f"{record.source}: field 'pos_scores': missing, but teacher scores are requested"
            )
        if group_size > 1 and record.neg_scores is None:
            raise InputError(
                f"{record.source}: field 'neg_scores': missing, but teacher scores are requested"
            )


def sample_negative_indices(num_negatives: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into the negatives: without replacement when there are enough; otherwise
    the index list is repeated ceil(count / n) times and sampled from, so repeats are possible
    (FlagEmbedding's behaviour)."""
    pool = np.arange(num_negatives)
    if num_negatives < count:
        pool = np.tile(pool, math.ceil(count / num_negatives))
    return rng.choice(pool, size=count, replace=False)


def sample_group(
    record: Record,
    group_size: int,
    rng: np.random.Generator,
    *,
    sort_negatives_by_teacher: bool = False,
) -> Group:
    """A positive drawn uniformly from `pos` and `group_size - 1` negatives.

    Teacher scores are returned, aligned with the passages, whenever the record has them.
    `sort_negatives_by_teacher` orders the sampled negatives by teacher score, descending, as the
    old FlagEmbedding loader did; the order matters for the m3 KD loss, where each member competes
    with the members after it.
    """
    check_record_for_group(record, group_size, needs_scores=sort_negatives_by_teacher)
    pos_index = int(rng.integers(len(record.pos)))
    neg_indices = (
        sample_negative_indices(len(record.neg), group_size - 1, rng)
        if group_size > 1
        else np.zeros(0, dtype=np.int64)
    )
    has_scores = record.pos_scores is not None and (
        group_size == 1 or record.neg_scores is not None
    )
    neg_scores = None
    if has_scores and group_size > 1:
        neg_scores = np.asarray([record.neg_scores[i] for i in neg_indices], dtype=np.float32)
        if sort_negatives_by_teacher:
            # Stable, so equal scores keep their sampled order and the result stays seed-determined.
            order = np.argsort(-neg_scores, kind="stable")
            neg_indices, neg_scores = neg_indices[order], neg_scores[order]
    passages = [record.pos[pos_index]] + [record.neg[i] for i in neg_indices]
    teacher_scores = None
    if has_scores:
        pos_score = np.asarray([record.pos_scores[pos_index]], dtype=np.float32)
        teacher_scores = (
            pos_score if neg_scores is None else np.concatenate([pos_score, neg_scores])
        )
    return Group(passages, teacher_scores)


def apply_instructions(
    query: str, passages: Sequence[str], prompt: str | None, data: DataConfig
) -> tuple[str, list[str]]:
    """The query and passages with their instruction prefixes (`data.query_instruction`,
    `data.passage_instruction`, joined by `data.instruction_format`).

    A record's `prompt` replaces the query instruction (an empty prompt means no prefix). A
    missing instruction adds nothing: the new FlagEmbedding code can prefix the literal text
    "None" when no instruction is set, which we do not copy.
    """
    instruction = prompt if prompt is not None else data.query_instruction
    if instruction:
        query = data.instruction_format.format(instruction, query)
    if data.passage_instruction:
        passages = [data.instruction_format.format(data.passage_instruction, p) for p in passages]
    return query, list(passages)
