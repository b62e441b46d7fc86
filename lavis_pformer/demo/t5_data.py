"""The frozen T5's text side: its tokenizer trained on the world's corpus, the corpus lines as records, and training
batches of (encoder input, decoder target) pairs laid out as the runs feed T5.

In every run T5's encoder reads ``[soft prompt ; text </s>]`` (``pformer_t5``, ``blip2_t5_pformer``, LAVIS's
``Blip2T5.predict_answers``); here the caption stands where the soft prompt goes, as token ids before the text's.
T5's positions are relative, so nothing else marks where the prompt ends. Captions are written as LAVIS's
``blip_caption`` processor delivers them to the LM in stages 0 and 2 (lowercase, no "." or ":").
"""
import functools
import re
from typing import NamedTuple, Optional

import torch

from lavis_pformer.demo.train_lm import read_corpus
from lavis_pformer.synthetic.shapes_world import SEGMENT_SEP
from lavis_pformer.text import QA_PROMPT, max_prefix_words

ANSWER_WEIGHT = 3.0  # loss weight of answer tokens, as the OPT LM's
_QA_RE = re.compile(re.escape(QA_PROMPT).replace(re.escape("{}"), "(.+?)") + r" (.+)$")


class Record(NamedTuple):
    """A corpus line: its caption (processed), its question and answer (None without), whether it has a context
    segment."""
    caption: str
    question: Optional[str]
    answer: Optional[str]
    context: bool


class Example(NamedTuple):
    """One training pair: the encoder reads ``context`` ids then ``text`` ids and </s>; the decoder writes ``target``
    and </s>; ``answer`` marks a QA example (its target tokens are weighted)."""
    context: str
    text: str
    target: str
    answer: bool


@functools.lru_cache(maxsize=None)
def processors():
    """LAVIS's (caption, question) text processors of the runs' datasets."""
    from lavis.processors.blip_processors import BlipCaptionProcessor, BlipQuestionProcessor

    return BlipCaptionProcessor(), BlipQuestionProcessor()


def parse_line(line):
    """The Record of a corpus line (``caption [Question: q Short answer: a]``, optionally after ``caption</s>``)."""
    caption_processor, question_processor = processors()
    context, sep, text = line.rpartition(SEGMENT_SEP)
    match = _QA_RE.search(text)
    caption = context if sep else (text[: match.start()] if match else text)
    question, answer = (question_processor(match.group(1)), match.group(2).strip()) if match else (None, None)
    return Record(caption_processor(caption), question, answer, bool(sep))


def tokenizer_sentences(records):
    """The texts the tokenizer is trained on: what T5 reads and writes, the captions and the QA texts."""
    return [r.caption for r in records] + [QA_PROMPT.format(r.question) + " " + r.answer
                                           for r in records if r.question is not None]


def build_tokenizer(records, out_dir, vocab_size=160):
    """T5's tokenizer trained on the corpus ``records`` (a sentencepiece BPE: on this corpus sentencepiece's unigram
    model keeps 62 pieces and splits "Question" into letters), saved under ``out_dir``; returns the fast one."""
    from transformers import T5TokenizerFast

    from lavis_pformer.tiny import build_t5_tokenizer

    build_t5_tokenizer(out_dir, tokenizer_sentences(records), vocab_size, model_type="bpe")
    return T5TokenizerFast.from_pretrained(out_dir)


def example(record, rng, qa_share):
    """A training Example drawn from ``record``.

    With probability ``qa_share`` (lines with a question): ``[caption ; "Question: q Short answer:"] -> answer``.
    Otherwise the caption is continued: cut after k words, k uniform in 0 .. 1 + n // 2 (stage 0's prefix lengths,
    stage 2's and the empty prefix of zero-shot captioning), ``[caption ; prefix] -> suffix`` for a line with a
    context segment, ``prefix -> suffix`` for one without.
    """
    if record.question is not None and rng.random() < qa_share:
        return Example(record.caption, QA_PROMPT.format(record.question), record.answer, True)
    words = record.caption.split()
    k = rng.randint(0, max_prefix_words(len(words), "stage0"))
    return Example(record.caption if record.context else "", " ".join(words[:k]), " ".join(words[k:]), False)


def encoder_ids(tokenizer, contexts, texts):
    """Encoder token ids of each pair: ids(context) + ids(text) + </s>, as LAVIS tokenizes a text after a prompt."""
    ctx = tokenizer(list(contexts), add_special_tokens=False).input_ids
    txt = tokenizer(list(texts)).input_ids
    return [c + t for c, t in zip(ctx, txt)]


def pad(rows, value):
    """[B, max len] long tensor of ``rows`` padded on the right with ``value``."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def encode(tokenizer, examples, answer_weight=ANSWER_WEIGHT):
    """(input_ids [B, S], attention_mask [B, S], labels [B, T] with -100 at padding, weights [B, T]) of examples."""
    enc = encoder_ids(tokenizer, [e.context for e in examples], [e.text for e in examples])
    tgt = tokenizer([e.target for e in examples]).input_ids
    input_ids = pad(enc, tokenizer.pad_token_id)
    attention_mask = pad([[1] * len(r) for r in enc], 0)
    labels = pad(tgt, -100)
    weights = torch.zeros(labels.shape)
    for i, (e, r) in enumerate(zip(examples, tgt)):
        weights[i, : len(r)] = answer_weight if e.answer else 1.0
    return input_ids, attention_mask, labels, weights


def batches(records, tokenizer, batch_size, qa_share, rng, answer_weight=ANSWER_WEIGHT):
    """Endless stream of ``encode``d batches: the records in a new random order each pass, one Example each."""
    n = len(records)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield encode(tokenizer, [example(records[i], rng, qa_share) for i in order[start : start + batch_size]],
                         answer_weight)


def read_records(world_dir):
    """The Records of the world's ``corpus.txt``."""
    return [parse_line(line) for line in read_corpus(world_dir)]
