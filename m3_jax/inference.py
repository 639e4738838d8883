"""M3Embedder: FlagEmbedding-compatible encoding and scoring on JAX.

Texts are tokenized once, sorted by length and padded into a few static (rows, length) bucket
shapes (`m3_jax.bucketing`), so XLA compiles one program per bucket; results return in input order.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from m3_jax import scores
from m3_jax.bucketing import Batch, BucketSpec, bucket_length, lengths_up_to, plan_batches
from m3_jax.config import ModelConfig
from m3_jax.loading import load_params
from m3_jax.model import M3Model, model_from_params
from m3_jax.tokenization import (
    check_tokenizer_matches,
    insert_mcls,
    load_tokenizer,
    tokenize,
    truncate,
    validate_pairs,
    validate_texts,
    validate_token_ids,
)

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("dense", "sparse", "colbert")
DEFAULT_BATCH_SIZE = 256  # FlagEmbedding v1.3+'s
# Show a progress bar once an input needs more than this many batches.
PROGRESS_MIN_BATCHES = 4
DEFAULT_MAX_LENGTH = 512


class M3Embedder:
    """Dense, sparse (lexical) and multi-vector (ColBERT) embeddings from one forward pass.

    Output formats follow FlagEmbedding's `BGEM3FlagModel`: `encode` returns
    `{'dense_vecs', 'lexical_weights', 'colbert_vecs'}` and `compute_score` the five score lists.
    """

    def __init__(
        self,
        model: M3Model,
        tokenizer: Any,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        bucket_lengths: Sequence[int] | None = None,
        max_tokens_per_batch: int = 65536,
        show_progress: bool = True,
    ):
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # FlagEmbedding's defaults (512), capped by what the position table holds.
        default_length = min(DEFAULT_MAX_LENGTH, self.config.max_length)
        self.query_max_length = self._check_max_length(
            default_length if query_max_length is None else query_max_length, "query_max_length"
        )
        self.passage_max_length = self._check_max_length(
            default_length if passage_max_length is None else passage_max_length,
            "passage_max_length",
        )
        spec_kw = {} if bucket_lengths is None else {"lengths": tuple(bucket_lengths)}
        self.bucket_spec = BucketSpec(
            batch_size=batch_size, max_tokens=max_tokens_per_batch, **spec_kw
        )
        self.show_progress = show_progress
        self._graphdef, self._state = nnx.split(model)
        self._forward = jax.jit(self._forward_impl, static_argnames=("outputs",))
        self._pair_scores = jax.jit(self._pair_scores_impl)

    # Construction -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike,
        *,
        dtype: str | None = None,
        attention_impl: str | None = None,
        fresh_heads: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> M3Embedder:
        """Loads anything `m3_jax.loading.load_params` reads: an m3_jax model directory, a
        training run (its newest checkpoint), a BGE-M3 PyTorch directory, or a hub id
        (`BAAI/bge-m3`).

        dtype: compute dtype ("float32" default; "bfloat16" on accelerators); params stay float32.
        attention_impl: "xla", "chunked", "cudnn" (GPU) or "splash" (TPU); see ModelConfig.
        fresh_heads: for PyTorch checkpoints without colbert/sparse head files, start them at random.
        Other keyword arguments go to `M3Embedder.__init__` (batch_size, max lengths, buckets).
        """
        overrides = {}
        if dtype is not None:
            overrides["dtype"] = dtype
        if attention_impl is not None:
            overrides["attention_impl"] = attention_impl
        loaded = load_params(
            model_name_or_path, fresh_heads=fresh_heads, cache_dir=cache_dir, **overrides
        )
        tokenizer = load_tokenizer(loaded.tokenizer_dir)
        check_tokenizer_matches(tokenizer, loaded.config, loaded.tokenizer_dir)
        return cls(model_from_params(loaded.config, loaded.params), tokenizer, **kwargs)

    # Jitted programs ----------------------------------------------------------------------------

    def _forward_impl(self, state, input_ids, attention_mask, pool_mask, outputs):
        model = nnx.merge(self._graphdef, state)
        out = model(input_ids, attention_mask, dense_pool_mask=pool_mask)
        return {name: getattr(out, name) for name in outputs}

    def _pair_scores_impl(self, state, q_ids, q_mask, p_ids, p_mask):
        model = nnx.merge(self._graphdef, state)
        q, p = model(q_ids, q_mask), model(p_ids, p_mask)
        return {
            "dense": scores.dense_paired(q.dense, p.dense),
            "sparse": scores.sparse_paired(q_ids, q.sparse, p_ids, p.sparse),
            "colbert": scores.colbert_paired(q.colbert, q.colbert_mask, p.colbert, p.colbert_mask),
        }

    def load_params(self, params: Any) -> None:
        """Swaps in other weights for the same config (e.g. each evaluation during training);
        the compiled programs are reused as long as shapes, dtypes and shardings stay the same."""
        graphdef, state = nnx.split(model_from_params(self.config, params))
        if graphdef != self._graphdef:
            raise ValueError("load_params: the params build a different model graph")
        self._state = state

    def num_parameters(self) -> int:
        return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(self._state))

    def compiled_program_count(self) -> int:
        """How many XLA programs encode/compute_score have compiled so far (one per bucket shape)."""
        return self._forward._cache_size() + self._pair_scores._cache_size()

    # Helpers ------------------------------------------------------------------------------------

    def _check_max_length(self, max_length: int, what: str) -> int:
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"{what} must be an int >= 2, got {max_length!r}")
        if max_length > self.config.max_length:
            raise ValueError(
                f"{what}={max_length} exceeds what the model's {self.config.max_position_embeddings} "
                f"position embeddings allow ({self.config.max_length})"
            )
        return max_length

    def _spec(self, batch_size: int | None) -> BucketSpec:
        if batch_size is None:
            return self.bucket_spec
        return BucketSpec(self.bucket_spec.lengths, batch_size, self.bucket_spec.max_tokens)

    def _pipelined(self, batches: list[Batch], desc: str, dispatch, progress: bool | None = None):
        show = self.show_progress if progress is None else progress
        return pipelined(batches, dispatch, show_progress=show, desc=desc)

    # Encoding -----------------------------------------------------------------------------------

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        mcls_interval: int | None = None,
        **compat: Any,
    ) -> dict[str, Any]:
        """Embeds `sentences`; a single string gives single items instead of lists.

        Returns {'dense_vecs': np.ndarray [N, D] | None, 'lexical_weights': list of
        {token-id string: weight} | None, 'colbert_vecs': list of [n_i, D] arrays | None}, where
        n_i is the number of tokens after [CLS] (</s> included).

        mcls_interval: MCLS for long documents (paper appendix B.2, never implemented by the
        reference): a [CLS] is inserted before every `mcls_interval` content tokens (256 in the
        paper) and the dense vector is the normalised mean of the last hidden states of all [CLS]
        tokens, the leading one included. Inserted tokens take ordinary consecutive positions,
        count against `max_length`, and are left out of `colbert_vecs`; the sparse weights of
        [CLS] are zero as always.

        Keyword arguments of sentence-transformers' and FlagEmbedding's `encode` are accepted,
        so code written for them runs unchanged (`COMPAT_ENCODE_ARGUMENTS`): `prompt` (prepended
        to every text), `instruction` with `instruction_format` (FlagEmbedding's "{}{}"), and
        `show_progress_bar` are honoured; the ones that describe the fixed output (numpy,
        L2-normalised dense vectors on the host) are accepted at the values that describe it,
        and other values are errors.
        """
        single = isinstance(sentences, str)
        texts = validate_texts(sentences)
        texts, progress = compat_encode_arguments(texts, compat)
        max_length = self._check_max_length(
            self.passage_max_length if max_length is None else max_length, "max_length"
        )
        outputs = _wanted_outputs(return_dense, return_sparse, return_colbert_vecs)
        token_ids = tokenize(self.tokenizer, texts, max_length)
        out = self._encode_ids(token_ids, batch_size, max_length, outputs, mcls_interval, progress)
        if single:
            out = {k: (None if v is None else v[0]) for k, v in out.items()}
        return out

    def encode_token_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        mcls_interval: int | None = None,
    ) -> dict[str, Any]:
        """`encode` of texts already tokenized (each `<s> ... </s>`, as `tokenize` gives and a
        prepared training set stores), each cut to `max_length` as tokenizing at it would."""
        max_length = self._check_max_length(
            self.passage_max_length if max_length is None else max_length, "max_length"
        )
        outputs = _wanted_outputs(return_dense, return_sparse, return_colbert_vecs)
        checked = validate_token_ids(token_ids, self.config)
        token_ids = [truncate(ids, max_length) for ids in checked]
        return self._encode_ids(token_ids, batch_size, max_length, outputs, mcls_interval)

    def _encode_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        batch_size: int | None,
        max_length: int,
        outputs: tuple[str, ...],
        mcls_interval: int | None,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        cls_id = self.config.cls_token_id
        if mcls_interval is not None:
            token_ids = [insert_mcls(ids, mcls_interval, cls_id, max_length) for ids in token_ids]

        n = len(token_ids)
        dense = np.zeros((n, self.config.hidden_size), np.float32) if "dense" in outputs else None
        lexical: list[dict[str, np.float32]] = [{} for _ in range(n)]
        colbert: list[np.ndarray | None] = [None] * n

        def dispatch(batch: Batch):
            ids, mask = batch.pad(token_ids, self.config.pad_token_id)
            pool = None if mcls_interval is None else jnp.asarray((ids == cls_id) & (mask == 1))
            return self._forward(self._state, ids, mask, pool, outputs), ids

        batches = plan_batches([len(t) for t in token_ids], self._spec(batch_size), max_length)
        for batch, (result, ids) in self._pipelined(batches, "encode", dispatch, progress):
            result = jax.device_get(result)
            for row, index in enumerate(batch.indices):
                length = len(token_ids[index])
                if dense is not None:
                    dense[index] = result["dense"][row]
                if "sparse" in outputs:
                    lexical[index] = lexical_weights(
                        ids[row, :length], result["sparse"][row, :length]
                    )
                if "colbert" in outputs:
                    vecs = result["colbert"][row, : length - 1]
                    if mcls_interval is not None:
                        vecs = vecs[ids[row, 1:length] != cls_id]
                    colbert[index] = vecs

        return {
            "dense_vecs": dense,
            "lexical_weights": lexical if "sparse" in outputs else None,
            "colbert_vecs": colbert if "colbert" in outputs else None,
        }

    def encode_queries(self, queries: str | Sequence[str], **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("max_length", self.query_max_length)
        return self.encode(queries, **kwargs)

    def encode_corpus(self, corpus: str | Sequence[str], **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("max_length", self.passage_max_length)
        return self.encode(corpus, **kwargs)

    # Scoring ------------------------------------------------------------------------------------

    def compute_score(
        self,
        sentence_pairs: Sequence[Sequence[str]],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: Sequence[float] | None = None,
    ) -> dict[str, list[float] | float]:
        """Scores (query, passage) pairs in every mode.

        Returns lists (floats for a single pair) under 'colbert', 'sparse', 'dense',
        'sparse+dense' = (w0·dense + w1·sparse)/(w0+w1) and
        'colbert+sparse+dense' = (w0·dense + w1·sparse + w2·colbert)/(w0+w1+w2), with
        weights [w_dense, w_sparse, w_colbert] defaulting to [1, 1, 1]. ColBERT scores ignore
        passage padding, so they do not depend on batch composition.
        """
        queries, passages, single = validate_pairs(sentence_pairs)
        weights = (
            [1.0, 1.0, 1.0]
            if weights_for_different_modes is None
            else list(weights_for_different_modes)
        )
        if len(weights) != 3:
            raise ValueError(
                f"weights_for_different_modes needs 3 values [dense, sparse, colbert], got {weights}"
            )
        q_max = self._check_max_length(
            self.query_max_length if max_query_length is None else max_query_length,
            "max_query_length",
        )
        p_max = self._check_max_length(
            self.passage_max_length if max_passage_length is None else max_passage_length,
            "max_passage_length",
        )
        q_tokens = tokenize(self.tokenizer, queries, q_max)
        p_tokens = tokenize(self.tokenizer, passages, p_max)

        spec = self._spec(batch_size)
        q_buckets, p_buckets = (
            lengths_up_to(spec.lengths, q_max),
            lengths_up_to(spec.lengths, p_max),
        )
        pad = self.config.pad_token_id

        def side(tokens: list[list[int]], batch: Batch, buckets: tuple[int, ...]):
            length = bucket_length(max(len(tokens[i]) for i in batch.indices), buckets)
            return Batch(batch.indices, batch.rows, length).pad(tokens, pad)

        def dispatch(batch: Batch):
            q_ids, q_mask = side(q_tokens, batch, q_buckets)
            p_ids, p_mask = side(p_tokens, batch, p_buckets)
            return self._pair_scores(self._state, q_ids, q_mask, p_ids, p_mask)

        # Rows per batch come from the longer side, so neither side exceeds the token budget.
        pair_lengths = [max(len(q), len(p)) for q, p in zip(q_tokens, p_tokens, strict=True)]
        raw = {name: np.zeros(len(queries), np.float32) for name in OUTPUT_NAMES}
        batches = plan_batches(pair_lengths, spec, max(q_max, p_max))
        for batch, result in self._pipelined(batches, "compute_score", dispatch):
            result = jax.device_get(result)
            for name in OUTPUT_NAMES:
                raw[name][batch.indices] = result[name][: len(batch.indices)]

        w_dense, w_sparse, w_colbert = weights
        combined = {
            "colbert": raw["colbert"],
            "sparse": raw["sparse"],
            "dense": raw["dense"],
            "sparse+dense": scores.weighted_sum([raw["dense"], raw["sparse"]], [w_dense, w_sparse]),
            "colbert+sparse+dense": scores.weighted_sum(
                [raw["dense"], raw["sparse"], raw["colbert"]], weights
            ),
        }
        # FlagEmbedding's key order.
        out = {mode: [float(x) for x in values] for mode, values in combined.items()}
        if single:
            return {mode: values[0] for mode, values in out.items()}
        return out

    def compute_lexical_matching_score(
        self, lexical_weights_1: dict[str, float], lexical_weights_2: dict[str, float]
    ) -> float:
        """Σ w1(t)·w2(t) over token ids present in both dicts."""
        return float(
            sum(
                w * lexical_weights_2[t]
                for t, w in lexical_weights_1.items()
                if t in lexical_weights_2
            )
        )

    def colbert_score(self, q_reps: np.ndarray, p_reps: np.ndarray) -> float:
        """Late-interaction score of unpadded [n_q, D] and [n_p, D] colbert vectors."""
        q, p = np.asarray(q_reps, np.float32), np.asarray(p_reps, np.float32)
        if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1] or 0 in (len(q), len(p)):
            raise ValueError(
                f"colbert_score needs [n_q, D] and [n_p, D] arrays, got {q.shape}, {p.shape}"
            )
        q_mask, p_mask = np.ones(len(q), bool), np.ones(len(p), bool)
        return float(scores.colbert_pair(q, q_mask, p, p_mask))

    def convert_id_to_token(
        self, lexical_weights: dict[str, float] | list[dict[str, float]]
    ) -> dict[str, float] | list[dict[str, float]]:
        """Replaces token-id keys by token strings (decoded as the tokenizer would)."""
        if isinstance(lexical_weights, dict):
            return self.convert_id_to_token([lexical_weights])[0]
        converted = []
        for weights in lexical_weights:
            tokens: dict[str, float] = {}
            for token_id, weight in weights.items():
                tokens[self.tokenizer.decode([int(token_id)])] = weight
            converted.append(tokens)
        return converted


# Other libraries' encode keyword arguments (sentence-transformers, FlagEmbedding): honoured;
# about where to run (JAX places the work on its devices), ignored; describing the output, which
# here is always numpy float32 L2-normalised dense vectors of the full dimension, accepted at the
# value that describes it, or None.
COMPAT_ENCODE_ARGUMENTS = ("prompt", "instruction", "instruction_format", "show_progress_bar")
PLACEMENT_ARGUMENTS = ("device", "pool", "chunk_size")
FIXED_OUTPUT_ARGUMENTS: dict[str, Any] = {
    "convert_to_numpy": True,
    "convert_to_tensor": False,
    "normalize_embeddings": True,
    "output_value": "sentence_embedding",
    "precision": "float32",
    "truncate_dim": None,
    "prompt_name": None,
}


def compat_encode_arguments(
    texts: list[str], compat: dict[str, Any]
) -> tuple[list[str], bool | None]:
    """(the texts with `prompt` / `instruction` applied, show_progress_bar or None) from other
    libraries' encode keyword arguments; an unknown name is a TypeError, a value asking for
    another output a ValueError."""
    for name, value in compat.items():
        if name in COMPAT_ENCODE_ARGUMENTS or name in PLACEMENT_ARGUMENTS:
            continue
        if name not in FIXED_OUTPUT_ARGUMENTS:
            known = ", ".join(
                [*COMPAT_ENCODE_ARGUMENTS, *PLACEMENT_ARGUMENTS, *FIXED_OUTPUT_ARGUMENTS]
            )
            raise TypeError(
                f"encode() got an unexpected keyword argument {name!r} (accepted: {known})"
            )
        fixed = FIXED_OUTPUT_ARGUMENTS[name]
        if value is not None and value != fixed:
            raise ValueError(
                f"encode({name}={value!r}): M3Embedder gives numpy float32, L2-normalised "
                f"dense vectors of the full dimension; expected {name}={fixed!r} or None"
            )
    prompt = compat.get("prompt")
    if prompt:
        texts = [prompt + t for t in texts]
    instruction = compat.get("instruction")
    if instruction:
        template = compat.get("instruction_format") or "{}{}"
        texts = [template.format(instruction, t) for t in texts]
    return texts, compat.get("show_progress_bar")


def _wanted_outputs(dense: bool, sparse: bool, colbert: bool) -> tuple[str, ...]:
    outputs = tuple(
        name for name, wanted in zip(OUTPUT_NAMES, (dense, sparse, colbert), strict=True) if wanted
    )
    if not outputs:
        raise ValueError(
            "nothing to return: set return_dense, return_sparse or return_colbert_vecs"
        )
    return outputs


def pipelined(
    batches: list[Batch], dispatch: Callable[[Batch], Any], *, show_progress: bool, desc: str
) -> Iterator[tuple[Batch, Any]]:
    """Yields (batch, dispatch(batch)), dispatching batch i+1 before batch i is handed on: JAX
    runs asynchronously, so the device computes the next batch while the host reads this one.
    A progress bar once there are more than `PROGRESS_MIN_BATCHES` batches."""
    show = show_progress and len(batches) > PROGRESS_MIN_BATCHES
    pending: collections.deque = collections.deque()
    for batch in tqdm(batches, desc=desc, disable=not show):
        pending.append((batch, dispatch(batch)))
        if len(pending) > 1:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def lexical_weights(token_ids: np.ndarray, weights: np.ndarray) -> dict[str, np.float32]:
    """FlagEmbedding's lexical dict: {str(id): max weight} over positions with weight > 0.

    Special ids already carry weight 0 (model/heads.py), so they never enter the dict.
    """
    result: dict[str, np.float32] = {}
    for token_id, weight in zip(token_ids.tolist(), weights, strict=True):
        if weight > 0:
            key = str(token_id)
            if weight > result.get(key, 0):
                result[key] = np.float32(weight)
    return result
