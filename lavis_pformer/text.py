"""Text utilities shared by the stages: P-Former input masking and T5's prefix/suffix split."""
import random

import torch

# The zero-shot VQA prompt of the paper's evaluation; stage 0's optional text-only QA term and the shapes world's
# question-answer texts use it too.
QA_PROMPT = "Question: {} Short answer:"

# How many more words than n // 2 the prefix may have: the reference implementation cuts after 1 .. 1 + n // 2
# words in stage 0 and after 1 .. n // 2 words in stage 2 (n = number of words of the caption).
PREFIX_EXTRA_WORDS = {"stage0": 1, "stage2": 0}


def mask_tokens(input_ids, tokenizer, prob, generator=None):
    """Replace each non-special token by [MASK] with probability ``prob``.  input_ids: [B, L] -> [B, L]."""
    if prob <= 0:
        return input_ids
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in tokenizer.all_special_ids:
        special |= input_ids == token_id
    draw = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    return input_ids.masked_fill((draw < prob) & ~special, tokenizer.mask_token_id)


def max_prefix_words(n_words, stage):
    """Largest prefix length (in words) of an ``n_words``-word caption: min(n, max(1, n // 2 + extra))."""
    if stage not in PREFIX_EXTRA_WORDS:
        raise ValueError(f"split stage must be one of {sorted(PREFIX_EXTRA_WORDS)}, got {stage!r}")
    return min(n_words, max(1, n_words // 2 + PREFIX_EXTRA_WORDS[stage]))


def split_prefix_suffix(text, rng=random, stage="stage0"):
    """Split on whitespace after a random number of words k, uniform in 1 .. ``max_prefix_words(n, stage)``.

    stage "stage0": k in 1 .. 1 + n // 2; stage "stage2": k in 1 .. n // 2 (at least 1, so a one-word
    caption gives (caption, "")). The suffix may be empty.

    >>> split_prefix_suffix("cat")
    ('cat', '')
    """
    words = text.split()
    if not words:
        return "", ""
    cut = rng.randint(1, max_prefix_words(len(words), stage))
    return " ".join(words[:cut]), " ".join(words[cut:])
