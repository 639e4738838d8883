"""What `data.train_files` names, opened as prepared sets.

An entry that is a prepared directory (`m3-jax data prepare`) is opened as it is, after checking
that it was prepared with the run's tokenizer and instructions and at least the run's max
lengths. Any other entry (a jsonl file or a directory of them) is prepared with the run's
settings into `data.cache_dir`, under a key of its content, the tokenizer and the settings, so a
second run on the same data starts at once and changed data are prepared again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from m3_jax.config import DataConfig
from m3_jax.data.prepare import PrepareSettings, file_identity, input_datasets, prepare
from m3_jax.data.prepared import SCHEMA_VERSION, PreparedSet, is_prepared

log = logging.getLogger(__name__)


def entries(train_files: str | Sequence[str]) -> list[str]:
    """`data.train_files` as a list of paths: a sequence of them, or one string of
    comma-separated paths (what a `--config.data.train_files=a,b` override gives)."""
    if isinstance(train_files, str):
        return [p for p in train_files.split(",") if p]
    return [str(p) for p in train_files]


def prepare_settings(data: DataConfig, tokenizer_dir: str | os.PathLike) -> PrepareSettings:
    return PrepareSettings(
        tokenizer=str(tokenizer_dir),
        query_max_len=data.query_max_len,
        passage_max_len=data.passage_max_len,
        query_instruction=data.query_instruction,
        passage_instruction=data.passage_instruction,
        instruction_format=data.instruction_format,
        bucket_lengths=data.passage_buckets,
    )


def cache_key(entry: str, settings: PrepareSettings) -> str:
    """sha256 of the entry's files (path, size, content), the prepare settings and the format
    version."""
    identity = {
        "schema_version": SCHEMA_VERSION,
        "files": [file_identity(d.file) for d in input_datasets([entry])],
        "settings": settings.to_json(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def open_sources(
    train_files: str | Sequence[str],
    data: DataConfig,
    tokenizer_dir: str | os.PathLike,
    *,
    process_index: int = 0,
    progress: bool = True,
) -> list[PreparedSet]:
    """The prepared sets of `train_files`, preparing jsonl entries into the cache first."""
    paths = entries(train_files)
    if not paths:
        raise ValueError("data.train_files is empty; name jsonl files or prepared directories")
    settings = prepare_settings(data, tokenizer_dir)
    wanted = settings.to_json()
    sources = []
    for entry in paths:
        if is_prepared(entry):
            source = PreparedSet(entry)
            source.check_settings(wanted)
        else:
            out = Path(data.cache_dir).expanduser() / cache_key(entry, settings)
            if not is_prepared(out):
                log.info("preparing %s into %s", entry, out)
            # Every host prepares (the cache may be local to it); the first to finish publishes.
            prepare([entry], out, settings, progress=progress, staging_tag=f".host{process_index}")
            source = PreparedSet(out)
        sources.append(source)
    return sources
