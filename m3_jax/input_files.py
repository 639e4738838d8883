"""Reading the user's text files: JSON lines and plain lines, with every problem at FILE:LINE.

Training data, retrieval datasets and the command line's texts and pairs all read through here,
so a bad line, a non-UTF-8 byte or a missing field is reported the same way everywhere:
`InputError("FILE:LINE: what is wrong")`. Blank lines are skipped; `.gz` files are read
decompressed.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


class InputError(ValueError):
    """Bad input file content; the message starts with `FILE:LINE:` (or `FILE:`)."""


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def read_lines(
    path: str | Path, byte_range: tuple[int, int] | None = None, first_line: int = 1
) -> Iterator[tuple[str, str]]:
    """("FILE:LINE", line without its line break) per non-blank line.

    byte_range: only the lines in [start, end) of an uncompressed file (start at a line's
    beginning, numbered from `first_line`), for reading one file in parallel pieces.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with _open(path) as f:
        lines: Iterator[bytes] = f
        if byte_range is not None:
            start, end = byte_range
            f.seek(start)
            lines = iter(f.read(end - start).splitlines(keepends=True))
        for number, raw in enumerate(lines, start=first_line):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
            if line.strip():
                yield where, line.rstrip("\r\n")


def read_jsonl(
    path: str | Path, byte_range: tuple[int, int] | None = None, first_line: int = 1
) -> Iterator[tuple[str, dict[str, Any]]]:
    """("FILE:LINE", object) per non-blank line; each line must hold one JSON object
    (`byte_range`, `first_line`: as for `read_lines`)."""
    hint = " (.json files are read as JSON lines too)" if Path(path).suffix == ".json" else ""
    for where, line in read_lines(path, byte_range, first_line):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}{hint}")
        yield where, obj


def read_field(obj: dict, name: str, where: str, kind: type = str, optional: bool = False) -> Any:
    """obj[name] checked to be a `kind` (ids may be integers, read as strings)."""
    if name not in obj or obj[name] is None:
        if optional:
            return None
        raise InputError(f"{where}: field '{name}': missing (the object has {sorted(obj)})")
    value = obj[name]
    if name.endswith("id") and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # numeric ids are common in BEIR files
    if not isinstance(value, kind):
        raise InputError(
            f"{where}: field '{name}': expected {kind.__name__}, got {type(value).__name__}"
        )
    return value


def line_aligned_pieces(path: str | Path, piece_bytes: int) -> list[tuple[int, int, int]]:
    """(start, end, first line number) of consecutive byte ranges of about `piece_bytes` that
    cover the file and begin at line starts (an uncompressed file; see `read_lines`)."""
    if piece_bytes <= 0:
        raise ValueError(f"piece_bytes must be positive, got {piece_bytes}")
    size = Path(path).stat().st_size
    pieces: list[tuple[int, int, int]] = []
    start, line = 0, 1
    with Path(path).open("rb") as f:
        while start < size:
            f.seek(min(start + piece_bytes, size))
            rest = f.readline() if start + piece_bytes < size else b""
            end = min(start + piece_bytes, size) + len(rest)
            f.seek(start)
            line_count = f.read(end - start).count(b"\n")
            pieces.append((start, end, line))
            start, line = end, line + line_count
    return pieces
