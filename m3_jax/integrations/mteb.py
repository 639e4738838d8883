"""m3_jax models as MTEB models (`pip install "m3_jax[mteb]"`; mteb 2.x).

- `MTEBEncoder`: MTEB's encoder protocol over `M3Embedder`'s dense vectors. MTEB's prompt type
  routes a batch to `encode_queries` (query max length) or `encode_corpus` (passage max
  length); MTEB's `batch_size` is honoured. It runs every MTEB task type (retrieval, STS,
  classification, clustering, ...); retrieval goes through MTEB's own dense search.
- `MTEBSearch`: MTEB's search protocol in one of the five retrieval modes (`m3_jax.scores.MODES`,
  aliases "all" and "dense+sparse"): `index` encodes the corpus once (`encode_texts`, resumable
  shards with `cache_dir`), `search` encodes the queries and retrieves with
  `m3_jax.evaluation.modes.run_modes`, exactly as `m3-jax evaluate` does, so MTEB's metrics of
  a mode are `m3-jax evaluate`'s. `search_models` makes one per mode, sharing the encoded
  corpus.
- `local_retrieval_task`: an MTEB retrieval task from a dataset on disk (BEIR / MIRACL layout,
  what `m3-jax evaluate --data` reads), for offline evaluation through MTEB.

MTEB ranks a run by score, ties by document id (descending), as trec_eval and
`m3_jax.evaluation.metrics` do, and rounds nDCG / recall / MAP to 5 decimals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3_jax.evaluation.datasets import RetrievalDataset, load_dataset
from m3_jax.evaluation.encoding import EncodedTexts, encode_texts
from m3_jax.evaluation.modes import RetrievalSettings, required_outputs, run_modes
from m3_jax.scores import MODES, canonical_modes

FRAMEWORK = ["JAX"]


def import_mteb():
    """The mteb module, or an ImportError saying how to install it (mteb is optional: m3_jax
    imports it only when an MTEB model or task is made)."""
    try:
        import mteb
    except ImportError as e:
        raise ImportError('MTEB evaluation needs mteb 2.x: pip install "m3_jax[mteb]"') from e
    return mteb


def model_meta(embedder, name: str, revision: str, **overrides: Any):
    """MTEB's `ModelMeta` of an `M3Embedder` (`name` needs a "/"; `overrides`: other fields).
    The languages are not listed (None: "not stated" to MTEB)."""
    import_mteb()
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    config = embedder.config
    fields = dict(
        loader=None,
        name=name,
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=embedder.num_parameters(),
        memory_usage_mb=None,
        max_tokens=embedder.passage_max_length,
        embed_dim=config.hidden_size,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=FRAMEWORK,
        similarity_fn_name=ScoringFunction.DOT_PRODUCT,  # of unit vectors: the cosine
        use_instructions=False,
        training_datasets=None,
    )
    return ModelMeta(**{**fields, **overrides})


def _texts(inputs) -> list[str]:
    """The "text" of every item of MTEB's DataLoader, in order."""
    return [text for batch in inputs for text in batch["text"]]


class MTEBEncoder:
    """MTEB's `EncoderProtocol` over an `M3Embedder`'s dense vectors."""

    def __init__(self, embedder, *, name: str, revision: str = "local", **meta: Any) -> None:
        self.embedder = embedder
        self.mteb_model_meta = model_meta(embedder, name, revision, **meta)

    def encode(
        self,
        inputs,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """[N, D] float32 unit vectors of the DataLoader's texts; queries (prompt type "query")
        at the query max length, everything else at the passage max length."""
        texts = _texts(inputs)
        encode = (
            self.embedder.encode_queries
            if prompt_type == "query"  # mteb.types.PromptType.query, a str enum
            else self.embedder.encode_corpus
        )
        options = {"batch_size": kwargs.get("batch_size")}
        if "show_progress_bar" in kwargs:
            options["show_progress_bar"] = kwargs["show_progress_bar"]
        return np.asarray(encode(texts, **options)["dense_vecs"], np.float32)

    def similarity(self, embeddings1, embeddings2) -> np.ndarray:
        return np.asarray(embeddings1, np.float32) @ np.asarray(embeddings2, np.float32).T

    def similarity_pairwise(self, embeddings1, embeddings2) -> np.ndarray:
        a, b = np.asarray(embeddings1, np.float32), np.asarray(embeddings2, np.float32)
        return np.sum(a * b, axis=-1)


@dataclasses.dataclass
class CorpusIndex:
    """The last corpus indexed: its ids, texts' fingerprint and encodings, shared by the
    `MTEBSearch` models of one `search_models` call so each mode does not encode it again."""

    outputs: tuple[str, ...]
    key: str | None = None
    doc_ids: list[str] = dataclasses.field(default_factory=list)
    encoded: EncodedTexts | None = None


def _corpus_key(doc_ids: Sequence[str], texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for doc_id, text in zip(doc_ids, texts, strict=True):
        digest.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()


def _doc_texts(corpus) -> list[str]:
    """ "title text" (or the text alone), as MTEB's encoders and `m3-jax evaluate` read a
    document."""
    titles = corpus["title"] if "title" in corpus.column_names else [None] * len(corpus)
    return [f"{t} {x}".strip() if t else x for t, x in zip(titles, corpus["text"], strict=True)]


class MTEBSearch:
    """MTEB's `SearchProtocol` in one retrieval mode of `m3-jax evaluate`."""

    def __init__(
        self,
        embedder,
        mode: str = "dense",
        *,
        name: str,
        revision: str = "local",
        settings: RetrievalSettings = RetrievalSettings(),  # noqa: B008 (frozen dataclass)
        index: CorpusIndex | None = None,
        cache_dir: str | os.PathLike | None = None,
        model_fingerprint: str = "",
        mesh=None,
        progress: bool = False,
        **meta: Any,
    ) -> None:
        (self.mode,) = canonical_modes([mode])
        self.embedder = embedder
        self.settings = settings
        self.corpus = index if index is not None else CorpusIndex(required_outputs([self.mode]))
        missing = set(required_outputs([self.mode])) - set(self.corpus.outputs)
        if missing:
            raise ValueError(f"mode {self.mode}: the shared index lacks {sorted(missing)}")
        self.cache_dir = cache_dir
        self.model_fingerprint = model_fingerprint
        self.mesh = mesh
        self.progress = progress
        # Scores come from the mode, not from one of MTEB's similarity functions.
        self.mteb_model_meta = model_meta(
            embedder, f"{name}-{self.mode}", revision, similarity_fn_name=None, **meta
        )

    def _cache(self, task_metadata: Any, hf_subset: str, hf_split: str):
        if self.cache_dir is None:
            return None
        return Path(self.cache_dir) / task_metadata.name / hf_subset / hf_split

    def index(
        self,
        corpus,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        encode_kwargs: dict[str, Any],
        num_proc: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Encodes the corpus (a datasets.Dataset of id, title, text), unless the shared index
        holds it already."""
        doc_ids = [str(d) for d in corpus["id"]]
        texts = _doc_texts(corpus)
        key = _corpus_key(doc_ids, texts)
        if self.corpus.key == key:
            return
        self.corpus.encoded = encode_texts(
            self.embedder,
            texts,
            max_length=self.embedder.passage_max_length,
            outputs=self.corpus.outputs,
            cache_dir=self._cache(task_metadata, hf_subset, hf_split),
            model_fingerprint=self.model_fingerprint,
            progress=self.progress,
            desc="corpus",
        )
        self.corpus.key, self.corpus.doc_ids = key, doc_ids

    def search(
        self,
        queries,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        top_k: int,
        encode_kwargs: dict[str, Any],
        top_ranked: dict[str, list[str]] | None = None,
        num_proc: int | None = None,
        **kwargs: Any,
    ) -> dict[str, dict[str, float]]:
        """{query id: {doc id: score}}: the mode's run over the indexed corpus, at most
        `top_k` documents a query (a first stage of `settings.top_k`, as `m3-jax evaluate`)."""
        if self.corpus.encoded is None:
            raise RuntimeError("search before index: MTEB indexes the corpus first")
        if top_ranked is not None:
            raise ValueError(
                f"{task_metadata.name}: a reranking task; MTEBSearch retrieves from the whole "
                "corpus (evaluate reranking tasks with MTEBEncoder)"
            )
        query_ids = [str(q) for q in queries["id"]]
        encoded = encode_texts(
            self.embedder,
            list(queries["text"]),
            max_length=self.embedder.query_max_length,
            outputs=self.corpus.outputs,
            shard_size=max(1, len(query_ids)),
            progress=self.progress,
            desc="queries",
        )
        run = run_modes(
            encoded,
            self.corpus.encoded,
            query_ids,
            self.corpus.doc_ids,
            [self.mode],
            self.settings,
            mesh=self.mesh,
        )[self.mode]
        return {q: dict(_best(docs, top_k)) for q, docs in run.items()}


def _best(docs: dict[str, float], k: int) -> list[tuple[str, float]]:
    """The top k by score, ties by doc id descending (trec_eval's order)."""
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k]


def search_models(
    embedder, modes: Sequence[str] = MODES, *, name: str, **kwargs: Any
) -> list[MTEBSearch]:
    """One `MTEBSearch` per mode, sharing one corpus index (encoded with every output the
    modes need); keyword arguments as `MTEBSearch`."""
    modes = canonical_modes(modes)
    index = CorpusIndex(required_outputs(modes))
    return [MTEBSearch(embedder, m, name=name, index=index, **kwargs) for m in modes]


def evaluate_tasks(
    embedder,
    tasks: Sequence[Any],
    modes: Sequence[str] = MODES,
    *,
    name: str,
    results_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{task: {mode: {"split/subset": MTEB's scores}}}: every retrieval task in each mode
    (`search_models`; keyword arguments as `MTEBSearch`), every other task with `MTEBEncoder`
    (mode "dense"). results_dir: MTEB's result files (recomputed on every call); None: none."""
    mteb = import_mteb()
    searches = search_models(embedder, modes, name=name, progress=progress, **kwargs)
    encoder = MTEBEncoder(embedder, name=name)
    cache = None if results_dir is None else mteb.ResultCache(cache_path=str(results_dir))
    encode_kwargs: dict[str, Any] = {"show_progress_bar": progress}
    if batch_size is not None:
        encode_kwargs["batch_size"] = batch_size
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for task in tasks:
        models = searches if task.metadata.type == "Retrieval" else [encoder]
        for model in models:
            result = mteb.evaluate(
                model,
                tasks=[task],
                cache=cache,
                overwrite_strategy="always",
                encode_kwargs=encode_kwargs,
                show_progress_bar=progress,
            )
            (task_result,) = result.task_results
            mode = getattr(model, "mode", "dense")
            by_subset = out.setdefault(task.metadata.name, {}).setdefault(mode, {})
            for split, split_scores in task_result.scores.items():
                for scores in split_scores:
                    by_subset[f"{split}/{scores['hf_subset']}"] = scores
    return out


def local_retrieval_task(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    name: str | None = None,
    languages: Sequence[str] = ("eng-Latn",),
    max_queries: int | None = None,
):
    """An MTEB retrieval task (an `AbsTaskRetrieval`) of the dataset at `path` (BEIR or MIRACL
    layout, as `m3_jax.evaluation.datasets.load_dataset` reads it); documents are "title text"
    as there. `languages`: MTEB's language-script codes of the task, for its results."""
    import_mteb()
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    dataset = load_dataset(path, split)
    if max_queries:
        dataset = dataset.subset(max_queries)
    split = split or "test"
    task_name = name or re.sub(r"[^A-Za-z0-9]+", "", f"M3Local{Path(path).resolve().name}")
    metadata = TaskMetadata(
        name=task_name,
        description=f"Local retrieval task read from {Path(path).resolve()} by m3_jax.",
        dataset={"path": str(Path(path).resolve()), "revision": _dataset_revision(dataset)},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=list(languages),
        main_score="ndcg_at_10",
    )
    # MTEB reads `metadata` from the class; one class per dataset.
    members = {"metadata": metadata, "source": dataset, "load_data": _load_local_data}
    return type(task_name, (AbsTaskRetrieval,), members)()


def _dataset_revision(dataset: RetrievalDataset) -> str:
    return _corpus_key(
        dataset.doc_ids + dataset.query_ids, dataset.doc_texts + dataset.query_texts
    )[:16]


def _load_local_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
    """`load_data` of `local_retrieval_task`'s tasks: MTEB's split data from `self.source`."""
    if self.data_loaded:
        return
    from datasets import Dataset
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    data = self.source
    corpus = Dataset.from_dict(
        {"id": data.doc_ids, "title": [""] * len(data.doc_ids), "text": data.doc_texts}
    )
    queries = Dataset.from_dict({"id": data.query_ids, "text": data.query_texts})
    split = RetrievalSplitData(
        corpus=corpus, queries=queries, relevant_docs=data.qrels, top_ranked=None
    )
    self.dataset = {"default": {self.metadata.eval_splits[0]: split}}
    self.data_loaded = True


__all__ = [
    "CorpusIndex",
    "MTEBEncoder",
    "MTEBSearch",
    "evaluate_tasks",
    "local_retrieval_task",
    "import_mteb",
    "model_meta",
    "search_models",
]
