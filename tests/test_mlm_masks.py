"""RetroMAE's mask sampling (m3_jax.data.mlm_masks): counts, words, special tokens, and the
ratios of the 80/10/10 replacement and of the decoder's mask choice, tested statistically
(bounds of 5 standard deviations: a correct sampler fails one in millions of runs)."""

from __future__ import annotations

import numpy as np
import pytest

from m3_jax.config import RetroMAEConfig
from m3_jax.data.mlm_masks import (
    continuation_table,
    mask_budget,
    sample_mask,
    sample_text_masks,
    word_ids,
)
from m3_jax.retromae import IGNORE_LABEL

VOCAB = 200
MASK_ID = 199
SIGMAS = 5.0


def random_text(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.integers(5, MASK_ID, n)
    ids[0], ids[-1] = 0, 2
    special = np.zeros(n, bool)
    special[[0, -1]] = True
    return ids, special


def within(count: float, trials: int, p: float) -> bool:
    return abs(count - trials * p) <= SIGMAS * np.sqrt(trials * p * (1 - p))


@pytest.mark.parametrize(
    "n, ratio, cap, expected",
    [(10, 0.3, 512, 3), (25, 0.3, 512, 8), (5, 0.15, 512, 1), (8192, 0.3, 512, 512),
     (8192, 0.3, 0, 2458), (8192, 0.5, 0, 4096), (3, 0.5, 512, 2)],
)  # fmt: skip
def test_budget(n, ratio, cap, expected):
    assert mask_budget(n, ratio, cap) == expected  # round(n * ratio), at least 1, capped


def test_token_masks_hide_exactly_the_budget_and_no_special_token():
    rng = np.random.default_rng(0)
    config = RetroMAEConfig(max_masked_tokens=0)
    for n in (3, 7, 40, 300):
        ids, special = random_text(rng, n)
        masks = sample_text_masks(
            ids, special, config, mask_token_id=MASK_ID, vocab_size=VOCAB, continuation=None,
            rng=rng,
        )  # fmt: skip
        labelled = masks.encoder_labels != IGNORE_LABEL
        # Only n - 2 tokens can be hidden: tiny texts get fewer than the budget.
        assert labelled.sum() == min(mask_budget(n, 0.3, 0), n - 2)
        assert not labelled[special].any()
        np.testing.assert_array_equal(masks.encoder_labels[labelled], ids[labelled])
        assert masks.decoder_mask_set.shape == (min(n, 128), n)
        np.testing.assert_array_equal(
            masks.decoder_mask_set.sum(1), min(mask_budget(n, 0.5, 0), n - 2)
        )
        assert not masks.decoder_mask_set[:, special].any()
        assert masks.decoder_mask_choice.shape == (n,)


def test_cap_holds_at_8192_tokens():
    rng = np.random.default_rng(1)
    ids, special = random_text(rng, 8192)
    masks = sample_text_masks(
        ids, special, RetroMAEConfig(decoder_masks=4), mask_token_id=MASK_ID,
        vocab_size=VOCAB, continuation=None, rng=rng,
    )  # fmt: skip
    assert (masks.encoder_labels != IGNORE_LABEL).sum() == 512
    np.testing.assert_array_equal(masks.decoder_mask_set.sum(1), 512)


def test_replacement_is_80_10_10_and_positions_are_uniform():
    rng = np.random.default_rng(2)
    n, texts = 100, 400
    replaced = randomised = kept = 0
    hidden_at = np.zeros(n)
    for _ in range(texts):
        ids, special = random_text(rng, n)
        masks = sample_text_masks(
            ids, special, RetroMAEConfig(), mask_token_id=MASK_ID, vocab_size=VOCAB,
            continuation=None, rng=rng,
        )  # fmt: skip
        labelled = masks.encoder_labels != IGNORE_LABEL
        hidden_at += labelled
        out = masks.encoder_input_ids[labelled]
        replaced += np.sum(out == MASK_ID)
        same = out == ids[labelled]
        kept += np.sum(same)
        randomised += np.sum(~same & (out != MASK_ID))
        np.testing.assert_array_equal(masks.encoder_input_ids[~labelled], ids[~labelled])
    total = texts * mask_budget(n, 0.3, 512)
    assert replaced + kept + randomised == total
    assert within(replaced, total, 0.8)
    # A random replacement draws the original id with probability 1/VOCAB: it counts as kept.
    assert within(randomised, total, 0.1 * (1 - 1 / VOCAB))
    assert within(kept, total, 0.1 + 0.1 / VOCAB)
    # Every content position is hidden with the same probability, budget / (n - 2).
    p = mask_budget(n, 0.3, 512) / (n - 2)
    assert all(within(c, texts, p) for c in hidden_at[1:-1]) and hidden_at[[0, -1]].sum() == 0


def test_decoder_masks_follow_the_ratio_and_the_choice_is_uniform():
    rng = np.random.default_rng(3)
    n, texts, num_masks = 60, 50, 8
    config = RetroMAEConfig(decoder_masks=num_masks)
    choices = np.zeros(num_masks)
    for _ in range(texts):
        ids, special = random_text(rng, n)
        masks = sample_text_masks(
            ids, special, config, mask_token_id=MASK_ID, vocab_size=VOCAB, continuation=None,
            rng=rng,
        )  # fmt: skip
        np.testing.assert_array_equal(masks.decoder_mask_set.sum(1), 30)  # 50% of 60
        choices += np.bincount(masks.decoder_mask_choice, minlength=num_masks)
        # The masks are independent draws, not copies of one.
        assert len({m.tobytes() for m in masks.decoder_mask_set}) == num_masks
    assert all(within(c, texts * n, 1 / num_masks) for c in choices)


def test_whole_word_masks_hide_whole_words():
    pieces = ["<s>", "<pad>", "</s>", "<unk>"] + [
        ("▁" if i % 3 == 0 else "") + f"p{i}" for i in range(4, VOCAB)
    ]
    continuation = continuation_table(pieces, {0, 1, 2, 3})
    rng = np.random.default_rng(4)
    for _ in range(50):
        ids, special = random_text(rng, 80)
        words = word_ids(ids, special, continuation)
        # A word starts at every "▁" piece, and after a special token.
        starts = np.nonzero(np.diff(words[1:-1]))[0] + 2
        assert all(not continuation[ids[i]] for i in starts)
        budget = mask_budget(80, 0.3, 512)
        hidden = sample_mask(words, budget, rng)
        for word in np.unique(words[hidden]):
            assert hidden[words == word].all()  # never part of a word
        longest = np.bincount(words[words >= 0]).max()
        assert budget - longest < hidden.sum() <= budget


def test_greedy_pass_skips_a_word_that_does_not_fit():
    """Words of lengths 3, 3, 1 with a budget of 4: the reference takes a 3 and the 1."""
    words = np.array([-1, 0, 0, 0, 1, 1, 1, 2, -1])
    rng = np.random.default_rng(5)
    for _ in range(20):
        hidden = sample_mask(words, 4, rng)
        assert hidden.sum() == 4 and hidden[7]
