"""Prepare FlagEmbedding jsonl training data once: validate, tokenize, deduplicate passages,
bucket by length, and write the TFDS / ArrayRecord set that training reads (`prepared.py`).

The stages, each over line-aligned pieces of the inputs (`piece_bytes`; by default 1/64 of
them, between 1 and 32 MiB, so that small inputs still spread evenly over the workers), in
`num_workers` processes:

1. scan: a worker validates every record of a piece (file:line:field errors), applies the
   instructions, tokenizes the queries and keys each passage by a 128-bit hash of its text.
2. passages: ids by first occurrence over all pieces; each piece tokenizes the distinct
   passages that occur first in it, so every passage is tokenized once.
3. write: each example's bucket from its longest passage; each worker serializes its piece's
   passages and examples into ArrayRecord shards; then the TFDS metadata and `manifest.json`.

`prepare_beam.prepare_with_beam` runs the same stages on Apache Beam, with stage 2's passage
numbering as a Beam shuffle instead of one in-memory array, and writes the same output.

Everything is written under `OUT.incomplete/` and renamed to OUT at the end, so OUT is never
half-written. Rerunning the same command after a crash keeps the finished pieces and shards;
other inputs or settings are refused unless `overwrite`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from m3_jax.bucketing import TRAINING_LENGTHS, bucket_index, lengths_up_to
from m3_jax.config import DataConfig
from m3_jax.data.prepared import (
    EXAMPLES_NAME,
    MANIFEST_FILE,
    NO_IN_BATCH_NEG_SUFFIX,
    PASSAGES_DIR,
    PASSAGES_NAME,
    PASSAGES_SPLIT,
    SCHEMA_VERSION,
    Manifest,
    PreparedBucket,
    PreparedDataset,
    describe_settings_change,
    example_features,
    flat,
    passage_features,
    read_manifest,
    serialize,
    split_name,
    tokenizer_fingerprint,
)
from m3_jax.data.records import Record, data_files, iter_records
from m3_jax.data.sampler import apply_instructions
from m3_jax.input_files import InputError, line_aligned_pieces
from m3_jax.tokenization import load_tokenizer, save_backend, tokenize

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
WORK_DIR = "work"
# The tokenizer's `tokenizers` backend, saved once by the driver: workers load it in a fraction of
# a second, without importing transformers.
TOKENIZER_FILE = "tokenizer.json"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
# One record per ArrayRecord chunk: the loader reads records at random.
ARRAY_RECORD_OPTIONS = "group_size:1"
TOKENIZE_BATCH = 1024
# The FlagEmbedding per-file fields: every record of a dataset must agree on them.
DATASET_FIELDS = ("type", "batch_size", "train_group_size")


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """How texts become token ids. Training may truncate shorter than the max lengths, never
    longer; the instructions are applied here, once (a record's `prompt` replaces the query
    instruction)."""

    tokenizer: str
    query_max_len: int = 512
    passage_max_len: int = 8192
    query_instruction: str | None = None
    passage_instruction: str | None = None
    instruction_format: str = "{}{}"
    bucket_lengths: tuple[int, ...] = TRAINING_LENGTHS

    def data_config(self) -> DataConfig:
        """The same max lengths and instructions as a DataConfig (which checks them)."""
        return DataConfig(
            query_max_len=self.query_max_len,
            passage_max_len=self.passage_max_len,
            query_instruction=self.query_instruction,
            passage_instruction=self.passage_instruction,
            instruction_format=self.instruction_format,
        )

    def to_json(self) -> dict[str, Any]:
        """What decides the token ids and the buckets (the tokenizer by its fingerprint)."""
        return {
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "query_max_len": self.query_max_len,
            "passage_max_len": self.passage_max_len,
            "query_instruction": self.query_instruction,
            "passage_instruction": self.passage_instruction,
            "instruction_format": self.instruction_format,
            "bucket_lengths": list(lengths_up_to(self.bucket_lengths, self.passage_max_len)),
        }


@dataclasses.dataclass(frozen=True)
class InputDataset:
    """One input file. `directory`: the input directory it was found in (None for a file given
    by itself); training merges a directory's small files (FlagEmbedding's small_threshold)."""

    file: Path
    directory: Path | None
    no_in_batch_neg: bool


@dataclasses.dataclass(frozen=True)
class Piece:
    """Lines [start, end) of `file` (the whole file when `byte_range` is None: .gz)."""

    index: int
    dataset: int
    file: Path
    byte_range: tuple[int, int] | None
    first_line: int
    size: int


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    manifest: Manifest
    out: Path
    already_prepared: bool  # the output existed with these inputs and settings: nothing done


def input_datasets(inputs: Sequence[str | os.PathLike]) -> list[InputDataset]:
    """Each input file is one dataset, and each .jsonl/.json file of an input directory, as in
    FlagEmbedding. A directory whose name ends in `no_in_batch_neg`, or a file whose name (before
    the extension) does, trains without in-batch negatives."""
    if not inputs:
        raise InputError("no input files or directories given")
    datasets = []
    for source in map(Path, inputs):
        if source.is_dir():
            flag = source.name.endswith(NO_IN_BATCH_NEG_SUFFIX)
            datasets += [InputDataset(f, source, flag) for f in data_files(source)]
        else:
            (file,) = data_files(source)
            stem = file.name.split(".")[0]
            datasets.append(InputDataset(file, None, stem.endswith(NO_IN_BATCH_NEG_SUFFIX)))
    return datasets


def file_identity(path: Path) -> dict[str, Any]:
    """Path, size and sha256 of an input file (hashed once per process and file version: the
    training cache key and prepare both ask)."""
    stat = path.stat()
    digest = _sha256(str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    return {"path": str(path.absolute()), "bytes": stat.st_size, "sha256": digest}


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def default_piece_bytes(datasets: Sequence[InputDataset]) -> int:
    """A 64th of the inputs, between 1 and 32 MiB: enough pieces to keep every worker busy to
    the end, few enough that per-piece costs (a shard per bucket, work files) stay small."""
    total = sum(d.file.stat().st_size for d in datasets)
    return int(np.clip(total // 64, 1 << 20, 32 << 20))


def split_into_pieces(datasets: Sequence[InputDataset], piece_bytes: int) -> list[Piece]:
    pieces: list[Piece] = []
    for d, dataset in enumerate(datasets):
        file = dataset.file
        if file.suffix == ".gz":
            pieces.append(Piece(len(pieces), d, file, None, 1, file.stat().st_size))
            continue
        for start, end, line in line_aligned_pieces(file, piece_bytes):
            pieces.append(Piece(len(pieces), d, file, (start, end), line, end - start))
    return pieces


# Stage 1: tokenize one piece ------------------------------------------------------------------


def text_key(encoded: bytes) -> bytes:
    """The 128-bit identity of a passage's UTF-8 text (after its instruction)."""
    return hashlib.blake2b(encoded, digest_size=16).digest()


def record_texts(record: Record, data: DataConfig) -> tuple[str, list[str]]:
    """The record's query and its passages (positives first) as they are tokenized."""
    return apply_instructions(
        record.query, record.pos + record.neg, record.prompt, data, record.type
    )


def scan_piece(piece: Piece, tokenizer: Any, settings: PrepareSettings) -> dict[str, np.ndarray]:
    """The piece's records as flat arrays: queries' token ids, each record's passage references
    (into the piece's distinct passages, positives first), teacher scores, and the distinct
    passages' keys and UTF-8 texts. Passages are tokenized later, once over all pieces
    (`tokenize_passages`), from these texts: the records are parsed and validated once."""
    data = settings.data_config()
    queries: list[str] = []
    refs: list[int] = []
    pos_counts: list[int] = []
    neg_counts: list[int] = []
    scores: list[float] = []
    has_scores: list[bool] = []
    keys: dict[bytes, int] = {}
    texts_of_keys: list[bytes] = []
    fields: dict[tuple[Any, ...], str] = {}
    lacking: dict[str, str] = {}  # "neg" / "scores" -> the first record without them
    for record in iter_records(piece.file, piece.byte_range, piece.first_line):
        where = record.source
        fields.setdefault((record.type, record.batch_size, record.train_group_size), where)
        if not record.neg:
            lacking.setdefault("neg", where)
        query, texts = record_texts(record, data)
        queries.append(query)
        for text in texts:
            encoded = text.encode("utf-8")
            key = text_key(encoded)
            if key not in keys:
                keys[key] = len(keys)
                texts_of_keys.append(encoded)
            refs.append(keys[key])
        pos_counts.append(len(record.pos))
        neg_counts.append(len(record.neg))
        scored = record.pos_scores is not None and (record.neg_scores is not None or not record.neg)
        has_scores.append(scored)
        if not scored:
            lacking.setdefault("scores", where)
        scores.extend(
            (record.pos_scores or ()) + (record.neg_scores or ())
            if scored
            else [np.nan] * len(texts)
        )
    query_values, query_lengths = flat(
        _tokenize(tokenizer, queries, settings.query_max_len), np.int32
    )
    return {
        "query_values": query_values,
        "query_lengths": query_lengths,
        "pos_counts": np.asarray(pos_counts, np.int64),
        "neg_counts": np.asarray(neg_counts, np.int64),
        "refs": np.asarray(refs, np.int64),
        "scores": np.asarray(scores, np.float32),
        "has_scores": np.asarray(has_scores, bool),
        "passage_keys": np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16),
        "passage_texts": np.frombuffer(b"".join(texts_of_keys), np.uint8),
        "passage_text_bytes": np.fromiter(map(len, texts_of_keys), np.int64, len(keys)),
        "fields": np.asarray(json.dumps([[list(k), w] for k, w in fields.items()])),
        "lacking": np.asarray(json.dumps(lacking)),
    }


def tokenize_passages(
    scan: Mapping[str, np.ndarray], owned: np.ndarray, tokenizer: Any, settings: PrepareSettings
) -> dict[str, np.ndarray]:
    """Token ids of a piece's distinct passages marked in `owned` (those whose first occurrence
    over all pieces is here), in the order of `scan_piece`'s keys; `scan`: its arrays."""
    blob = scan["passage_texts"].tobytes()
    ends = np.cumsum(scan["passage_text_bytes"])
    starts = ends - scan["passage_text_bytes"]
    stored = [blob[a:b].decode("utf-8") for a, b in zip(starts[owned], ends[owned], strict=True)]
    values, lengths = flat(_tokenize(tokenizer, stored, settings.passage_max_len), np.int32)
    return {"passage_values": values, "passage_lengths": lengths}


def _tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        out.extend(tokenize(tokenizer, texts[start : start + TOKENIZE_BATCH], max_length))
    return out


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(partial, path)


# Stage 2: plan ids, buckets and shards --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PieceWrite:
    """What stage 3 writes for one piece: its records (`scan_file`), the passages it stores
    (`passages_file`: those whose first occurrence is here), the global id of each of its
    distinct passages and each record's bucket (`refs_file`, see `save_refs`), and the shard
    files."""

    scan_file: Path
    passages_file: Path
    refs_file: Path
    passage_shard: Path | None
    example_shards: dict[int, Path]  # bucket index -> shard file


def save_refs(work: Path, piece: Piece, passage_ids: np.ndarray, buckets: np.ndarray) -> None:
    """The global id of each of the piece's distinct passages and each record's bucket index."""
    arrays = {"passage_ids": passage_ids, "example_buckets": buckets}
    save_npz(work_file(work, "refs", piece), arrays)


def piece_write(
    work: Path, piece: Piece, passage_shard: Path | None, example_shards: dict[int, Path]
) -> PieceWrite:
    return PieceWrite(
        work_file(work, "scan", piece),
        work_file(work, "passages", piece),
        work_file(work, "refs", piece),
        passage_shard,
        example_shards,
    )


def _first_occurrence_ids(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(id of every key, whether it is that id's first occurrence); ids count distinct keys in
    order of first occurrence."""
    as_void = np.ascontiguousarray(keys).view(np.dtype((np.void, 16))).ravel()
    _, first, inverse = np.unique(as_void, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    ids = rank[inverse.ravel()]
    owned = first[inverse.ravel()] == np.arange(len(keys))
    return ids, owned


def shard_file(root: Path, name: str, split: str, index: int, count: int) -> Path:
    return root / f"{name}-{split}.array_record-{index:05d}-of-{count:05d}"


# Stage 3: write one piece's shards ------------------------------------------------------------


def write_records(path: Path, serialized: Iterator[bytes]) -> None:
    if path.exists():
        return  # written before a restart; the same inputs give the same bytes
    partial = path.with_name(path.name + ".partial")
    writer = ArrayRecordWriter(str(partial), ARRAY_RECORD_OPTIONS)
    for record in serialized:
        writer.write(record)
    writer.close()
    os.replace(partial, path)


def write_piece(task: PieceWrite) -> None:
    arrays = np.load(task.scan_file)
    if task.passage_shard is not None:
        features = passage_features()
        stored = np.load(task.passages_file)
        values, lengths = stored["passage_values"], stored["passage_lengths"]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        write_records(
            task.passage_shard,
            (
                serialize(features, {"ids": values[offsets[i] : offsets[i + 1]]})
                for i in range(len(lengths))
            ),
        )
    features = example_features()
    q_values, q_lengths = arrays["query_values"], arrays["query_lengths"]
    q_offsets = np.concatenate([[0], np.cumsum(q_lengths)])
    counts = arrays["pos_counts"] + arrays["neg_counts"]
    r_offsets = np.concatenate([[0], np.cumsum(counts)])
    refs = np.load(task.refs_file)
    ids, example_buckets = refs["passage_ids"][arrays["refs"]], refs["example_buckets"]
    scores, has_scores, pos_counts = arrays["scores"], arrays["has_scores"], arrays["pos_counts"]

    def examples(bucket: int) -> Iterator[bytes]:
        for row in np.flatnonzero(example_buckets == bucket):
            a, b, n_pos = r_offsets[row], r_offsets[row + 1], pos_counts[row]
            row_scores = scores[a:b] if has_scores[row] else np.zeros(0, np.float32)
            yield serialize(
                features,
                {
                    "query_ids": q_values[q_offsets[row] : q_offsets[row + 1]],
                    "pos": ids[a : a + n_pos],
                    "neg": ids[a + n_pos : b],
                    "pos_scores": row_scores[:n_pos],
                    "neg_scores": row_scores[n_pos:],
                },
            )

    for bucket, path in task.example_shards.items():
        write_records(path, examples(bucket))


# The driver -----------------------------------------------------------------------------------


def prepare(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    settings: PrepareSettings,
    *,
    num_workers: int = 1,
    overwrite: bool = False,
    piece_bytes: int | None = None,
    progress: bool = True,
    staging_tag: str = "",
) -> PrepareResult:
    """Prepares `inputs` into `out` (see the module docstring) in `num_workers` local
    processes; returns its manifest.

    staging_tag: distinguishes the staging directories of processes that may prepare the same
    output at once (the hosts of a training run); the first to finish publishes it."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    job = begin(inputs, out, settings, overwrite, piece_bytes, staging_tag)
    if isinstance(job, PrepareResult):
        return job
    pieces = job.pieces
    work = job.staging / WORK_DIR
    sizes = [p.size for p in pieces]
    with job.removing_staging_on_input_errors(), _pool(num_workers) as run:
        _run_pending(run, _scan_task, pieces, work, "scan", settings, None, progress)
        scans = [np.load(work_file(work, "scan", p)) for p in pieces]
        ids, owned, bounds = _passage_ids(scans)
        owned_of = [owned[bounds[i] : bounds[i + 1]] for i in range(len(pieces))]
        _run_pending(run, _passages_task, pieces, work, "passages", settings, owned_of, progress)
        stored = [np.load(work_file(work, "passages", p))["passage_lengths"] for p in pieces]
        passage_lengths = np.zeros(int(owned.sum()), np.int64)
        passage_lengths[ids[owned]] = np.concatenate(stored)
        lengths = job.bucket_lengths
        summarized = [
            summarize_piece(
                piece, scan, passage_lengths[ids[bounds[i] : bounds[i + 1]]], owned_of[i], lengths
            )
            for i, (piece, scan) in enumerate(zip(pieces, scans, strict=True))
        ]
        summaries = [summary for _, summary in summarized]
        manifest = manifest_of(summaries, job.datasets, job.wanted)
        shards = plan_shards(summaries, job.staging, lengths)
        for i, piece in enumerate(pieces):
            save_refs(work, piece, ids[bounds[i] : bounds[i + 1]], summarized[i][0])
        writes = [piece_write(work, piece, *shards[i]) for i, piece in enumerate(pieces)]
        _run_all(run, write_piece, writes, "writing", sizes, progress)
    return job.finish(manifest)


@dataclasses.dataclass(frozen=True)
class Job:
    """A prepare under way: its output, staging directory, datasets, their pieces and what the
    output must match."""

    out: Path
    staging: Path
    datasets: list[InputDataset]
    pieces: list[Piece]
    wanted: dict[str, Any]
    overwrite: bool

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        return tuple(self.wanted["settings"]["bucket_lengths"])

    @contextlib.contextmanager
    def removing_staging_on_input_errors(self) -> Iterator[None]:
        try:
            yield
        except InputError:
            # Fixing the input changes it, so nothing staged could be reused.
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def finish(self, manifest: Manifest) -> PrepareResult:
        """The TFDS metadata and the manifest, then the staging directory renamed to `out`."""
        staging, out = self.staging, self.out
        write_metadata(staging, manifest)
        shutil.rmtree(staging / WORK_DIR)
        (staging / SETTINGS_FILE).unlink()
        text = json.dumps(manifest.to_json(), indent=1)
        (staging / MANIFEST_FILE).write_text(text, encoding="utf-8")
        if out.exists() and self.overwrite:
            shutil.rmtree(out)
        try:
            os.replace(staging, out)
        except OSError:
            if read_manifest(out) != manifest:
                raise
            shutil.rmtree(staging)  # another process published the same set first
        return PrepareResult(manifest, out, already_prepared=False)


def begin(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    settings: PrepareSettings,
    overwrite: bool,
    piece_bytes: int | None = None,
    staging_tag: str = "",
) -> Job | PrepareResult:
    """The job of preparing `inputs` into `out`, with its staging directory open (a leftover of
    the same job, pieces included, is continued); or the result, if `out` is that job's
    finished output. `piece_bytes`: see `default_piece_bytes`."""
    out = Path(out)
    datasets = input_datasets(inputs)
    wanted = {
        "settings": settings.to_json(),
        "inputs": [file_identity(d.file) for d in datasets],
    }
    if (out / MANIFEST_FILE).is_file() and not overwrite:
        manifest = read_manifest(out)
        have = {"settings": manifest.settings, "inputs": list(manifest.inputs)}
        if have == wanted:
            return PrepareResult(manifest, out, already_prepared=True)
        raise FileExistsError(f"{out}: {_differs(wanted, have)}; pass --overwrite to replace it")
    if out.exists() and not overwrite and not (out / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{out}: exists and is not a prepared set; choose another --out")
    staging = out.with_name(f"{out.name}.incomplete{staging_tag}")
    piece_bytes = piece_bytes or default_piece_bytes(datasets)
    # Work files are per piece: a leftover cut into other pieces cannot be continued.
    _open_staging(staging, {"schema_version": SCHEMA_VERSION, "piece_bytes": piece_bytes, **wanted})
    (staging / PASSAGES_DIR).mkdir(exist_ok=True)
    tokenizer_file = staging / WORK_DIR / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        partial = tokenizer_file.with_name(TOKENIZER_FILE + ".partial")
        save_backend(load_tokenizer(settings.tokenizer), partial)
        os.replace(partial, tokenizer_file)
    pieces = split_into_pieces(datasets, piece_bytes)
    return Job(out, staging, datasets, pieces, wanted, overwrite)


def _differs(wanted: dict, have: dict) -> str:
    if wanted["settings"] != have["settings"]:
        change = describe_settings_change(wanted["settings"], have["settings"])
        return f"prepared with other settings ({change})"
    return "prepared from other input files (or their content changed)"


def _open_staging(staging: Path, wanted: dict) -> None:
    """The staging directory of this prepare: a leftover of the same prepare is continued, one
    of other inputs or settings (for the same output) is discarded."""
    settings_file = staging / SETTINGS_FILE
    if staging.exists():
        have = json.loads(settings_file.read_text()) if settings_file.is_file() else None
        if have == wanted:
            log.info("%s: continuing an unfinished prepare", staging)
            return
        log.warning("%s: discarding an unfinished prepare of other inputs or settings", staging)
        shutil.rmtree(staging)
    (staging / WORK_DIR).mkdir(parents=True)
    settings_file.write_text(json.dumps(wanted, indent=1), encoding="utf-8")


def work_file(work: Path, stage: str, piece: Piece, suffix: str = ".npz") -> Path:
    return work / f"{stage}-{piece.index:06d}{suffix}"


def _run_pending(run, fn, pieces, work, stage, settings, owned_of, progress) -> None:
    """Runs `fn` on the pieces whose `stage` file is missing (finished ones survive a crash)."""
    todo = [p for p in pieces if not work_file(work, stage, p).is_file()]
    tasks = [(p, settings, None if owned_of is None else owned_of[p.index], work) for p in todo]
    what = {"scan": "reading", "passages": "tokenizing passages"}[stage]
    _run_all(run, fn, tasks, what, [p.size for p in todo], progress)


def worker_tokenizer(work: Path) -> Tokenizer:
    """The job's tokenizer (`begin` saved it in the work directory), loaded once per process
    and version of the file (a discarded staging directory's successor may hold another)."""
    file = work / TOKENIZER_FILE
    stat = file.stat()
    return _load_backend(str(file), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_backend(file: str, mtime_ns: int, size: int) -> Tokenizer:
    return Tokenizer.from_file(file)


def _scan_task(task) -> None:
    piece, settings, _, work = task
    arrays = scan_piece(piece, worker_tokenizer(work), settings)
    save_npz(work_file(work, "scan", piece), arrays)


def _passages_task(task) -> None:
    piece, settings, owned, work = task
    scan = np.load(work_file(work, "scan", piece))
    arrays = tokenize_passages(scan, owned, worker_tokenizer(work), settings)
    save_npz(work_file(work, "passages", piece), arrays)


class _pool:
    """`run(fn, tasks)` in this process (one worker) or in `num_workers` spawned processes,
    yielding as tasks finish; a failure in any task is raised here."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.executor: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> Callable:
        if self.num_workers > 1:
            self.executor = concurrent.futures.ProcessPoolExecutor(
                self.num_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_quiet_worker,
            )
        return self.run

    def __exit__(self, *exc: Any) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)

    def run(self, fn: Callable, tasks: Sequence) -> Iterator[int]:
        if self.executor is None:
            for i, task in enumerate(tasks):
                fn(task)
                yield i
            return
        futures = {self.executor.submit(fn, task): i for i, task in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            future.result()
            yield futures[future]


def _quiet_worker() -> None:
    # One core per worker: the Rust tokenizer's own threads would compete with the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run_all(run, fn, tasks, what: str, sizes: Sequence[int], progress: bool) -> None:
    bar = tqdm(total=int(sum(sizes)), unit="B", unit_scale=True, desc=what, disable=not progress)
    with bar:
        for i in run(fn, tasks):
            bar.update(sizes[i])


def _passage_ids(scans) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global id of every piece-local distinct passage, whether it is the first occurrence,
    the offsets of each piece's passages in those arrays)."""
    keys = np.concatenate([a["passage_keys"] for a in scans])
    ids, owned = _first_occurrence_ids(keys)
    bounds = np.concatenate([[0], np.cumsum([len(a["passage_keys"]) for a in scans])])
    return ids, owned, bounds


@dataclasses.dataclass(frozen=True)
class PieceSummary:
    """What the shard plan and the manifest need from one piece once its passages' ids and
    lengths are known: per bucket index [examples, longest query, longest passage], the fewest
    negatives of a record (None: no records), the FlagEmbedding fields ([values, FILE:LINE] of
    each distinct value), the first records lacking negatives / scores, and the passages it
    owns (first occurrences) with their tokens."""

    piece: int
    dataset: int
    buckets: dict[int, list[int]]
    min_negatives: int | None
    fields: list
    lacking: dict[str, str]
    passages: int
    query_tokens: int
    passage_tokens: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PieceSummary:
        return cls(**{**obj, "buckets": {int(k): v for k, v in obj["buckets"].items()}})


def summarize_piece(
    piece: Piece,
    scan: dict[str, np.ndarray],
    local_lengths: np.ndarray,
    owned: np.ndarray,
    lengths: Sequence[int],
) -> tuple[np.ndarray, PieceSummary]:
    """(each record's bucket index, the piece's summary), given the token length of each of
    its distinct passages (`local_lengths`, in `scan_piece`'s key order) and which of them it
    owns. A record's bucket holds its longest passage (FlagEmbedding's split_data_by_length)."""
    counts = scan["pos_counts"] + scan["neg_counts"]
    if len(counts):
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        longest = np.maximum.reduceat(local_lengths[scan["refs"]], starts)
    else:
        longest = np.zeros(0, np.int64)
    buckets = bucket_index(longest, lengths)
    queries = scan["query_lengths"]
    summary = PieceSummary(
        piece=piece.index,
        dataset=piece.dataset,
        buckets={
            int(b): [
                int((buckets == b).sum()),
                int(queries[buckets == b].max()),
                int(longest[buckets == b].max()),
            ]
            for b in np.unique(buckets)
        },
        min_negatives=int(scan["neg_counts"].min()) if len(counts) else None,
        fields=json.loads(str(scan["fields"])),
        lacking=json.loads(str(scan["lacking"])),
        passages=int(owned.sum()),
        query_tokens=int(queries.sum()),
        passage_tokens=int(local_lengths[owned].sum()),
    )
    return buckets, summary


def plan_shards(
    summaries: Sequence[PieceSummary], staging: Path, lengths: Sequence[int]
) -> list[tuple[Path | None, dict[int, Path]]]:
    """For each piece: its passage shard (None if it owns no passage) and its example shard of
    each bucket it has records in; each split's shards are its pieces', in piece order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for s in summaries:
        for bucket in sorted(s.buckets):
            groups.setdefault((s.dataset, bucket), []).append(s.piece)
    owners = [s.piece for s in summaries if s.passages]
    passages_root = staging / PASSAGES_DIR
    out = []
    for s in summaries:
        shards = {}
        for bucket in sorted(s.buckets):
            members = groups[(s.dataset, bucket)]
            split = split_name(s.dataset, lengths[bucket])
            shards[bucket] = shard_file(
                staging, EXAMPLES_NAME, split, members.index(s.piece), len(members)
            )
        passage_shard = None
        if s.passages:
            index = owners.index(s.piece)
            passage_shard = shard_file(
                passages_root, PASSAGES_NAME, PASSAGES_SPLIT, index, len(owners)
            )
        out.append((passage_shard, shards))
    return out


def manifest_of(
    summaries: Sequence[PieceSummary], datasets: Sequence[InputDataset], wanted: dict
) -> Manifest:
    settings = wanted["settings"]
    lengths = tuple(settings["bucket_lengths"])
    return Manifest(
        schema_version=SCHEMA_VERSION,
        settings=settings,
        inputs=tuple(wanted["inputs"]),
        datasets=tuple(
            _dataset_entry(d, dataset, [s for s in summaries if s.dataset == d], lengths)
            for d, dataset in enumerate(datasets)
        ),
        passages=sum(s.passages for s in summaries),
        query_tokens=sum(s.query_tokens for s in summaries),
        passage_tokens=sum(s.passage_tokens for s in summaries),
    )


def _dataset_entry(
    d: int, dataset: InputDataset, members: Sequence[PieceSummary], lengths: Sequence[int]
) -> PreparedDataset:
    """The manifest entry of dataset `d` from the summaries of its pieces (in piece order)."""
    negatives = [s.min_negatives for s in members if s.min_negatives is not None]
    if not negatives:
        raise InputError(f"{dataset.file}: no records (every line is blank)")
    fields: dict[tuple, str] = {}
    lacking: dict[str, str] = {}
    for s in members:
        for values, where in s.fields:
            fields.setdefault(tuple(values), where)
        for what, where in s.lacking.items():
            lacking.setdefault(what, where)
    if len(fields) > 1:
        (first, where_a), (second, where_b) = list(fields.items())[:2]
        raise InputError(
            f"{where_b}: fields {', '.join(DATASET_FIELDS)} = {list(second)}, but {where_a} has "
            f"{list(first)}; every record of a dataset must agree on them"
        )
    record_type, batch_size, group_size = next(iter(fields)) if fields else (None, None, None)
    buckets = []
    for b, length in enumerate(lengths):
        parts = [s.buckets[b] for s in members if b in s.buckets]
        if parts:
            buckets.append(
                PreparedBucket(
                    passage_len=int(length),
                    split=split_name(d, length),
                    examples=sum(p[0] for p in parts),
                    max_query_len=max(p[1] for p in parts),
                    max_passage_len=max(p[2] for p in parts),
                )
            )
    return PreparedDataset(
        index=d,
        source=str(dataset.file.absolute()),
        directory=None if dataset.directory is None else str(dataset.directory.absolute()),
        records=sum(b.examples for b in buckets),
        no_in_batch_neg=dataset.no_in_batch_neg,
        first_without_neg=lacking.get("neg"),
        first_without_scores=lacking.get("scores"),
        type=record_type,
        batch_size=batch_size,
        train_group_size=group_size,
        min_negatives=min(negatives),
        buckets=tuple(buckets),
    )


def write_metadata(staging: Path, manifest: Manifest) -> None:
    """dataset_info.json and features.json of both TFDS datasets, from the shards on disk."""
    examples = [
        _split_info(staging, EXAMPLES_NAME, b.split) for d in manifest.datasets for b in d.buckets
    ]
    description = "m3_jax prepared training set; see manifest.json"
    tfds.folder_dataset.write_metadata(
        data_dir=staging,
        features=example_features(),
        split_infos=examples,
        filename_template=FILE_TEMPLATE,
        check_data=False,
        description=description,
    )
    tfds.folder_dataset.write_metadata(
        data_dir=staging / PASSAGES_DIR,
        features=passage_features(),
        split_infos=[_split_info(staging / PASSAGES_DIR, PASSAGES_NAME, PASSAGES_SPLIT)],
        filename_template=FILE_TEMPLATE,
        check_data=False,
        description=description,
    )


def _split_info(root: Path, name: str, split: str) -> tfds.core.SplitInfo:
    files = sorted(root.glob(f"{name}-{split}.array_record-*"))
    files = [f for f in files if not f.name.endswith(".partial")]
    shard_lengths = [len(ArrayRecordDataSource([str(f)])) for f in files]
    template = tfds.core.ShardedFileTemplate(
        data_dir=root,
        template=FILE_TEMPLATE,
        dataset_name=name,
        split=split,
        filetype_suffix="array_record",
    )
    return tfds.core.SplitInfo(
        name=split,
        shard_lengths=shard_lengths,
        num_bytes=sum(f.stat().st_size for f in files),
        filename_template=template,
    )
