"""`prepare` on Apache Beam's DirectRunner writes the same prepared set as the local prepare, file
for file, and reports a bad line as the local one does. Needs the beam extra
(`pip install -e ".[beam]"`); skipped without it (see the README's Training section for why the
beam extra is not part of the test extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("apache_beam")

from test_prepare import TOKENIZER, settings, write_jsonl  # noqa: E402

from m3_jax.data.prepare import prepare  # noqa: E402
from m3_jax.data.prepare_beam import prepare_with_beam  # noqa: E402
from m3_jax.input_files import InputError  # noqa: E402

ROWS = [json.loads(line) for line in (TOKENIZER.parent / "train.jsonl").read_text().splitlines()]
PIECE_BYTES = 40_000  # several pieces per file, so ids and shards span pieces


def inputs(root: Path) -> list[Path]:
    """Two datasets in a directory (one with a type) and a no_in_batch_neg directory; passages
    repeat across files, so first occurrences matter."""
    rows = ROWS[:260]
    write_jsonl(root / "retrieval/a.jsonl", rows[:150])
    write_jsonl(root / "retrieval/b.jsonl", [{**r, "type": "only_1neg"} for r in rows[100:200]])
    write_jsonl(root / "qa_no_in_batch_neg/c.jsonl", rows[180:])
    return [root / "retrieval", root / "qa_no_in_batch_neg"]


def files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


@pytest.mark.slow
def test_direct_runner_writes_the_local_output_file_for_file(tmp_path):
    sources = inputs(tmp_path / "data")
    local = prepare(
        sources, tmp_path / "local", settings(), piece_bytes=PIECE_BYTES, progress=False
    )
    beam = prepare_with_beam(
        sources,
        tmp_path / "beam",
        settings(),
        piece_bytes=PIECE_BYTES,
        beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_threading"],
    )
    assert beam.manifest == local.manifest
    assert len(local.manifest.datasets) == 3 and local.manifest.passages > 0
    local_files, beam_files = files(tmp_path / "local"), files(tmp_path / "beam")
    assert sorted(beam_files) == sorted(local_files)
    differ = [name for name in local_files if local_files[name] != beam_files[name]]
    assert not differ, f"files differ: {differ}"
    # A finished output is a no-op for either executor.
    again = prepare_with_beam(sources, tmp_path / "beam", settings(), piece_bytes=PIECE_BYTES)
    assert again.already_prepared


def test_a_bad_line_is_an_input_error_naming_it(tmp_path):
    rows = ROWS[:50] + [{"query": "q", "neg": ["n"]}] + ROWS[50:60]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError, match=r"bad\.jsonl:51: field 'pos'"):
        prepare_with_beam([path], tmp_path / "out", settings(), piece_bytes=PIECE_BYTES)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.incomplete*"))
