"""Stage 2 with OPT (``blip2_opt_pformer``): LAVIS BLIP-2 OPT + alignment to the P-Former (w2 = 100).

``loss_align = alignment_weight * MSE(opt_proj(query_output), P-Former prompt(caption))``; the trainable
parameters are those of stock ``blip2_opt`` stage 2 (Q-Former, query tokens, ln_vision, opt_proj); the
P-Former and OPT are frozen and neither is saved in ``state_dict()``. The checkpoint loads into stock
LAVIS ``blip2_opt`` for evaluation when ``cross_attention_freq`` is 2, the only value stock Blip2OPT builds.

Stage 1 -> 2: the Q-Former is built with ``cross_attention_freq`` (default 2, as LAVIS), which must be the
value of the stage-1 checkpoint; a ``blip2_qformer_pformer`` checkpoint's ``llm_proj`` initialises
``opt_proj``; its stage-1-only tensors (ITC/ITM heads, the Q-Former's text embeddings and text-side
feed-forward layers) are dropped, as LAVIS does. Any other tensor without a place in the model, and a
checkpoint aligned to another LLM (see :mod:`~lavis_pformer.models.stage_checkpoint`), is an error.

Adds what LAVIS 1.0.2's Blip2OPT lacks for zero-shot VQA: ``predict_answers`` (generation after the image
prompt, :mod:`~lavis_pformer.models.frozen_opt`) and ``apply_lemmatizer``. What it shares with the T5 model
is in :mod:`~lavis_pformer.models.stage2`.
"""
import os

import torch

from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_opt import Blip2OPT

from lavis_pformer.backbones import BackboneMixin
from lavis_pformer.models.alignment import LemmatizerMixin, PFormerAlignmentMixin
from lavis_pformer.models.common import CONFIG_DIR
from lavis_pformer.models.frozen_opt import FrozenOPTMixin
from lavis_pformer.models.stage2 import Stage2Mixin


@registry.register_model("blip2_opt_pformer")
class Blip2OPTPFormer(PFormerAlignmentMixin, Stage2Mixin, FrozenOPTMixin, LemmatizerMixin, BackboneMixin, Blip2OPT):
    """forward -> {"loss", "loss_lm", "loss_align"} (loss_align only with a teacher, loss_lm only if lm_weight > 0)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_opt2.7b": os.path.join(CONFIG_DIR, "blip2_opt_pformer_pretrain_opt2.7b.yaml"),
        "pretrain_opt6.7b": os.path.join(CONFIG_DIR, "blip2_opt_pformer_pretrain_opt6.7b.yaml"),
        "caption_coco_opt2.7b": os.path.join(CONFIG_DIR, "blip2_opt_pformer_caption_coco_opt2.7b.yaml"),
        "tiny": os.path.join(CONFIG_DIR, "blip2_opt_pformer_tiny.yaml"),
    }
    compatible_archs = ("blip2_opt",)
    DEFAULT_ALIGNMENT_WEIGHT = 100.0
    PROJ = "opt_proj"
    LLM_KEY = "opt_model"
    DEFAULT_LLM = "facebook/opt-2.7b"
    DEFAULT_LLM_PRECISION = "fp16"

    def __init__(self, bert_model="bert-base-uncased", vit_config=None, llm_precision="fp16",
                 alignment_weight=DEFAULT_ALIGNMENT_WEIGHT, pformer_checkpoint=None, apply_lemmatizer=False,
                 for_training=False, lm_weight=1.0, cross_attention_freq=2, teacher_precision="fp32", **lavis_kwargs):
        self.set_backbones(bert_model=bert_model, vit_config=vit_config, cross_attention_freq=cross_attention_freq)
        super().__init__(**lavis_kwargs)
        self._apply_lemmatizer = apply_lemmatizer
        self._lemmatizer = None
        self.setup_stage2(lavis_kwargs.get("opt_model", self.DEFAULT_LLM), llm_precision, alignment_weight,
                          pformer_checkpoint, for_training, lm_weight, teacher_precision)

    @torch.no_grad()
    def predict_answers(self, samples, num_beams=5, inference_method="generate", max_len=10, min_len=1,
                        num_ans_candidates=128, answer_list=None, prompt="", length_penalty=-1, **kwargs):
        """One answer string per question: OPT continues ``prompt.format(question)`` after the image prompt.

        The question prompt is never truncated (``max_txt_len`` applies to training captions). Same arguments as LAVIS's ``Blip2T5.predict_answers`` (num_ans_candidates / answer_list unused).
        """
        self._check_inference_method(inference_method)
        image = samples["image"]
        questions = samples["text_input"]
        questions = [questions] if isinstance(questions, str) else list(questions)
        texts = [prompt.format(q) for q in questions] if prompt else questions
        answers = self.generate_after_prompt(
            self.image_prompt(image), texts, self.maybe_autocast(), num_beams=num_beams, max_new_tokens=max_len,
            min_length=min_len, length_penalty=length_penalty,
        )
        if self._apply_lemmatizer:
            answers = self._lemmatize(answers)
        return answers
