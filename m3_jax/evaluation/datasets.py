"""Retrieval datasets from disk: BEIR, MIRACL and the training demo's held-out format.

BEIR (`DIR/corpus.jsonl`, `DIR/queries.jsonl`, `DIR/qrels/{split}.tsv`):
    corpus  {"_id", "title", "text"}; queries {"_id", "text"};
    qrels   tab-separated `query-id corpus-id score` with a header line.
MIRACL (the `miracl/miracl` layout, one language per directory):
    `DIR/topics/*{split}.tsv` (`qid<TAB>query`), `DIR/qrels/*{split}.tsv` (TREC: `qid Q0 docid rel`),
    corpus `DIR/corpus/*.jsonl[.gz]` or `DIR/corpus.jsonl[.gz]` ({"docid", "title", "text"}).
Held-out (tools/make_demo_data.py): queries {"query_id", "query", "qrels"}, corpus {"id", "text"}.

A document's text is "title text" when it has a title (as FlagEmbedding's evaluations join them).
Only queries with judgments are kept; every problem names the file, line and field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from m3_jax.input_files import InputError, read_field, read_jsonl, read_lines

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetrievalDataset:
    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id → {doc id: relevance}

    def subset(self, num_queries: int) -> RetrievalDataset:
        """The first `num_queries` queries (the corpus stays whole)."""
        ids = self.query_ids[:num_queries]
        return dataclasses.replace(
            self,
            query_ids=ids,
            query_texts=self.query_texts[:num_queries],
            qrels={q: self.qrels[q] for q in ids},
        )


def doc_text(row: dict, text_field: str, where: str) -> str:
    """A document row's text: "title text" when it has a title (`where`: FILE:LINE)."""
    title = read_field(row, "title", where, optional=True) or ""
    text = read_field(row, text_field, where)
    return f"{title} {text}".strip() if title else text


def _read_docs(paths: list[Path], id_field: str, text_field: str) -> tuple[list[str], list[str]]:
    ids, texts, seen = [], [], {}
    for path in paths:
        for where, row in read_jsonl(path):
            doc_id = read_field(row, id_field, where)
            if doc_id in seen:
                raise InputError(
                    f"{where}: duplicate document id {doc_id!r} (first at {seen[doc_id]})"
                )
            seen[doc_id] = where
            ids.append(doc_id)
            texts.append(doc_text(row, text_field, where))
    if not ids:
        raise InputError(f"{', '.join(map(str, paths))}: no documents")
    return ids, texts


def read_qrels_tsv(path: Path, trec: bool) -> dict[str, dict[str, int]]:
    """BEIR (`qid docid score`, header) or TREC (`qid Q0 docid rel`) relevance judgments."""
    qrels: dict[str, dict[str, int]] = {}
    first = True
    for where, line in read_lines(path):
        # BEIR ids may hold spaces (columns are tab-separated); TREC files split on any space.
        parts = line.split() if trec else [p.strip() for p in line.split("\t")]
        if not trec and first and not parts[-1].lstrip("-").isdigit():
            first = False
            continue  # the header "query-id corpus-id score"
        first = False
        expected = 4 if trec else 3
        if len(parts) != expected:
            raise InputError(f"{where}: expected {expected} columns, got {len(parts)}")
        qid, doc_id, rel = (parts[0], parts[2], parts[3]) if trec else parts
        try:
            qrels.setdefault(qid, {})[doc_id] = int(rel)
        except ValueError:
            raise InputError(f"{where}: relevance {rel!r} is not an integer") from None
    if not qrels:
        raise InputError(f"{path}: no judgments")
    return qrels


def _assemble(
    name, doc_ids, doc_texts, queries: dict[str, str], qrels, qrels_file
) -> RetrievalDataset:
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise InputError(f"{qrels_file}: judged queries {missing[:5]} are not in the queries file")
    known = set(doc_ids)
    unknown = {d for rels in qrels.values() for d in rels} - known
    if unknown:
        # They stay judged (they count against recall), as trec_eval would count them.
        log.warning("%s: %d judged documents are not in the corpus", qrels_file, len(unknown))
    query_ids = [q for q in queries if q in qrels]
    return RetrievalDataset(
        name, doc_ids, doc_texts, query_ids, [queries[q] for q in query_ids], qrels
    )


def load_beir(path: str | Path, split: str | None = None) -> RetrievalDataset:
    """split: the qrels file `qrels/{split}.tsv`; None picks `test`, else the only qrels file."""
    root = Path(path)
    if split is None:
        found = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        split = "test" if "test" in found or len(found) != 1 else found[0]
    qrels_file = root / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        raise FileNotFoundError(f"{qrels_file}: no qrels for split {split!r} (have {have})")
    doc_ids, doc_texts = _read_docs([root / "corpus.jsonl"], "_id", "text")
    queries: dict[str, str] = {}
    for where, row in read_jsonl(root / "queries.jsonl"):
        queries[read_field(row, "_id", where)] = read_field(row, "text", where)
    qrels = read_qrels_tsv(qrels_file, trec=False)
    return _assemble(f"{root.name}/{split}", doc_ids, doc_texts, queries, qrels, qrels_file)


def _one_file(folder: Path, split: str, what: str) -> Path:
    found = sorted(folder.glob(f"*{split}.tsv"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder}: expected one {what} file ending in '{split}.tsv', found {[p.name for p in found]}"
        )
    return found[0]


def load_miracl(
    path: str | Path, split: str = "dev", corpus: str | Path | None = None
) -> RetrievalDataset:
    root = Path(path)
    topics_file = _one_file(root / "topics", split, "topics")
    qrels_file = _one_file(root / "qrels", split, "qrels")
    if corpus is not None:
        corpus_files = (
            [Path(corpus)] if Path(corpus).is_file() else sorted(Path(corpus).glob("*.jsonl*"))
        )
    else:
        corpus_files = sorted((root / "corpus").glob("*.jsonl*")) or sorted(
            root.glob("corpus.jsonl*")
        )
    if not corpus_files:
        raise FileNotFoundError(f"{root}: no corpus (corpus/*.jsonl[.gz] or corpus.jsonl[.gz])")
    doc_ids, doc_texts = _read_docs(corpus_files, "docid", "text")
    queries: dict[str, str] = {}
    for where, line in read_lines(topics_file):
        parts = line.split("\t")
        if len(parts) != 2:
            raise InputError(f"{where}: expected 'qid<TAB>query'")
        queries[parts[0]] = parts[1]
    qrels = read_qrels_tsv(qrels_file, trec=True)
    return _assemble(f"{root.name}/{split}", doc_ids, doc_texts, queries, qrels, qrels_file)


def load_heldout(heldout_file: str | Path, corpus_file: str | Path) -> RetrievalDataset:
    doc_ids, doc_texts = _read_docs([Path(corpus_file)], "id", "text")
    queries, qrels = {}, {}
    for where, row in read_jsonl(heldout_file):
        qid = read_field(row, "query_id", where)
        queries[qid] = read_field(row, "query", where)
        judged = read_field(row, "qrels", where, kind=dict)
        try:
            qrels[qid] = {str(d): int(r) for d, r in judged.items()}
        except (TypeError, ValueError) as e:
            raise InputError(f"{where}: field 'qrels' must map doc ids to integers") from e
    return _assemble(Path(heldout_file).stem, doc_ids, doc_texts, queries, qrels, heldout_file)


def load_dataset(path: str | Path, split: str | None = None) -> RetrievalDataset:
    """BEIR when `corpus.jsonl` and `queries.jsonl` are there, MIRACL when `topics/` is.

    split None: BEIR `test` (or its only qrels file), MIRACL `dev`."""
    root = Path(path)
    if (root / "corpus.jsonl").is_file() and (root / "queries.jsonl").is_file():
        return load_beir(root, split)
    if (root / "topics").is_dir():
        return load_miracl(root, split or "dev")
    raise FileNotFoundError(
        f"{root}: neither BEIR (corpus.jsonl, queries.jsonl, qrels/) nor MIRACL (topics/, qrels/)"
    )


def write_beir(dataset: RetrievalDataset, out: str | Path, split: str = "test") -> Path:
    """Writes `dataset` in the BEIR layout (empty titles)."""
    out = Path(out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for doc_id, text in zip(dataset.doc_ids, dataset.doc_texts, strict=True):
            f.write(
                json.dumps({"_id": doc_id, "title": "", "text": text}, ensure_ascii=False) + "\n"
            )
    with (out / "queries.jsonl").open("w", encoding="utf-8") as f:
        for qid, text in zip(dataset.query_ids, dataset.query_texts, strict=True):
            f.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    with (out / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid in dataset.query_ids:
            for doc_id, rel in dataset.qrels[qid].items():
                f.write(f"{qid}\t{doc_id}\t{rel}\n")
    return out
