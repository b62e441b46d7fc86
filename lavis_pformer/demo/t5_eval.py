"""The frozen T5's evaluation, loaded as LAVIS's ``Blip2T5`` loads it: answering the world's questions from the caption
standing where the soft prompt goes (the text ceiling), continuing a caption from a prefix, and answering from a
P-Former's prompt of the true caption (a stage-0 teacher's ceiling).

Every encoder input is ``[context ; text </s>]`` with ``context`` a caption's token embeddings or a soft prompt
[Q, H], fed as ``inputs_embeds`` with greedy ``generate``, as ``Blip2T5.predict_answers`` does. Answers are scored
by ``vqa_scores`` (LAVIS's answer normalisation), the scorer of the image side's runs.
"""
import json
import os
import random

import torch

from lavis_pformer.demo.t5_data import encoder_ids, pad, processors
from lavis_pformer.demo.vqa_scores import normalize_answer, score_answers
from lavis_pformer.text import QA_PROMPT, max_prefix_words

VQA_MAX_TOKENS = 3  # the demo's zero-shot VQA setting (run.max_len)
CAPTION_MAX_TOKENS = 40


def load_t5(t5_dir):
    """(T5TokenizerFast, LAVIS's T5ForConditionalGeneration in eval mode) of a saved folder, as ``Blip2T5`` loads
    them (``dense_act_fn`` "gelu")."""
    from transformers import T5Config, T5TokenizerFast

    from lavis.models.blip2_models.modeling_t5 import T5ForConditionalGeneration

    config = T5Config.from_pretrained(t5_dir)
    config.dense_act_fn = "gelu"
    return T5TokenizerFast.from_pretrained(t5_dir), T5ForConditionalGeneration.from_pretrained(t5_dir, config=config).eval()


def question_items(world_dir, split):
    """The questions of ``split``: [{"caption" (processed as in the runs), "question", "answer", "question_type",
    "objects" (the answer of the image's count question, None without one)}]."""
    caption_processor, question_processor = processors()
    with open(os.path.join(world_dir, f"vqa_{split}.json"), encoding="utf-8") as f:
        questions = json.load(f)
    with open(os.path.join(world_dir, f"captions_{split}.json"), encoding="utf-8") as f:
        captions = {str(r["image_id"]): r["caption"] for r in json.load(f)}
    answer = {id(q): q["answer"][0] if isinstance(q["answer"], list) else q["answer"] for q in questions}
    objects = {str(q["image_id"]): answer[id(q)] for q in questions if q["question_type"] == "count"}
    return [{"caption": caption_processor(captions[str(q["image_id"])]),
             "question": question_processor(q["question"]),
             "answer": answer[id(q)],
             "question_type": q["question_type"],
             "objects": objects.get(str(q["image_id"]))} for q in questions]


def answer_sets(world_dir):
    """{question_type: answers} of the world (world.json), {} without one."""
    path = os.path.join(world_dir, "world.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("answers", {})


@torch.no_grad()
def generate(model, tokenizer, texts, contexts=None, prompts=None, max_new_tokens=VQA_MAX_TOKENS, batch_size=128):
    """Greedy outputs (decoded, special tokens dropped) for encoder inputs ``[context ; text </s>]``.

    ``contexts``: strings whose token embeddings stand first; or ``prompts``: a [N, Q, H] soft prompt; or neither.
    """
    embed = model.get_input_embeddings()
    outputs = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        ctx = [""] * len(chunk) if contexts is None else list(contexts[start : start + batch_size])
        rows = encoder_ids(tokenizer, ctx, chunk)
        ids = pad(rows, tokenizer.pad_token_id)
        mask = pad([[1] * len(r) for r in rows], 0)
        embeds = embed(ids)
        if prompts is not None:
            prompt = prompts[start : start + batch_size].to(embeds.dtype)
            embeds = torch.cat([prompt, embeds], dim=1)
            mask = torch.cat([torch.ones(prompt.shape[:2], dtype=torch.long), mask], dim=1)
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, min_length=1)
        outputs += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return outputs


def score_items(items, predictions, sets):
    """``score_answers`` of the predictions, and ``color_shape_by_objects``: the accuracy on colour and shape
    questions per number of objects in the scene (with several objects the answer must be read from the right one)."""
    result = score_answers([(it["question_type"], p, it["answer"]) for it, p in zip(items, predictions)], sets)
    hits = {}
    for it, p in zip(items, predictions):
        if it["question_type"] in ("color", "shape") and it["objects"] is not None:
            hits.setdefault(it["objects"], []).append(normalize_answer(p) == normalize_answer(it["answer"]))
    result["color_shape_by_objects"] = {n: sum(h) / len(h) for n, h in sorted(hits.items())}
    return result


def text_ceiling(model, tokenizer, world_dir, split="val"):
    """VQA metrics (``score_answers``) of T5 answering ``[caption ; "Question: q Short answer:"]``."""
    items = question_items(world_dir, split)
    predictions = generate(model, tokenizer, [QA_PROMPT.format(it["question"]) for it in items],
                           contexts=[it["caption"] for it in items])
    return dict(score_items(items, predictions, answer_sets(world_dir)), split=split)


def caption_continuation(model, tokenizer, world_dir, split="val", seed=0):
    """Exact-match shares of T5 continuing each caption of ``split`` that stands first in its encoder:
    ``empty_prefix``: ``[caption ; ""] -> caption`` (zero-shot captioning's layout); ``prefix``: ``[caption ;
    first k words] -> the rest``, k uniform in 1 .. 1 + n // 2 (stage 0's)."""
    caption_processor, _ = processors()
    with open(os.path.join(world_dir, f"captions_{split}.json"), encoding="utf-8") as f:
        captions = [caption_processor(r["caption"]) for r in json.load(f)]
    rng = random.Random(seed)
    cuts = [rng.randint(1, max_prefix_words(len(c.split()), "stage0")) for c in captions]
    prefixes = [" ".join(c.split()[:k]) for c, k in zip(captions, cuts)]
    suffixes = [" ".join(c.split()[k:]) for c, k in zip(captions, cuts)]
    whole = generate(model, tokenizer, [""] * len(captions), contexts=captions, max_new_tokens=CAPTION_MAX_TOKENS)
    rest = generate(model, tokenizer, prefixes, contexts=captions, max_new_tokens=CAPTION_MAX_TOKENS)
    return {"empty_prefix": sum(a == b for a, b in zip(whole, captions)) / len(captions),
            "prefix": sum(a == b for a, b in zip(rest, suffixes)) / len(captions),
            "captions": len(captions), "split": split}


def evaluate_t5(t5_dir, world_dir, split="val"):
    """The text ceiling and the caption continuation of the T5 saved in ``t5_dir``, loaded through LAVIS."""
    tokenizer, model = load_t5(t5_dir)
    return {"text_ceiling": text_ceiling(model, tokenizer, world_dir, split),
            "caption_continuation": caption_continuation(model, tokenizer, world_dir, split)}


@torch.no_grad()
def teacher_ceiling(pformer_path, t5_dir, world_dir, split="val", bert_model=None, max_txt_len=32):
    """VQA metrics of the frozen T5 answering from a stage-0 P-Former's prompt of the true caption (no image):
    ``[prompt(caption) ; "Question: q Short answer:"]``, the ceiling an aligned image side is pulled toward.

    ``bert_model``: the BERT folder of the P-Former's tokenizer (default: the one its checkpoint records).
    """
    from lavis_pformer.backbones import bert_tokenizer
    from lavis_pformer.pformer import PFormer

    tokenizer, model = load_t5(t5_dir)
    pformer = PFormer.load(pformer_path, llm_hidden_size=model.config.d_model).eval()
    bert = bert_tokenizer(bert_model or pformer.bert_model)
    items = question_items(world_dir, split)
    tokens = bert([it["caption"] for it in items], padding="longest", truncation=True, max_length=max_txt_len,
                  return_tensors="pt")
    prompts = pformer(tokens.input_ids, tokens.attention_mask).prompt
    predictions = generate(model, tokenizer, [QA_PROMPT.format(it["question"]) for it in items], prompts=prompts)
    return dict(score_items(items, predictions, answer_sets(world_dir)), split=split)
