"""Tokenizer loading, input validation, and MCLS token insertion."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3_jax.config import ModelConfig

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # holds model_max_length
TOKENIZER_FILES = (
    "tokenizer.json",
    TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
)


# Either is enough to build the XLM-R tokenizer; the others only refine it.
TOKENIZER_MODEL_FILES = ("tokenizer.json", "sentencepiece.bpe.model")


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_MODEL_FILES)


def load_tokenizer(path: str | Path) -> Any:
    """A transformers tokenizer from a local directory (tokenizer.json or sentencepiece.bpe.model)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not has_tokenizer(path):
        raise FileNotFoundError(
            f"{path}: no tokenizer found; expected tokenizer.json or sentencepiece.bpe.model"
        )
    return AutoTokenizer.from_pretrained(str(path))


def check_tokenizer_matches(tokenizer: Any, config: ModelConfig, source: str | Path) -> None:
    """Errors when the tokenizer's special ids or size disagree with the model."""
    expected = {
        "cls_token_id": config.cls_token_id,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "unk_token_id": config.unk_token_id,
    }
    wrong = {
        k: (getattr(tokenizer, k), v) for k, v in expected.items() if getattr(tokenizer, k) != v
    }
    if wrong:
        details = ", ".join(f"{k}={got} (model expects {want})" for k, (got, want) in wrong.items())
        raise ValueError(f"{source}: tokenizer special ids do not match the model: {details}")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"{source}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}"
        )


def validate_texts(texts: Any, what: str = "sentences") -> list[str]:
    """Returns `texts` as a list of non-blank strings, or raises naming the first bad item."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or isinstance(texts, bytes):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{what} is empty; pass at least one string")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{index}] is {type(text).__name__}, expected str: {text!r:.80}")
        if not text.strip():
            raise ValueError(f"{what}[{index}] is an empty or blank string")
    return list(texts)


def validate_pairs(sentence_pairs: Any) -> tuple[list[str], list[str], bool]:
    """(queries, passages, single) of one (query, passage) pair or a non-empty list of them,
    or an error naming the first bad pair or text; `single` when one pair was given."""
    single = (
        isinstance(sentence_pairs, list | tuple)
        and len(sentence_pairs) == 2
        and all(isinstance(x, str) for x in sentence_pairs)
    )
    pairs = [sentence_pairs] if single else sentence_pairs
    if not isinstance(pairs, Sequence) or isinstance(pairs, str) or len(pairs) == 0:
        raise ValueError("sentence_pairs must be a non-empty list of (query, passage) pairs")
    for index, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"sentence_pairs[{index}] is not a (query, passage) pair: {pair!r:.80}"
            )
    queries = validate_texts([p[0] for p in pairs], "queries")
    passages = validate_texts([p[1] for p in pairs], "passages")
    return queries, passages, single


def validate_token_ids(token_ids: Any, config: ModelConfig) -> list[np.ndarray]:
    """Each of `token_ids` as a 1-D integer array `<s> ... </s>` of the model's vocabulary;
    errors name the first bad one."""
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence | np.ndarray):
        raise TypeError(f"token_ids: expected a sequence of token id lists, got {token_ids!r:.80}")
    if len(token_ids) == 0:
        raise ValueError("token_ids: empty; expected at least one token id list")
    out = []
    for index, ids in enumerate(token_ids):
        array = np.asarray(ids)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or len(array) < 2:
            raise ValueError(
                f"token_ids[{index}]: expected a list of at least 2 integer ids "
                f"(<s> ... </s>), got {ids!r:.80}"
            )
        if array[0] != config.cls_token_id or array[-1] != config.eos_token_id:
            raise ValueError(
                f"token_ids[{index}]: expected <s> ({config.cls_token_id}) first and </s> "
                f"({config.eos_token_id}) last, got {int(array[0])} ... {int(array[-1])}"
            )
        if array.min() < 0 or array.max() >= config.vocab_size:
            raise ValueError(
                f"token_ids[{index}]: ids must lie in [0, {config.vocab_size}), got "
                f"{int(array.min())} ... {int(array.max())}"
            )
        out.append(array)
    return out


def tokenize(
    tokenizer: Any, texts: Sequence[str], max_length: int, *, add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids with <s> ... </s>, truncated to `max_length` (</s> kept last), unpadded; with
    `add_special_tokens=False`, the bare tokens truncated to `max_length`.

    `tokenizer` is a transformers fast tokenizer or its `tokenizers.Tokenizer` backend (what a
    data-preparation worker loads, see `save_backend`). The backend is called directly: the ids
    of `tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=...)`,
    without converting every encoding into Python dicts first, and callable where transformers
    is not imported."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    side = getattr(tokenizer, "truncation_side", None)
    direction = side or (backend.truncation or {}).get("direction", "right")
    backend.enable_truncation(max_length, direction=direction)
    backend.no_padding()
    encodings = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return [encoding.ids for encoding in encodings]


def truncate(ids: np.ndarray, max_length: int) -> np.ndarray:
    """Token ids (<s> ... </s>) cut to `max_length` keeping the last (</s>), as the tokenizer
    truncates: already tokenized ids shortened the way tokenizing at `max_length` would."""
    if len(ids) <= max_length:
        return ids
    return np.concatenate([ids[: max_length - 1], ids[-1:]])


def tokenize_pairs(
    tokenizer: Any,
    queries: Sequence[str],
    passages: Sequence[str],
    query_max_length: int,
    max_length: int,
) -> list[list[int]]:
    """Cross-encoder inputs `<s> query </s></s> passage </s>` (XLM-R's pair template), tokenized
    as FlagEmbedding's rerankers do: query and passage tokenized alone without special tokens
    (cut to `query_max_length` and `max_length`), then joined by the tokenizer's pair template,
    cutting only the passage so the pair fits `max_length` (transformers' `prepare_for_model`
    with `truncation='only_second'`). Cutting the joined text in one call instead would shorten
    the query too, and give other tokens at the cut.

    `tokenizer` as for `tokenize`; its post-processor supplies the template."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    side = getattr(tokenizer, "truncation_side", None)
    direction = side or (backend.truncation or {}).get("direction", "right")
    backend.no_padding()
    backend.enable_truncation(query_max_length, direction=direction)
    q_encodings = backend.encode_batch(list(queries), add_special_tokens=False)
    backend.enable_truncation(max_length, direction=direction)
    p_encodings = backend.encode_batch(list(passages), add_special_tokens=False)
    backend.no_truncation()  # post_process would otherwise cut both sides (longest first)
    specials = backend.post_processor.num_special_tokens_to_add(True)
    pairs = []
    for index, (q, p) in enumerate(zip(q_encodings, p_encodings, strict=True)):
        excess = len(q.ids) + len(p.ids) + specials - max_length
        if excess > 0:
            if excess >= len(p.ids):
                # transformers would log an error and return the pair longer than max_length.
                raise ValueError(
                    f"pair {index}: the query's {len(q.ids)} tokens and {specials} special "
                    f"tokens leave no room for the passage within max_length={max_length}; "
                    "lower query_max_length (default 3/4 of max_length) or raise max_length"
                )
            p.truncate(len(p.ids) - excess, direction=direction)
        pairs.append(backend.post_process(q, p, add_special_tokens=True).ids)
    return pairs


def save_backend(tokenizer: Any, path: str | Path) -> None:
    """Writes the `tokenizers.Tokenizer` behind a transformers tokenizer (with its truncation
    side) to `path`: `tokenizers.Tokenizer.from_file(path)` then tokenizes like it, without
    importing transformers."""
    backend = tokenizer.backend_tokenizer
    # Only the side matters: `tokenize` sets the length of every call.
    backend.enable_truncation(512, direction=tokenizer.truncation_side)
    backend.save(str(path))


def insert_mcls(
    token_ids: Sequence[int], interval: int, cls_token_id: int, max_length: int
) -> list[int]:
    """MCLS (paper B.2): a [CLS] before every `interval` content tokens, within `max_length`.

    `<s> t1..t256 </s>` style input `[cls, t_1..t_n, eos]` becomes
    `[cls, t_1..t_k, cls, t_k+1..t_2k, cls, ..., eos]`: the original [CLS] heads the first chunk,
    each further chunk of `interval` tokens is preceded by an inserted [CLS], and content is
    truncated (from the end, keeping </s>) so the result fits `max_length`.
    """
    if interval <= 0:
        raise ValueError(f"MCLS interval must be positive, got {interval}")
    cls, content, eos = token_ids[0], list(token_ids[1:-1]), token_ids[-1]
    if cls != cls_token_id:
        raise ValueError(f"expected token ids to start with cls id {cls_token_id}, got {cls}")
    # n content tokens need ceil(n / interval) CLS tokens plus the final </s>.
    budget = max_length - 1
    n = len(content)
    while n > 0 and n + -(-n // interval) > budget:
        n -= 1
    out: list[int] = []
    for start in range(0, n, interval):
        out.append(cls_token_id)
        out.extend(content[start : min(start + interval, n)])
    if not out:
        out.append(cls_token_id)
    out.append(eos)
    return out
