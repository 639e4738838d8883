"""TREC run files: one line `qid Q0 docid rank score tag` per retrieved document.

Documents are listed in trec_eval's ranking order (score descending, ties by doc id descending),
so the rank column agrees with what trec_eval and pytrec_eval compute from the scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

Run = Mapping[str, Mapping[str, float]]


def write_run(run: Run, path: str | Path, tag: str) -> Path:
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag {tag!r} must be a non-empty word")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for qid, docs in run.items():
            ordered = sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)
            for rank, (doc_id, score) in enumerate(ordered, 1):
                f.write(f"{qid} Q0 {doc_id} {rank} {score:.9g} {tag}\n")
    return path


def read_run(path: str | Path) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ValueError(f"{path}:{line_no}: expected 'qid Q0 docid rank score tag'")
            try:
                run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: score {parts[4]!r} is not a number") from e
    return run


def run_file_name(mode: str) -> str:
    """'dense+sparse' → 'dense+sparse.trec' (mode names are file-safe)."""
    return f"{mode}.trec"
