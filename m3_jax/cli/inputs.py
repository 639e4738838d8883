"""Reading texts and (query, passage) pairs from .jsonl, .tsv and .txt files.

Every problem is reported as `FILE:LINE: what is wrong` (`m3_jax.input_files`): a missing field,
an empty value, a wrong number of tab-separated columns, a repeated id, a byte that is not UTF-8.
Blank lines are skipped; the outputs follow the rows that remain.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from m3_jax.input_files import InputError, read_field, read_jsonl, read_lines

SUFFIXES = (".jsonl", ".tsv", ".txt")


def _tsv_row(line: str, where: str, fields: Sequence[str], required: Sequence[str]) -> tuple:
    columns = line.split("\t")
    # All fields in order, or only the required ones (e.g. text without an id).
    if len(columns) == len(fields):
        names = fields
    elif len(columns) == len(required):
        names = required
    else:
        expected = " or ".join(sorted({str(len(fields)), str(len(required))}))
        raise InputError(
            f"{where}: {len(columns)} tab-separated columns, expected {expected} "
            f"({' <TAB> '.join(fields)})"
        )
    values = dict(zip(names, columns, strict=True))
    return tuple(values.get(field) for field in fields)


def _rows(path: Path, fields: Sequence[str], required: Sequence[str], keys: Sequence[str]):
    """(where, values of `fields`) per row; a .jsonl row reads field i under keys[i]."""
    if path.suffix == ".jsonl":
        for where, record in read_jsonl(path):
            yield (
                where,
                tuple(
                    read_field(record, key, where, optional=field not in required)
                    for field, key in zip(fields, keys, strict=True)
                ),
            )
        return
    for where, line in read_lines(path):
        if path.suffix == ".tsv":
            yield where, _tsv_row(line, where, fields, required)
        else:
            yield where, tuple(line if field in required else None for field in fields)


def read_rows(
    path: str | Path,
    fields: Sequence[str],
    required: Sequence[str],
    jsonl_keys: Sequence[str] | None = None,
) -> list[tuple[str, tuple[str | None, ...]]]:
    """("FILE:LINE", values of `fields`) per row, None for an absent optional field.

    .jsonl: one JSON object per line, fields read under `jsonl_keys` (default: the field names).
    .tsv: either every field in order or only the required ones, tab-separated.
    .txt: one value per line; only when a single field is required.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown input type {path.suffix!r}; expected one of {SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".txt" and len(required) != 1:
        raise InputError(f"{path}: a .txt file holds one value per line; use .tsv or .jsonl")
    keys = list(jsonl_keys or fields)
    # A .jsonl value is named by its key, a .tsv or .txt one by its column.
    jsonl = path.suffix == ".jsonl"
    names = [f"{k!r} field" for k in keys] if jsonl else [f"{f} column" for f in fields]
    rows = []
    for where, values in _rows(path, fields, required, keys):
        for name, value in zip(names, values, strict=True):
            if value is not None and not value.strip():
                raise InputError(f"{where}: the {name} is empty")
        rows.append((where, values))
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def read_texts(
    path: str | Path, text_field: str = "text", id_field: str = "id"
) -> tuple[list[str], list[str]]:
    """(ids, texts) from a file; a text without an id gets its 0-based row number."""
    rows = read_rows(path, ("id", "text"), ("text",), jsonl_keys=(id_field, text_field))
    ids, texts, seen = [], [], {}
    for row, (where, (id_, text)) in enumerate(rows):
        id_ = str(row) if id_ is None else id_
        if id_ in seen:
            raise InputError(f"{where}: id {id_!r} repeats {seen[id_]}")
        if "\n" in id_ or "\t" in id_:
            raise InputError(f"{where}: id {id_!r} holds a tab or line break")
        seen[id_] = where
        ids.append(id_)
        texts.append(text)
    return ids, texts


def read_pairs(
    path: str | Path, query_field: str = "query", passage_field: str = "passage"
) -> list[tuple[str, str]]:
    """(query, passage) pairs from a .tsv (query <TAB> passage) or .jsonl file."""
    fields = ("query", "passage")
    rows = read_rows(path, fields, fields, jsonl_keys=(query_field, passage_field))
    return [(query, passage) for _, (query, passage) in rows]
