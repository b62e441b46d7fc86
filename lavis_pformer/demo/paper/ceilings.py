"""What the alignment pulls an arm toward: the frozen LLM answering a split's questions from its teacher's prompt
of the TRUE caption (text only, no image), beside the LLM's own text ceiling (the caption's text standing where
the soft prompt goes). An aligned image side lands near its teacher's ceiling, so a teacher whose prompts the LLM
cannot answer from caps the arm, however well its prompts hold the scene.

Both are computed in-process with the models the runs use. OPT: the stage-2 model of an evaluation config (frozen
ViT, LLM and BERT tokenizer), given the teacher with ``setup_alignment`` (strict P-Former loading), prompts from
``teacher_prompt`` and answers generated as the model's ``predict_answers`` does (greedy, the evaluation's
``max_len``). T5: ``t5_eval`` (the frozen T5 loaded as ``Blip2T5`` loads it, the P-Former's prompt first in its
encoder, greedy answers of at most 3 tokens: the scales' ``vqa_max_len``).
"""
import json
import os

import torch
from omegaconf import OmegaConf

from lavis_pformer.demo.vqa_scores import score_answers
from lavis_pformer.text import QA_PROMPT


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def eval_items(world, split):
    """The VQA items of ``split`` with their image's caption: [{question, answer, question_type, caption}]."""
    captions = {str(r["image_id"]): r["caption"] for r in _load(os.path.join(world, f"captions_{split}.json"))}
    return [{"question": q["question"], "question_type": q["question_type"],
             "answer": q["answer"][0] if isinstance(q["answer"], list) else q["answer"],
             "caption": captions[str(q["image_id"])]} for q in _load(os.path.join(world, f"vqa_{split}.json"))]


def build_model(cfg_path):
    """The model of an evaluation config (for inference: no teacher), in eval mode."""
    from lavis.common.registry import registry

    import lavis_pformer  # noqa: F401  (registers the models)

    cfg = OmegaConf.load(cfg_path).model
    return registry.get_model_class(cfg.arch).from_config(cfg).eval()


def caption_texts(captions):
    """Captions as the training runs hand them to the teacher (LAVIS's ``blip_caption`` processor)."""
    from lavis.processors.blip_processors import BlipCaptionProcessor

    processor = BlipCaptionProcessor()
    return [processor(c) for c in captions]


@torch.no_grad()
def answers_after_prompt(model, prompts, questions, max_len):
    """Greedy answers of the model's frozen OPT after [soft prompt ; "Question: q Short answer:"] (as its
    ``predict_answers`` generates after the image prompt). ``prompts``: [N, Q, H_llm]."""
    texts = [QA_PROMPT.format(q) for q in questions]
    return model.generate_after_prompt(prompts, texts, model.maybe_autocast(), num_beams=1, max_new_tokens=max_len,
                                       min_length=1, length_penalty=-1)


def teacher_ceiling(cfg_path, pformer_path, world, splits, max_len, batch_size=64):
    """{split: VQA metrics} of the frozen OPT answering from the teacher's prompt of the true caption."""
    from lavis_pformer.model_keys import AlignmentKeys

    model = build_model(cfg_path)
    teacher = AlignmentKeys(OmegaConf.create({"alignment_weight": 1.0, "pformer_checkpoint": pformer_path}), 1.0)
    model.setup_alignment(teacher, num_query_token=model.query_tokens.shape[1],
                          llm_hidden_size=getattr(model, model.LLM_KEY).config.hidden_size,
                          llm_name=model._llm_name, for_training=True)
    answer_sets = _load(os.path.join(world, "world.json"))["answers"]
    out = {}
    for split in splits:
        items = eval_items(world, split)
        texts = caption_texts([it["caption"] for it in items])
        predictions = []
        for start in range(0, len(items), batch_size):
            prompts = model.teacher_prompt(texts[start : start + batch_size])
            predictions += answers_after_prompt(model, prompts, [it["question"] for it in items[start : start + batch_size]],
                                                max_len)
        out[split] = score_answers(((it["question_type"], p, it["answer"]) for it, p in zip(items, predictions)),
                                   answer_sets)
    return out


def opt_text_ceiling(lm_dir, world, splits):
    """{split: VQA metrics} of the frozen OPT answering with the caption placed before its bos (where the soft
    prompt goes)."""
    from lavis_pformer.demo.lm_eval import evaluate_text_ceiling

    return {split: evaluate_text_ceiling(lm_dir, world, split)["context"] for split in splits}


def t5_text_ceiling(t5_dir, world, splits):
    """{split: VQA metrics} of the frozen T5 answering with the caption first in its encoder (where the soft prompt
    goes): ``t5_eval.text_ceiling``."""
    from lavis_pformer.demo import t5_eval

    tokenizer, model = t5_eval.load_t5(t5_dir)
    return {split: t5_eval.text_ceiling(model, tokenizer, world, split) for split in splits}


def t5_teacher_ceiling(pformer_path, t5_dir, world, splits, bert_model):
    """{split: VQA metrics} of the frozen T5 answering from the teacher's prompt of the true caption:
    ``t5_eval.teacher_ceiling``."""
    from lavis_pformer.demo import t5_eval

    return {split: t5_eval.teacher_ceiling(pformer_path, t5_dir, world, split, bert_model=bert_model)
            for split in splits}
