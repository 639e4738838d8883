"""`prepare` on Apache Beam: the same stages and the same output, with the passage-id assignment
distributed, for inputs too large for one machine's memory (the pre-training pairs).

The local `prepare` collects every passage key on one machine to number the distinct passages
by first occurrence. Here that is a Beam shuffle, so no machine holds more than its pieces:

    pipeline 1  scan each piece (validate, tokenize queries, key passages)   -> work/scan-*.npz
                every distinct key -> its first occurrence (piece, index): CombinePerKey(min)
                each piece numbers the keys it owns (offset = keys owned by earlier pieces)
                and tokenizes those passages                                 -> work/passages-*.npz
                (key, id, length) joined back to every piece that refers to it
                each piece's ids, record buckets and summary                 -> work/refs-*.npz
    driver      the manifest and the shard plan from the pieces' summaries (small)
    pipeline 2  each piece writes its ArrayRecord shards (`write_piece`)
    driver      TFDS metadata (`tfds.folder_dataset.write_metadata`), manifest, rename

Ids, buckets and shards are those of the local `prepare`, so the output is the same set, shard
for shard. Every worker reads the inputs and writes under OUT.incomplete/ (where the driver
saved the tokenizer), so they must be paths all workers see (a shared or FUSE-mounted file
system). A rerun continues from the pieces whose work files exist, as the local prepare does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3_jax.data.prepare import (
    WORK_DIR,
    Piece,
    PieceSummary,
    PrepareResult,
    PrepareSettings,
    begin,
    manifest_of,
    piece_write,
    plan_shards,
    save_npz,
    save_refs,
    scan_piece,
    summarize_piece,
    tokenize_passages,
    work_file,
    worker_tokenizer,
    write_piece,
)
from m3_jax.input_files import InputError

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:  # the [beam] extra
    beam = None


def require_beam() -> None:
    if beam is None:
        raise ImportError(
            "preparing with Apache Beam needs the beam extra: pip install 'm3_jax[beam]'"
        )


def prepare_with_beam(
    inputs: Sequence[str],
    out: str | Path,
    settings: PrepareSettings,
    *,
    beam_args: Sequence[str] = (),
    overwrite: bool = False,
    piece_bytes: int | None = None,
) -> PrepareResult:
    """Prepares `inputs` into `out` like `prepare`, running the stages as Beam pipelines
    configured by `beam_args` (Beam's command-line options, e.g. `--runner=DataflowRunner
    --project=P --region=R --temp_location=gs://...`; the DirectRunner by default)."""
    require_beam()
    job = begin(inputs, out, settings, overwrite, piece_bytes)
    if isinstance(job, PrepareResult):
        return job
    pieces = job.pieces
    work = job.staging / WORK_DIR
    options = PipelineOptions(list(beam_args))
    with job.removing_staging_on_input_errors():
        with raising_input_errors(), beam.Pipeline(options=options) as pipeline:
            _index_pipeline(pipeline, pieces, work, settings, job.bucket_lengths)
        summaries = [
            PieceSummary.from_json(json.loads(work_file(work, "summary", p, ".json").read_text()))
            for p in pieces
        ]
        manifest = manifest_of(summaries, job.datasets, job.wanted)
        shards = plan_shards(summaries, job.staging, job.bucket_lengths)
        writes = [piece_write(work, piece, *shards[i]) for i, piece in enumerate(pieces)]
        with raising_input_errors(), beam.Pipeline(options=options) as pipeline:
            (
                pipeline
                | "Writes" >> beam.Create(writes)
                | "Spread" >> beam.Reshuffle()
                | "Write" >> beam.Map(write_piece)
            )
    return job.finish(manifest)


@contextlib.contextmanager
def raising_input_errors() -> Iterator[None]:
    """Beam re-raises a worker's exception wrapped in its own; a bad input line is still an
    InputError (one `error:` line naming file, line and field)."""
    try:
        yield
    except InputError:
        raise
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, InputError):
                raise InputError(str(cause)) from None
            cause = cause.__cause__ or cause.__context__
        marker = "InputError: "
        if marker in str(error):  # runners that pass the worker's traceback as text
            raise InputError(str(error).split(marker, 1)[1].splitlines()[0]) from None
        raise


def _index_pipeline(
    pipeline: Any,
    pieces: Sequence[Piece],
    work: Path,
    settings: PrepareSettings,
    lengths: Sequence[int],
) -> None:
    scanned = (
        pipeline
        | "Pieces" >> beam.Create(list(pieces))
        | "Spread" >> beam.Reshuffle()
        | "Scan" >> beam.Map(_scan, work=work, settings=settings)
    )
    keys = scanned | "Keys" >> beam.FlatMap(_piece_keys, work=work)
    owned = (
        keys
        | "FirstOccurrence" >> beam.CombinePerKey(min)
        | "ByOwner" >> beam.Map(lambda kv: (kv[1][0], (kv[1][1], kv[0])))
        | "GroupOwned" >> beam.GroupByKey()
    )
    offsets = (
        owned
        | "OwnedCounts" >> beam.Map(lambda kv: (kv[0], len(kv[1])))
        | "AllCounts" >> beam.combiners.ToList()
        | "Offsets" >> beam.Map(_first_ids)
    )
    by_index = {p.index: p for p in pieces}
    numbered = owned | "NumberAndTokenize" >> beam.FlatMap(
        _number_and_tokenize,
        offsets=beam.pvalue.AsSingleton(offsets),
        pieces=by_index,
        work=work,
        settings=settings,
    )
    referred = (
        {"refs": keys, "ids": numbered}
        | "JoinIds" >> beam.CoGroupByKey()
        | "ToReferrers" >> beam.FlatMap(_to_referrers)
    )
    every_piece = scanned | "EveryPiece" >> beam.Map(lambda p: (p.index, None))
    (
        (referred, every_piece)
        | "Together" >> beam.Flatten()
        | "GroupRefs" >> beam.GroupByKey()
        | "Summarize" >> beam.Map(_summarize, pieces=by_index, work=work, lengths=lengths)
    )


def _scan(piece: Piece, work: Path, settings: PrepareSettings) -> Piece:
    target = work_file(work, "scan", piece)
    if not target.is_file():  # finished before a restart
        tokenizer = worker_tokenizer(work)
        save_npz(target, scan_piece(piece, tokenizer, settings))
    return piece


def _piece_keys(piece: Piece, work: Path) -> Iterator[tuple[bytes, tuple[int, int]]]:
    """(passage key, (piece, index among the piece's distinct passages)) of each of them."""
    keys = np.load(work_file(work, "scan", piece))["passage_keys"]
    for local, key in enumerate(keys):
        yield key.tobytes(), (piece.index, local)


def _first_ids(counts: list[tuple[int, int]]) -> dict[int, int]:
    """The first id of each owning piece: the passages owned by all earlier pieces."""
    offsets, total = {}, 0
    for piece, count in sorted(counts):
        offsets[piece], total = total, total + count
    return offsets


def _number_and_tokenize(
    owned: tuple[int, Any],
    offsets: dict[int, int],
    pieces: dict[int, Piece],
    work: Path,
    settings: PrepareSettings,
) -> Iterator[tuple[bytes, tuple[int, int, int]]]:
    """Ids for the passages piece `owned[0]` holds first (after those of all earlier pieces,
    in its order: the local prepare's first-occurrence ids), their token ids saved; yields
    (key, (id, length, owner piece)) of each."""
    index, members = owned
    piece = pieces[index]
    local_keys = sorted(members)
    offset = offsets[index]
    scan = np.load(work_file(work, "scan", piece))
    mask = np.zeros(len(scan["passage_keys"]), bool)
    mask[[local for local, _ in local_keys]] = True
    target = work_file(work, "passages", piece)
    if not target.is_file():
        tokenizer = worker_tokenizer(work)
        save_npz(target, tokenize_passages(scan, mask, tokenizer, settings))
    lengths = np.load(target)["passage_lengths"]
    for rank, ((_, key), length) in enumerate(zip(local_keys, lengths, strict=True)):
        yield key, (offset + rank, int(length), index)


def _to_referrers(joined: tuple[bytes, dict]) -> Iterator[tuple[int, tuple[int, int, int, int]]]:
    """(piece, (local index, id, length, owner)) for every piece that refers to the key."""
    _, groups = joined
    ((passage_id, length, owner),) = groups["ids"]
    for piece, local in groups["refs"]:
        yield piece, (local, passage_id, length, owner)


def _summarize(
    grouped: tuple[int, Any], pieces: dict[int, Piece], work: Path, lengths: Sequence[int]
) -> None:
    index, refs = grouped
    piece = pieces[index]
    refs = [r for r in refs if r is not None]
    scan = np.load(work_file(work, "scan", piece))
    ids = np.zeros(len(refs), np.int64)
    local_lengths = np.zeros(len(refs), np.int64)
    owned = np.zeros(len(refs), bool)
    for local, passage_id, length, owner in refs:
        ids[local], local_lengths[local], owned[local] = passage_id, length, owner == index
    buckets, summary = summarize_piece(piece, scan, local_lengths, owned, lengths)
    save_refs(work, piece, ids, buckets)
    path = work_file(work, "summary", piece, ".json")
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(summary.to_json()), encoding="utf-8")
    partial.replace(path)
