"""A prepared training set with new negatives: what `m3-jax mine` writes for a prepared input.

The input set is read whole (every example in dataset, bucket, row order, and the passage
table); the output is a prepared set like `m3-jax data prepare` writes, readable by training
and by plain TFDS, where

- the passage table is the input's (its shard files hard-linked, or copied across file
  systems), followed by one shard of the candidate-pool passages the input lacked;
- every example keeps its query ids and positives, takes its new negatives, and loses its
  teacher scores (they scored the old negatives): score it afresh, or train without
  knowledge distillation;
- an example's length bucket is decided again from its new longest passage, with the input's
  bucket lengths;
- the manifest keeps the input's settings and input files, and adds `settings["mined"]`: what
  mined it, so `m3-jax data prepare` never mistakes the output for its own.

The output is written under `OUT.incomplete` and renamed to OUT at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3_jax.bucketing import bucket_index
from m3_jax.data.prepare import shard_file, write_metadata, write_records
from m3_jax.data.prepared import (
    EXAMPLES_NAME,
    MANIFEST_FILE,
    PASSAGES_DIR,
    PASSAGES_NAME,
    PASSAGES_SPLIT,
    Manifest,
    PreparedBucket,
    PreparedSet,
    example_features,
    passage_features,
    read_manifest,
    serialize,
    split_name,
)
from m3_jax.input_files import InputError

READ_CHUNK = 4096  # records per ArrayRecord read


@dataclasses.dataclass(frozen=True)
class PreparedExamples:
    """Every example of a prepared set in (dataset, bucket, row) order."""

    query_ids: list[np.ndarray]
    pos: list[np.ndarray]  # passage ids
    neg: list[np.ndarray]
    datasets: np.ndarray  # [N] each example's dataset index


def _chunks(count: int) -> Iterator[range]:
    for start in range(0, count, READ_CHUNK):
        yield range(start, min(start + READ_CHUNK, count))


def read_examples(source: PreparedSet, *, progress: bool = True) -> PreparedExamples:
    total = sum(d.records for d in source.manifest.datasets)
    query_ids, pos, neg, datasets = [], [], [], []
    with tqdm(total=total, desc="reading examples", unit="example", disable=not progress) as bar:
        for dataset in source.manifest.datasets:
            for bucket in dataset.buckets:
                for rows in _chunks(bucket.examples):
                    for example in source.examples(bucket.split, rows):
                        query_ids.append(example["query_ids"])
                        pos.append(example["pos"])
                        neg.append(example["neg"])
                    datasets += [dataset.index] * len(rows)
                    bar.update(len(rows))
    return PreparedExamples(query_ids, pos, neg, np.asarray(datasets, np.int64))


def read_passages(source: PreparedSet, *, progress: bool = True) -> list[np.ndarray]:
    """The passage table: entry i is passage id i's token ids."""
    count = source.manifest.passages
    out: list[np.ndarray] = []
    with tqdm(total=count, desc="reading passages", unit="passage", disable=not progress) as bar:
        for rows in _chunks(count):
            out += source.passages(rows)
            bar.update(len(rows))
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def _write_passages(source: PreparedSet, staging: Path, new_passages: Sequence[np.ndarray]):
    root = staging / PASSAGES_DIR
    root.mkdir(parents=True)
    pattern = f"{PASSAGES_NAME}-{PASSAGES_SPLIT}.array_record-*"
    shards = sorted(
        f for f in (source.path / PASSAGES_DIR).glob(pattern) if not f.name.endswith(".partial")
    )
    count = len(shards) + bool(new_passages)
    for index, shard in enumerate(shards):
        _link_or_copy(shard, shard_file(root, PASSAGES_NAME, PASSAGES_SPLIT, index, count))
    if new_passages:
        features = passage_features()
        write_records(
            shard_file(root, PASSAGES_NAME, PASSAGES_SPLIT, count - 1, count),
            (serialize(features, {"ids": ids}) for ids in new_passages),
        )


def check_output(source: PreparedSet, out: str | os.PathLike) -> None:
    """Refuses an output that is the input set or an existing directory other than a prepared
    set (which is replaced)."""
    out = Path(out)
    if out.exists() and not (out / MANIFEST_FILE).is_file():
        raise InputError(f"{out}: exists and is not a prepared set; choose another --output")
    if out.resolve() == source.path.resolve():
        raise InputError(f"{out}: is the input set; write the mined set elsewhere")


def write_with_negatives(
    source: PreparedSet,
    examples: PreparedExamples,
    negatives: Sequence[np.ndarray],
    out: str | os.PathLike,
    *,
    passage_lengths: np.ndarray,
    new_passages: Sequence[np.ndarray] = (),
    mined: dict[str, Any],
    progress: bool = True,
) -> Manifest:
    """Writes `source` with example i's negatives replaced by the passage ids `negatives[i]`
    into `out` (see the module docstring); returns its manifest.

    passage_lengths: the token count of every passage id, the new ones included; new_passages:
    the token ids of passage ids `source.manifest.passages` onwards; mined: what
    `settings["mined"]` records. An existing `out` is replaced only if it is a prepared set."""
    out = Path(out)
    check_output(source, out)
    if len(negatives) != len(examples.query_ids):
        raise ValueError(f"{len(negatives)} negative lists for {len(examples.query_ids)} examples")
    expected = source.manifest.passages + len(new_passages)
    if len(passage_lengths) != expected:
        raise ValueError(f"{len(passage_lengths)} passage lengths for {expected} passages")
    staging = out.with_name(out.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _write_passages(source, staging, new_passages)

    settings = source.manifest.settings
    lengths = tuple(settings["bucket_lengths"])
    longest = np.array(
        [
            passage_lengths[np.concatenate([p, n]).astype(np.int64)].max()
            for p, n in zip(examples.pos, negatives, strict=True)
        ],
        np.int64,
    )
    buckets = bucket_index(longest, lengths)
    features = example_features()
    no_scores = np.zeros(0, np.float32)
    datasets = []
    bar = tqdm(total=len(longest), desc="writing examples", unit="example", disable=not progress)
    with bar:
        for dataset in source.manifest.datasets:
            members = np.flatnonzero(examples.datasets == dataset.index)
            entries, first_without_neg = [], None
            for b in np.unique(buckets[members]):
                rows = members[buckets[members] == b]
                split = split_name(dataset.index, lengths[b])
                for row, i in enumerate(rows):
                    if first_without_neg is None and len(negatives[i]) == 0:
                        first_without_neg = f"{out}:{split}:{row}"
                values = (
                    {
                        "query_ids": examples.query_ids[i],
                        "pos": examples.pos[i],
                        "neg": np.asarray(negatives[i], np.int64),
                        "pos_scores": no_scores,
                        "neg_scores": no_scores,
                    }
                    for i in rows
                )
                write_records(
                    shard_file(staging, EXAMPLES_NAME, split, 0, 1),
                    (serialize(features, v) for v in values),
                )
                bar.update(len(rows))
                entries.append(
                    PreparedBucket(
                        passage_len=int(lengths[b]),
                        split=split,
                        examples=len(rows),
                        max_query_len=max(len(examples.query_ids[i]) for i in rows),
                        max_passage_len=int(longest[rows].max()),
                    )
                )
            datasets.append(
                dataclasses.replace(
                    dataset,
                    first_without_neg=first_without_neg,
                    first_without_scores=f"{out}:{entries[0].split}:0 (mined: scores dropped)",
                    min_negatives=min(len(negatives[i]) for i in members),
                    buckets=tuple(entries),
                )
            )
    manifest = dataclasses.replace(
        source.manifest,
        settings={**settings, "mined": mined},
        datasets=tuple(datasets),
        passages=expected,
        query_tokens=sum(map(len, examples.query_ids)),
        passage_tokens=int(np.sum(passage_lengths)),
    )
    write_metadata(staging, manifest)
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=1), "utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return read_manifest(out)  # as JSON gives it back (tuples in `mined` become lists)
