"""The demo LM's evaluation: answering the world's questions from a textual scene (the ceiling of the image side),
and a first-token accuracy for the training logs."""
import json
import os

import torch

from lavis_pformer.demo.lm_data import PAD_ID, encode_segments
from lavis_pformer.demo.lm_model import fast_logits
from lavis_pformer.demo.vqa_scores import score_answers
from lavis_pformer.synthetic.shapes_world import SEGMENT_SEP
from lavis_pformer.text import QA_PROMPT


def load_questions(world_dir, split):
    with open(os.path.join(world_dir, f"vqa_{split}.json"), encoding="utf-8") as f:
        questions = json.load(f)
    with open(os.path.join(world_dir, f"captions_{split}.json"), encoding="utf-8") as f:
        captions = {str(r["image_id"]): r["caption"] for r in json.load(f)}
    # the caption before the question, and as a context segment before the bos (where the image side puts its
    # soft prompt)
    return [
        {"prompt": captions[str(q["image_id"])] + " " + QA_PROMPT.format(q["question"]),
         "context_prompt": captions[str(q["image_id"])] + SEGMENT_SEP + QA_PROMPT.format(q["question"]),
         "answer": q["answer"][0] if isinstance(q["answer"], list) else q["answer"],
         "question_type": q["question_type"]}
        for q in questions
    ]


@torch.no_grad()
def quick_accuracy(model, tokenizer, items, batch_size=256):
    """Per-type accuracy of the argmax first answer token (one forward pass; for training logs)."""
    was_training = model.training
    model.eval()
    hits = {}
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            enc = [encode_segments(tokenizer, it["prompt"]) for it in chunk]
            T = max(len(e) for e in enc)
            inp = torch.full((len(chunk), T), PAD_ID, dtype=torch.long)
            select = torch.zeros((len(chunk), T), dtype=torch.bool)
            valid = torch.zeros((len(chunk), T), dtype=torch.bool)
            for r, e in enumerate(enc):
                inp[r, : len(e)] = torch.tensor(e)
                valid[r, : len(e)] = True
                select[r, len(e) - 1] = True
            device = model.lm_head.weight.device
            pred = fast_logits(model, inp.to(device), valid=valid.to(device), select=select.to(device))
            pred = pred.argmax(-1).tolist()
            for it, p in zip(chunk, pred):
                hits.setdefault(it["question_type"], []).append(clean_answer(tokenizer.decode([p])) == it["answer"])
    finally:
        model.train(was_training)
    return {t: sum(h) / len(h) for t, h in hits.items()}


def clean_answer(text):
    """The predicted answer in generated text: up to the first newline or full stop, stripped."""
    return text.split("\n")[0].split(".")[0].strip()


@torch.no_grad()
def answer_questions(model, tokenizer, prompts, batch_size=128, max_new_tokens=3):
    """Greedy answers (LAVIS-style ``generate``: left padding, ``"\\n"`` ends) for text prompts."""
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    answers = []
    for start in range(0, len(prompts), batch_size):
        rows = [encode_segments(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r)
            attention_mask[i, width - len(r):] = 1
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, eos_token_id=newline, pad_token_id=tokenizer.pad_token_id,
        )
        answers += [clean_answer(t) for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return answers


def evaluate_text_ceiling(out_dir, world_dir, split="val"):
    """Load the saved LM through LAVIS and answer ``split``'s questions from the caption text, with the caption
    in the question's segment and (``context``) as a context segment before the bos."""
    from transformers import AutoTokenizer

    from lavis.models.blip2_models.modeling_opt import OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out_dir, use_fast=False)
    model = OPTForCausalLM.from_pretrained(out_dir).eval()
    items = load_questions(world_dir, split)
    answer_sets = {}
    world_path = os.path.join(world_dir, "world.json")
    if os.path.exists(world_path):
        with open(world_path, encoding="utf-8") as f:
            answer_sets = json.load(f).get("answers", {})

    def score(prompt_key):
        predictions = answer_questions(model, tokenizer, [it[prompt_key] for it in items])
        return score_answers([(it["question_type"], p, it["answer"]) for it, p in zip(items, predictions)],
                             answer_sets)

    result = score("prompt")
    result["split"] = split
    result["context"] = score("context_prompt")
    return result
