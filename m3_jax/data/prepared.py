"""The prepared training set: a TFDS dataset in ArrayRecord files, tokenized once.

`m3-jax data prepare` (`m3_jax.data.prepare`) writes it; training opens it on every host for
random access. A prepared directory holds two TFDS datasets, each readable with plain
`tfds.builder_from_directory(path).as_data_source()` (no TensorFlow, no m3_jax code):

    OUT/                 the examples: one split per (dataset, length bucket), e.g. `d0_len256`
        dataset_info.json, features.json, m3_examples-d0_len256.array_record-00000-of-00002, ...
        passages/        every distinct passage once, split `train`, index = passage id
            dataset_info.json, features.json, m3_passages-train.array_record-00000-of-00003, ...
        manifest.json    what the training loader needs without reading a record

An example is `query_ids` (token ids, with <s> and </s>, instruction included, truncated to the
prepared `query_max_len`), `pos` and `neg` (passage ids) and `pos_scores` / `neg_scores`
(teacher scores, empty when the record has none). A passage is `ids`, truncated to the prepared
`passage_max_len`. Each variable-length field is a TFDS tensor of shape `(None,)` stored as its
raw little-endian bytes (`Encoding.BYTES`): 7x faster to serialize than varint int64 lists, and
faster to read back; TFDS decodes it to a numpy array.

Each input file, and each file of an input directory, is one dataset (FlagEmbedding trains every
batch from one dataset). An example's length bucket is the smallest of `bucket_lengths` that holds its
longest passage (pos and neg), as in FlagEmbedding's `split_data_by_length.py`, so a batch plan
needs only the counts in the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

SCHEMA_VERSION = 3
MANIFEST_FILE = "manifest.json"
PASSAGES_DIR = "passages"
PASSAGES_SPLIT = "train"
EXAMPLES_NAME = "m3_examples"
PASSAGES_NAME = "m3_passages"
# A directory whose name ends so trains without in-batch negatives (FlagEmbedding's convention).
NO_IN_BATCH_NEG_SUFFIX = "no_in_batch_neg"
# Files the tokenizer fingerprint covers (the ones that change token ids).
TOKENIZER_FINGERPRINT_FILES = (
    "tokenizer.json",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _ragged(dtype: Any) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(None,), dtype=dtype, encoding=tfds.features.Encoding.BYTES)


def example_features() -> tfds.features.FeaturesDict:
    """The TFDS features of an example (one dict for every examples split)."""
    return tfds.features.FeaturesDict(
        {
            "query_ids": _ragged(np.int32),
            "pos": _ragged(np.int64),
            "neg": _ragged(np.int64),
            "pos_scores": _ragged(np.float32),
            "neg_scores": _ragged(np.float32),
        }
    )


def passage_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"ids": _ragged(np.int32)})


def serialize(features: tfds.features.FeaturesDict, values: dict[str, np.ndarray]) -> bytes:
    """`features.serialize_example(values)`, byte for byte, for these features only (every
    field a 1-D `Encoding.BYTES` tensor: a tf.train.Example of one bytes_list per field), at a
    third of the cost: TFDS's generic per-record encoding is most of the write stage."""
    fields = {
        name: tf_feature_pb2.Feature(
            bytes_list=tf_feature_pb2.BytesList(
                value=[np.asarray(values[name], feature.np_dtype).tobytes()]
            )
        )
        for name, feature in features.items()
    }
    example = tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=fields))
    return example.SerializeToString()


def split_name(dataset: int, bucket_length: int) -> str:
    return f"d{dataset}_len{bucket_length}"


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike) -> str:
    """sha256 over the tokenizer files that decide token ids (names and contents)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FINGERPRINT_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class PreparedBucket:
    """The examples of one dataset whose longest passage fits `passage_len` tokens."""

    passage_len: int
    split: str
    examples: int
    max_query_len: int
    max_passage_len: int


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """One input file (`directory`: the input directory holding it, or None). `type`,
    `batch_size` and `train_group_size` are the FlagEmbedding per-file fields (from the
    records), None when absent; `min_negatives` is the fewest negatives of a record."""

    index: int
    source: str
    directory: str | None
    records: int
    no_in_batch_neg: bool
    first_without_neg: str | None  # FILE:LINE of the first record without negatives
    first_without_scores: str | None  # ... without teacher scores for all its passages
    type: str | None
    batch_size: int | None
    train_group_size: int | None
    min_negatives: int
    buckets: tuple[PreparedBucket, ...]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What `manifest.json` records. `settings` are the prepare settings (tokenizer
    fingerprint, max lengths, instructions, bucket lengths) and `inputs` the input files' sizes
    and sha256, which together decide whether an existing output is the one asked for."""

    schema_version: int
    settings: dict[str, Any]
    inputs: tuple[dict[str, Any], ...]
    datasets: tuple[PreparedDataset, ...]
    passages: int
    query_tokens: int
    passage_tokens: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        datasets = tuple(
            PreparedDataset(**{**d, "buckets": tuple(PreparedBucket(**b) for b in d["buckets"])})
            for d in obj["datasets"]
        )
        return cls(**{**obj, "inputs": tuple(obj["inputs"]), "datasets": datasets})


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of the prepared directory `path`; errors name what is missing or too new."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a prepared training set (no {MANIFEST_FILE})")
    obj = json.loads(file.read_text(encoding="utf-8"))
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{file}: schema version {version}; this m3_jax reads version {SCHEMA_VERSION} "
            "(prepare the data again, with --overwrite)"
        )
    return Manifest.from_json(obj)


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def describe_settings_change(want: dict[str, Any], have: dict[str, Any]) -> str:
    """`key: have -> want` for every setting that differs (for error messages)."""
    keys = sorted(set(want) | set(have))
    return ", ".join(
        f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in keys if want.get(k) != have.get(k)
    )


def flat(lists: Sequence[Sequence[int]], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of a list of sequences, the ragged layout used between the stages."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    values = np.fromiter(
        itertools.chain.from_iterable(lists), dtype=dtype, count=int(lengths.sum())
    )
    return values, lengths


class PreparedSet:
    """A prepared directory opened for random access (TFDS ArrayRecord data sources)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._examples = tfds.builder_from_directory(self.path).as_data_source()
        passages = tfds.builder_from_directory(self.path / PASSAGES_DIR).as_data_source()
        self._passages = passages[PASSAGES_SPLIT]

    def examples(self, split: str, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return self._examples[split].__getitems__([int(i) for i in indices])

    def passages(self, ids: Sequence[int]) -> list[np.ndarray]:
        return [p["ids"] for p in self._passages.__getitems__([int(i) for i in ids])]

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuses a set whose tokenizer or instructions differ from `settings` (a
        `PrepareSettings.to_json()` of the run), or whose max lengths are shorter."""
        have = self.manifest.settings
        for key in ("tokenizer_fingerprint", "query_instruction", "passage_instruction"):
            if have[key] != settings[key]:
                raise ValueError(
                    f"{self.path}: prepared with {key} {have[key]!r}, but the run has "
                    f"{settings[key]!r}; prepare the data again with the run's settings"
                )
        if have["instruction_format"] != settings["instruction_format"]:
            raise ValueError(
                f"{self.path}: prepared with instruction_format {have['instruction_format']!r}, "
                f"but the run has {settings['instruction_format']!r}"
            )
        for key in ("query_max_len", "passage_max_len"):
            if have[key] < settings[key]:
                raise ValueError(
                    f"{self.path}: prepared with {key}={have[key]}, shorter than the run's "
                    f"{settings[key]}; training may truncate shorter, never longer"
                )
