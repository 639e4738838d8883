"""Reranker: FlagEmbedding-compatible cross-encoder scoring on JAX (bge-reranker-base / -large /
-v2-m3 and any `XLMRobertaForSequenceClassification` with one label).

`compute_score` matches FlagEmbedding's `FlagReranker.compute_score`: each (query, passage) pair
is tokenized as `<s> query </s></s> passage </s>` (`tokenization.tokenize_pairs`: the query cut to
`query_max_length`, 3/4 of `max_length` by default, then only the passage cut so the pair fits
`max_length`), and the score is the raw logit of the classification head (`normalize=True`: its
sigmoid). Pairs are sorted by length and padded into the static bucket shapes of
`m3_jax.bucketing`, so XLA compiles one program per bucket; scores return in input order.
`m3_jax.convert.reranker` reads and writes the PyTorch layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from m3_jax.bucketing import Batch, BucketSpec, plan_batches
from m3_jax.config import ModelConfig
from m3_jax.convert.reranker import load_reranker
from m3_jax.inference import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, pipelined
from m3_jax.model import RerankerModel, model_from_params
from m3_jax.tokenization import (
    check_tokenizer_matches,
    load_tokenizer,
    tokenize_pairs,
    validate_pairs,
)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


class Reranker:
    """A cross-encoder: one relevance score per (query, passage) pair."""

    def __init__(
        self,
        model: RerankerModel,
        tokenizer: Any,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = DEFAULT_MAX_LENGTH,
        query_max_length: int | None = None,
        normalize: bool = False,
        query_instruction_for_rerank: str | None = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = None,
        passage_instruction_format: str = "{}{}",
        bucket_lengths: Sequence[int] | None = None,
        max_tokens_per_batch: int = 65536,
        show_progress: bool = True,
    ):
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.query_max_length = query_max_length
        self.normalize = normalize
        self.query_instruction = (query_instruction_for_rerank, query_instruction_format)
        self.passage_instruction = (passage_instruction_for_rerank, passage_instruction_format)
        spec_kw = {} if bucket_lengths is None else {"lengths": tuple(bucket_lengths)}
        self.bucket_spec = BucketSpec(
            batch_size=batch_size, max_tokens=max_tokens_per_batch, **spec_kw
        )
        self.show_progress = show_progress
        self._graphdef, self._state = nnx.split(model)
        self._forward = jax.jit(self._forward_impl)

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike,
        *,
        dtype: str | None = None,
        attention_impl: str | None = None,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> Reranker:
        """Loads a directory or hub id (`BAAI/bge-reranker-v2-m3`) in the PyTorch layout of
        `XLMRobertaForSequenceClassification` (model.safetensors or pytorch_model.bin).

        dtype: compute dtype ("float32" default; "bfloat16" on accelerators); params stay float32.
        Other keyword arguments go to `Reranker.__init__` (batch_size, max_length, normalize, ...).
        """
        overrides = {k: v for k, v in (("dtype", dtype), ("attention_impl", attention_impl)) if v}
        config, params, src = load_reranker(model_name_or_path, cache_dir=cache_dir, **overrides)
        tokenizer = load_tokenizer(src)
        check_tokenizer_matches(tokenizer, config, src)
        return cls(model_from_params(config, params, RerankerModel), tokenizer, **kwargs)

    def _forward_impl(self, state, input_ids, attention_mask):
        return nnx.merge(self._graphdef, state)(input_ids, attention_mask)

    def compiled_program_count(self) -> int:
        """How many XLA programs compute_score has compiled so far (one per bucket shape)."""
        return self._forward._cache_size()

    def _with_instruction(self, text: str, instruction: tuple[str | None, str]) -> str:
        prefix, template = instruction
        return text if prefix is None else template.format(prefix, text)

    def compute_score(
        self,
        sentence_pairs: Sequence[Sequence[str]] | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        query_max_length: int | None = None,
    ) -> list[float] | float:
        """Relevance scores of (query, passage) pairs: raw logits, or their sigmoid with
        `normalize`; one pair gives a float. Defaults come from the constructor (batch size 256,
        max_length 512, query_max_length 3/4 of max_length, normalize False)."""
        queries, passages, single = validate_pairs(sentence_pairs)
        max_length = self.max_length if max_length is None else max_length
        if query_max_length is None:
            query_max_length = self.query_max_length or max_length * 3 // 4
        for name, value in (("max_length", max_length), ("query_max_length", query_max_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_length > self.config.max_length:
            raise ValueError(
                f"max_length={max_length} exceeds what the reranker's "
                f"{self.config.max_position_embeddings} position embeddings allow "
                f"({self.config.max_length})"
            )
        token_ids = tokenize_pairs(
            self.tokenizer,
            [self._with_instruction(q, self.query_instruction) for q in queries],
            [self._with_instruction(p, self.passage_instruction) for p in passages],
            query_max_length,
            max_length,
        )
        spec = self.bucket_spec
        if batch_size is not None:
            spec = BucketSpec(spec.lengths, batch_size, spec.max_tokens)

        def dispatch(batch: Batch):
            ids, mask = batch.pad(token_ids, self.config.pad_token_id)
            return self._forward(self._state, ids, mask)

        logits = np.zeros(len(queries), np.float32)
        batches = plan_batches([len(t) for t in token_ids], spec, max_length)
        for batch, result in pipelined(
            batches, dispatch, show_progress=self.show_progress, desc="rerank"
        ):
            logits[batch.indices] = np.asarray(jax.device_get(result))[: len(batch.indices)]
        normalize = self.normalize if normalize is None else normalize
        values = [float(x) for x in (sigmoid(logits) if normalize else logits)]
        return values[0] if single else values
