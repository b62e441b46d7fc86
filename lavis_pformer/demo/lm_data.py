"""The demo LM's text side: OPT's tokenizer trained on the world's corpus, the corpus as weighted token ids, and
the training batches (right-padded, each text at a random position offset)."""
import os
import re

import torch

from lavis_pformer.synthetic.shapes_world import SEGMENT_SEP
from lavis_pformer.text import QA_PROMPT

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: <s>=0, <pad>=1, </s>=2 (bos = eos), <unk>=3
PAD_ID, BOS_ID = 1, 2
ANSWER_WEIGHT = 3.0
ANSWER_CUE = QA_PROMPT.split("{}")[1].strip()  # "Short answer:"
_ANSWER_RE = re.compile(re.escape(ANSWER_CUE) + r"( [^.\n]*)")  # an answer: up to "." or the end of the line


def build_tokenizer(lines, out_dir, vocab_size=800):
    """Train a byte-level BPE on ``lines`` and save it as OPT's slow tokenizer under ``out_dir``.

    Returns (slow GPT2Tokenizer, fast ``tokenizers`` ByteLevelBPETokenizer with the same vocabulary,
    used to encode the corpus quickly with character offsets).
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    os.makedirs(out_dir, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS)
    bpe.save_model(out_dir)
    tokenizer = GPT2Tokenizer(
        os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
        bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>", add_bos_token=True,
    )
    tokenizer.save_pretrained(out_dir)
    assert tokenizer.pad_token_id == PAD_ID and tokenizer.bos_token_id == BOS_ID
    assert len(tokenizer("\n", add_special_tokens=False).input_ids) == 1, "'\\n' must be one token"
    return tokenizer, bpe


def encode_corpus(lines, bpe, tokenizer, check=64, answer_weight=ANSWER_WEIGHT):
    """Token ids and per-token loss weights of every line: ``</s>`` + segment for each of the line's
    ``</s>``-separated segments, then ``"\\n"`` (a line without a separator is one segment).

    The weight of token i is the weight of predicting it (``answer_weight`` for answer tokens, else 1);
    the segments of the first ``check`` lines are also encoded with the slow tokenizer, which must agree.
    """
    segments = [line.split(SEGMENT_SEP) for line in lines]
    texts = [seg + ("\n" if i == len(segs) - 1 else "") for segs in segments for i, seg in enumerate(segs)]
    encodings = iter(bpe.encode_batch(texts))
    pieces = iter(texts)
    ids, weights = [], []
    for segs in segments:
        line_ids, line_weights = [], []
        for _ in segs:
            text, enc = next(pieces), next(encodings)
            spans = [(m.start(1), m.end(1)) for m in _ANSWER_RE.finditer(text)]
            line_weights.append(1.0)  # the bos: never a target in the first segment, predicted after a context
            for start, end in enc.offsets:
                line_weights.append(answer_weight if any(start < e and end > s for s, e in spans) else 1.0)
            line_ids += [BOS_ID] + enc.ids
        ids.append(line_ids)
        weights.append(line_weights)
    for text in texts[:check]:
        slow = tokenizer(text).input_ids
        fast = [BOS_ID] + bpe.encode(text).ids
        if slow != fast:
            raise AssertionError(f"fast and slow tokenizers disagree on {text!r}: {fast} vs {slow}")
    return ids, weights


def encode_segments(tokenizer, text):
    """Token ids of ``text`` as the LM was trained on it: bos + ids of each ``</s>``-separated segment."""
    ids = []
    for segment in text.split(SEGMENT_SEP):
        ids += [tokenizer.bos_token_id] + tokenizer(segment, add_special_tokens=False).input_ids
    return ids


def batches(ids, weights, batch_size, max_offset, rng):
    """Endless stream of (input_ids, targets, weights, valid, offsets) batches in random order.

    input_ids / targets / weights / valid are [B, T]; offsets [B] is each text's first position, uniform in
    0..max_offset. Rows are right-padded; ``valid`` marks the text. Position t's target is token t+1;
    padding has weight 0. Batches are not bucketed by length (in this corpus length goes with content: a
    batch of short texts would hold no questions); ``fast_logits`` makes the padding nearly free instead.
    """
    n = len(ids)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            members = order[start : start + batch_size]
            T = max(len(ids[i]) for i in members) - 1  # inputs drop the last token
            inp = torch.full((len(members), T), PAD_ID, dtype=torch.long)
            tgt = torch.full((len(members), T), PAD_ID, dtype=torch.long)
            wgt = torch.zeros((len(members), T))
            valid = torch.zeros((len(members), T), dtype=torch.bool)
            for r, i in enumerate(members):
                seq = ids[i]
                inp[r, : len(seq) - 1] = torch.tensor(seq[:-1])
                tgt[r, : len(seq) - 1] = torch.tensor(seq[1:])
                wgt[r, : len(seq) - 1] = torch.tensor(weights[i][1:])
                valid[r, : len(seq) - 1] = True
            offsets = torch.tensor([rng.randint(0, max_offset) for _ in members], dtype=torch.long)
            yield inp, tgt, wgt, valid, offsets
