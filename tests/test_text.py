"""T5 prefix/suffix split (distributions of the reference implementation) and P-Former input masking."""
import math
import random
from collections import Counter

import pytest
import torch

from lavis_pformer.text import mask_tokens, max_prefix_words, split_prefix_suffix

DRAWS = 6000


def prefix_lengths(n_words, stage, seed):
    text = " ".join(f"w{i}" for i in range(n_words))
    rng = random.Random(seed)
    lengths = []
    for _ in range(DRAWS):
        prefix, suffix = split_prefix_suffix(text, rng, stage=stage)
        assert f"{prefix} {suffix}".split() == text.split()  # nothing lost, nothing reordered
        lengths.append(len(prefix.split()))
    return lengths


# (n words, stage) -> the reference's support of the prefix length: stage 0 1 .. 1 + n // 2, stage 2 1 .. n // 2
# (at least 1: the reference crashes on one-word captions in stage 2, the project keeps them, suffix empty)
SUPPORT = {
    (1, "stage0"): 1, (2, "stage0"): 2, (3, "stage0"): 2, (10, "stage0"): 6, (11, "stage0"): 6, (25, "stage0"): 13,
    (1, "stage2"): 1, (2, "stage2"): 1, (3, "stage2"): 1, (10, "stage2"): 5, (11, "stage2"): 5, (25, "stage2"): 12,
}


@pytest.mark.parametrize("n_words, stage", sorted(SUPPORT))
def test_prefix_length_is_uniform_on_the_reference_support(n_words, stage):
    top = SUPPORT[(n_words, stage)]
    assert max_prefix_words(n_words, stage) == top
    counts = Counter(prefix_lengths(n_words, stage, seed=n_words))
    assert set(counts) == set(range(1, top + 1)), counts
    p = 1 / top
    sigma = math.sqrt(p * (1 - p) / DRAWS)
    for k in range(1, top + 1):
        assert abs(counts[k] / DRAWS - p) <= 5 * sigma, (k, counts)


@pytest.mark.parametrize("stage, mean", [("stage0", 3.5), ("stage2", 3.0)])
def test_ten_word_caption_statistics(stage, mean):
    lengths = prefix_lengths(10, stage, seed=1)
    # uniform on 1..K: mean (K + 1) / 2, standard deviation sqrt((K^2 - 1) / 12)
    top = 2 * mean - 1
    sd = math.sqrt((top ** 2 - 1) / 12)
    assert abs(sum(lengths) / DRAWS - mean) < 5 * sd / math.sqrt(DRAWS)
    assert max(lengths) == top and not any(k == 10 for k in lengths)  # the suffix is never empty


def test_one_word_and_empty_captions():
    for stage in ("stage0", "stage2"):
        assert split_prefix_suffix("dog", random.Random(0), stage=stage) == ("dog", "")
        assert split_prefix_suffix("  ", random.Random(0), stage=stage) == ("", "")
    with pytest.raises(ValueError, match="stage0"):
        split_prefix_suffix("a dog", random.Random(0), stage="stage1")


def test_masking_skips_every_special_token(tiny):
    """The project masks only non-special tokens ([CLS], [SEP], [PAD] stay); the reference also masks [SEP]."""
    from lavis_pformer.backbones import bert_tokenizer

    tokenizer = bert_tokenizer(tiny["bert"])
    tokens = tokenizer(["a red circle on the left", "a dog"], padding="longest", return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    masked = mask_tokens(tokens.input_ids, tokenizer, 1.0, generator)
    special = torch.isin(tokens.input_ids, torch.tensor(tokenizer.all_special_ids))
    assert torch.equal(masked[special], tokens.input_ids[special])
    assert bool((masked[~special] == tokenizer.mask_token_id).all())
    # probability 0.25: the masked share of ordinary tokens is near 0.25 over many draws
    ids = tokens.input_ids.repeat(500, 1)
    ordinary = ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    share = (mask_tokens(ids, tokenizer, 0.25, generator)[ordinary] == tokenizer.mask_token_id).float().mean()
    assert abs(share.item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / ordinary.sum().item())
