"""Training records from FlagEmbedding-style jsonl files, validated up front.

One JSON object per line: `{"query": str, "pos": [str, ...], "neg": [str, ...]}`, optionally with
teacher scores `pos_scores`/`neg_scores` aligned with `pos`/`neg`, a per-record query `prompt`, and
FlagEmbedding's per-file `type`, `batch_size` and `train_group_size`. Other fields are ignored.
RetroMAE pre-training reads plain texts, `{"text": str}` (FlagEmbedding's pre-training format):
such a line is a record with an empty query and the text as its only passage, so texts are
prepared, bucketed by length and batched like any other records. Every record is checked before
any is returned, so a bad line deep in a file fails before training starts, with the file, line
and field in the message.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from m3_jax.input_files import InputError, read_jsonl

# The `type` values of the new FlagEmbedding `AbsDataset`.
RECORD_TYPES = ("normal", "only_1neg", "symmetric_class", "symmetric_sts", "symmetric_clustering")
DATA_SUFFIXES = (".jsonl", ".json")
# Teacher scores, index-aligned with `pos` / `neg`.
SCORE_FIELDS = ("pos_scores", "neg_scores")


@dataclasses.dataclass(frozen=True)
class Record:
    """One training example. `source` is `path:line`, for error messages."""

    query: str
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    pos_scores: tuple[float, ...] | None
    neg_scores: tuple[float, ...] | None
    prompt: str | None
    type: str | None
    batch_size: int | None  # FlagEmbedding's per-file fields (every record of a file agrees)
    train_group_size: int | None
    source: str


def data_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files named by `paths`: files as given, directories as their sorted .jsonl/.json files."""
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not found:
                raise InputError(f"{path}: directory holds no {' or '.join(DATA_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return files


def iter_records(
    path: str | Path, byte_range: tuple[int, int] | None = None, first_line: int = 1
) -> Iterator[Record]:
    """The validated records of one file, or of lines [start, end) of it (`read_jsonl`)."""
    for where, obj in read_jsonl(path, byte_range, first_line):
        yield parse_record(obj, where)


def parse_record(obj: Any, where: str) -> Record:
    """A validated `Record` from one decoded JSON value; `where` is `path:line`."""
    if "query" not in obj and "text" in obj:
        return text_record(obj, where)
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise InputError(f"{where}: field 'query': {_describe_missing(obj, 'query')}")
    pos = _texts(obj, "pos", where, required=True)
    neg = _texts(obj, "neg", where, required=False)
    pos_scores = _scores(obj, "pos_scores", len(pos), "pos", where)
    neg_scores = _scores(obj, "neg_scores", len(neg), "neg", where)
    # Knowledge distillation needs a score for every passage of a group, so half a set is a mistake.
    if pos_scores is not None and neg_scores is None and neg:
        raise InputError(f"{where}: field 'neg_scores': missing while 'pos_scores' is given")
    if neg_scores is not None and pos_scores is None:
        raise InputError(f"{where}: field 'pos_scores': missing while 'neg_scores' is given")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"{where}: field 'prompt': expected a string, got {type(prompt).__name__}")
    record_type = obj.get("type")
    if record_type is not None and record_type not in RECORD_TYPES:
        raise InputError(
            f"{where}: field 'type': unknown value {record_type!r}; expected one of "
            f"{', '.join(RECORD_TYPES)}"
        )
    batch_size = _positive_int(obj, "batch_size", where)
    group_size = _positive_int(obj, "train_group_size", where)
    return Record(
        query, pos, neg, pos_scores, neg_scores, prompt, record_type, batch_size, group_size, where
    )


def text_record(obj: dict, where: str) -> Record:
    """A plain-text line, `{"text": str}`: an empty query with the text as its positive."""
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: field 'text': {_describe_missing(obj, 'text')}")
    return Record("", (text,), (), None, None, None, None, None, None, where)


def _positive_int(obj: dict, field: str, where: str) -> int | None:
    value = obj.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{where}: field '{field}': expected a positive integer, got {value!r}")
    return value


def _describe_missing(obj: dict, field: str) -> str:
    if field not in obj or obj[field] is None:
        return "missing"
    value = obj[field]
    if isinstance(value, str):
        return "empty or blank string"
    return f"expected a string, got {type(value).__name__}"


def _texts(obj: dict, field: str, where: str, *, required: bool) -> tuple[str, ...]:
    value = obj.get(field)
    if value is None:
        if required:
            raise InputError(f"{where}: field '{field}': missing; expected a list of strings")
        return ()
    if not isinstance(value, list):
        raise InputError(
            f"{where}: field '{field}': expected a list of strings, got {type(value).__name__}"
        )
    if required and not value:
        raise InputError(f"{where}: field '{field}': empty list; at least one passage is needed")
    for index, text in enumerate(value):
        if not isinstance(text, str):
            raise InputError(
                f"{where}: field '{field}[{index}]': expected a string, got {type(text).__name__}"
            )
        if not text.strip():
            raise InputError(f"{where}: field '{field}[{index}]': empty or blank string")
    return tuple(value)


def _scores(
    obj: dict, field: str, expected: int, texts_field: str, where: str
) -> tuple[float, ...] | None:
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, list):
        raise InputError(
            f"{where}: field '{field}': expected a list of numbers, got {type(value).__name__}"
        )
    if len(value) != expected:
        raise InputError(
            f"{where}: field '{field}': {len(value)} scores for {expected} '{texts_field}' "
            "passages; they must be index-aligned"
        )
    for index, score in enumerate(value):
        # bool is an int subclass in Python, but `true` is never a meaningful teacher score.
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise InputError(
                f"{where}: field '{field}[{index}]': expected a number, got {score!r:.40}"
            )
        if not math.isfinite(score):
            raise InputError(f"{where}: field '{field}[{index}]': not finite ({score})")
    return tuple(float(s) for s in value)
