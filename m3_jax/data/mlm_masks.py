"""RetroMAE's masks for one text (the knobs are `RetroMAEConfig`'s, the run's `retromae` section), sampled on the host with numpy (FlagEmbedding's
`RetroMAECollator`, itself transformers' `DataCollatorForWholeWordMask`).

- A mask hides exactly `mask_budget(n, ratio, cap)` = min(cap, max(1, round(n · ratio))) of a
  text's n tokens (special tokens counted in n, never hidden): words are visited in a random
  order and a word is hidden whole when it still fits the budget, else skipped.
- Words: with `whole_word` a sentencepiece word is a token starting with "▁" plus the tokens
  after it that do not; without, every token is its own word. The reference groups BERT's "##"
  continuations only, so on XLM-R's tokenizer it hides single tokens: False is its behaviour.
- The reference skips BERT's [CLS] and [SEP] by name; here the tokenizer's special tokens (<s>,
  </s>, <pad>, ...) are never hidden, so on XLM-R too the decoder always sees the [CLS] state at
  position 0, as RetroMAE intends.
- `cap` (`retromae.max_masked_tokens`) is transformers' `max_predictions`, 512 in the
  reference: at 8192 tokens it hides 512 tokens (6%) whatever the ratio. 0 lifts it.
- Encoder input: one mask at the encoder ratio; the hidden tokens become the labels and are
  replaced 80% by <mask>, 10% by a random id of the vocabulary, 10% kept (`torch_mask_tokens`).
- Decoder: min(n, `retromae.decoder_masks`) masks at the decoder ratio, and for each position the index
  of the mask it attends through (uniform); the model hides the position itself as well.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from m3_jax.config import RetroMAEConfig
from m3_jax.retromae import IGNORE_LABEL

WORD_START = "▁"  # sentencepiece's word-boundary marker


def mask_budget(num_tokens: int, ratio: float, cap: int) -> int:
    """Tokens one mask hides in a text of `num_tokens` (the reference's `num_to_predict`;
    Python's round, half to even)."""
    budget = max(1, int(round(num_tokens * ratio)))
    return min(cap, budget) if cap > 0 else budget


def continuation_table(pieces: list[str], special_ids: set[int]) -> np.ndarray:
    """[vocab] bool: the token continues the word before it (sentencepiece: no leading "▁")."""
    table = np.array([not piece.startswith(WORD_START) for piece in pieces])
    table[list(special_ids)] = False
    return table


def word_ids(
    token_ids: np.ndarray, special: np.ndarray, continuation: np.ndarray | None
) -> np.ndarray:
    """[n] the word each token belongs to (0, 1, ...), -1 for special tokens. `continuation`
    ([vocab] bool, `continuation_table`) groups whole words; None makes every token a word."""
    starts = ~special
    if continuation is not None:
        follows = np.zeros_like(starts)
        follows[1:] = continuation[token_ids[1:]] & ~special[:-1]
        starts &= ~follows
    words = np.cumsum(starts) - 1
    return np.where(special, -1, words)


def sample_mask(words: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """[n] bool: whole words (`word_ids`) in a random order, each hidden when it still fits
    `budget`, the reference's greedy pass done a run of fitting words at a time."""
    num_words = int(words.max()) + 1 if words.size else 0
    order = rng.permutation(num_words)
    lengths = np.bincount(words[words >= 0], minlength=num_words)[order]
    taken = np.zeros(num_words, bool)
    remaining, start = budget, 0
    while remaining > 0 and start < num_words:
        run = int(np.sum(np.cumsum(lengths[start:]) <= remaining))  # the words that fit in turn
        taken[start : start + run] = True
        remaining -= int(lengths[start : start + run].sum())
        # The word after the run does not fit: skip to the next one that does.
        later = np.nonzero(lengths[start + run + 1 :] <= remaining)[0]
        if remaining == 0 or later.size == 0:
            break
        start = start + run + 1 + int(later[0])
    return np.isin(words, order[taken]) & (words >= 0)


def encoder_input(
    token_ids: np.ndarray,
    hidden: np.ndarray,
    mask_token_id: int,
    vocab_size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(the encoder's input ids, its labels): hidden tokens become labels (IGNORE_LABEL
    elsewhere) and are replaced 80% by <mask>, 10% by a random id, 10% kept."""
    labels = np.where(hidden, token_ids, IGNORE_LABEL)
    replaced = hidden & (rng.random(hidden.shape) < 0.8)
    randomised = hidden & ~replaced & (rng.random(hidden.shape) < 0.5)
    ids = np.where(replaced, mask_token_id, token_ids)
    ids = np.where(randomised, rng.integers(0, vocab_size, hidden.shape), ids)
    return ids, labels


@dataclasses.dataclass(frozen=True)
class TextMasks:
    """One text's RetroMAE inputs (unpadded, n tokens)."""

    encoder_input_ids: np.ndarray  # [n]
    encoder_labels: np.ndarray  # [n]
    decoder_mask_set: np.ndarray  # [min(n, retromae.decoder_masks), n] bool, True = hidden
    decoder_mask_choice: np.ndarray  # [n] the mask each position attends through


def sample_text_masks(
    token_ids: np.ndarray,
    special: np.ndarray,
    config: RetroMAEConfig,
    *,
    mask_token_id: int,
    vocab_size: int,
    continuation: np.ndarray | None,
    rng: np.random.Generator,
) -> TextMasks:
    """The encoder's masked copy and the decoder's masks for one text (module docstring).
    special: [n] bool, the special tokens; continuation: `continuation_table` when
    `config.whole_word_mask`, else None."""
    n = token_ids.shape[0]
    words = word_ids(token_ids, special, continuation if config.whole_word_mask else None)
    encoder_hidden = sample_mask(
        words, mask_budget(n, config.encoder_mask_ratio, config.max_masked_tokens), rng
    )
    ids, labels = encoder_input(token_ids, encoder_hidden, mask_token_id, vocab_size, rng)
    num_masks = min(n, config.decoder_masks)
    budget = mask_budget(n, config.decoder_mask_ratio, config.max_masked_tokens)
    mask_set = np.stack([sample_mask(words, budget, rng) for _ in range(num_masks)])
    return TextMasks(ids, labels, mask_set, rng.integers(0, num_masks, n))


def collate(
    token_ids: list[np.ndarray],
    masks: list[TextMasks],
    length: int,
    config: RetroMAEConfig,
    pad_token_id: int,
) -> dict[str, np.ndarray]:
    """The padded batch `m3_jax.retromae.retromae_sums` reads, of static shape: texts padded
    to `length` tokens, mask sets to min(length, decoder_masks) masks."""
    rows, num_masks = len(token_ids), min(length, config.decoder_masks)
    batch = {
        "input_ids": np.full((rows, length), pad_token_id, np.int32),
        "attention_mask": np.zeros((rows, length), np.int32),
        "encoder_input_ids": np.full((rows, length), pad_token_id, np.int32),
        "encoder_labels": np.full((rows, length), IGNORE_LABEL, np.int32),
        "decoder_mask_set": np.zeros((rows, num_masks, length), bool),
        "decoder_mask_choice": np.zeros((rows, length), np.int32),
    }
    for row, (ids, text) in enumerate(zip(token_ids, masks, strict=True)):
        n = ids.shape[0]
        if n > length:
            raise ValueError(f"a text of {n} tokens does not fit the batch length {length}")
        batch["input_ids"][row, :n] = ids
        batch["attention_mask"][row, :n] = 1
        batch["encoder_input_ids"][row, :n] = text.encoder_input_ids
        batch["encoder_labels"][row, :n] = text.encoder_labels
        batch["decoder_mask_set"][row, : text.decoder_mask_set.shape[0], :n] = text.decoder_mask_set
        batch["decoder_mask_choice"][row, :n] = text.decoder_mask_choice
    return batch


class TextMasker:
    """The training loader's transform for RetroMAE (`TrainLoader(transform=...)`): the texts of
    a group-size-1 host batch (its passage rows) → the padded RetroMAE batch, each row's masks
    drawn from its own seed (so any batch can be rebuilt, as on resume)."""

    def __init__(self, config: RetroMAEConfig, tokenizer: Any):
        self.config = config
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)
        self.special_ids = np.asarray(sorted(tokenizer.all_special_ids))
        self.continuation = None
        if config.whole_word_mask:
            pieces = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
            self.continuation = continuation_table(pieces, set(self.special_ids.tolist()))

    def __call__(
        self, host_batch: dict[str, np.ndarray], row_seeds: list[tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        ids, mask = host_batch["passage_ids"], host_batch["passage_mask"]
        if ids.shape[0] != len(row_seeds):
            raise ValueError(
                f"RetroMAE reads one text per row: {ids.shape[0]} passages for "
                f"{len(row_seeds)} rows (set data.group_size=1)"
            )
        texts, masks = [], []
        for row, seed in enumerate(row_seeds):
            text = ids[row, : int(mask[row].sum())]
            texts.append(text)
            masks.append(
                sample_text_masks(
                    text,
                    np.isin(text, self.special_ids),
                    self.config,
                    mask_token_id=self.mask_token_id,
                    vocab_size=self.vocab_size,
                    continuation=self.continuation,
                    rng=np.random.default_rng(seed),
                )
            )
        return collate(texts, masks, ids.shape[1], self.config, self.pad_token_id)
