"""Text utilities shared by the stages: P-Former input masking and T5's prefix/suffix split."""
import random

import torch


def mask_tokens(input_ids, tokenizer, prob, generator=None):
    """Replace each non-special token by [MASK] with probability ``prob``.  input_ids: [B, L] -> [B, L]."""
    if prob <= 0:
        return input_ids
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in tokenizer.all_special_ids:
        special |= input_ids == token_id
    draw = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    return input_ids.masked_fill((draw < prob) & ~special, tokenizer.mask_token_id)


def split_prefix_suffix(text, rng=random):
    """Split at a random word boundary: the prefix has at least one word, the suffix may be empty.

    >>> split_prefix_suffix("cat")  # one word: ("cat", "")
    """
    words = text.split()
    if not words:
        return "", ""
    cut = rng.randint(1, len(words))
    return " ".join(words[:cut]), " ".join(words[cut:])
