"""Stage 2 with Flan-T5 (``blip2_t5_pformer``): LAVIS BLIP-2 T5 + alignment to the P-Former (w2 = 100).

Captioning data gives ``text_input`` only; LAVIS's Blip2T5 needs ``text_input`` (encoder) and
``text_output`` (decoder target). Unless the samples already carry ``text_output``, a caption of n words
is split after k words, k uniform in 1 .. max(1, n // 2) (the reference's stage-2 distribution,
``split_prefix_suffix(..., stage="stage2")``; a one-word caption gives an empty suffix); a caption that
starts with the model's ``prompt`` is split after it.
The P-Former teacher reads the whole caption (``text_input`` + " " + ``text_output`` when the dataset
gives both).

``loss_align = alignment_weight * MSE(t5_proj(query_output), P-Former prompt(caption))``; T5 and the
P-Former are frozen and not saved; the checkpoint loads into stock LAVIS ``blip2_t5`` when
``cross_attention_freq`` is 2 (the only value stock Blip2T5 builds). Stage 1 -> 2 as ``blip2_opt_pformer``.
LAVIS casts T5 to bf16 in its constructor; ``llm_precision`` (default bf16, ``fp32`` on CPU) is applied
afterwards.
"""
import os
import random

import torch

from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_pformer.backbones import BackboneMixin, sentencepiece_conversion_errors
from lavis_pformer.models.alignment import LemmatizerMixin, PFormerAlignmentMixin, strip_prompt
from lavis_pformer.models.common import CONFIG_DIR
from lavis_pformer.models.stage2 import Stage2Mixin
from lavis_pformer.text import split_prefix_suffix


def _as_list(texts):
    return [texts] if isinstance(texts, str) else list(texts)


@registry.register_model("blip2_t5_pformer")
class Blip2T5PFormer(PFormerAlignmentMixin, Stage2Mixin, LemmatizerMixin, BackboneMixin, Blip2T5):
    """forward -> {"loss", "loss_lm", "loss_align"} (loss_align only with a teacher, loss_lm only if lm_weight > 0)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_flant5xl": os.path.join(CONFIG_DIR, "blip2_t5_pformer_pretrain_flant5xl.yaml"),
        "caption_coco_flant5xl": os.path.join(CONFIG_DIR, "blip2_t5_pformer_caption_coco_flant5xl.yaml"),
        "tiny": os.path.join(CONFIG_DIR, "blip2_t5_pformer_tiny.yaml"),
    }
    compatible_archs = ("blip2_t5",)
    DEFAULT_ALIGNMENT_WEIGHT = 100.0
    PROJ = "t5_proj"
    LLM_KEY = "t5_model"
    DEFAULT_LLM = "google/flan-t5-xl"
    DEFAULT_LLM_PRECISION = "bf16"
    CONCAT_AUTOCAST_DTYPE = torch.bfloat16  # Blip2T5.forward concatenates under maybe_autocast(dtype=bfloat16)

    def __init__(self, bert_model="bert-base-uncased", vit_config=None, llm_precision="bf16",
                 alignment_weight=DEFAULT_ALIGNMENT_WEIGHT, pformer_checkpoint=None, for_training=False,
                 split_seed=0, lm_weight=1.0, cross_attention_freq=2, teacher_precision="fp32", **lavis_kwargs):
        self.set_backbones(bert_model=bert_model, vit_config=vit_config, cross_attention_freq=cross_attention_freq)
        with sentencepiece_conversion_errors():
            super().__init__(**lavis_kwargs)  # casts T5 to bf16
        self.rng = random.Random(split_seed)
        self.setup_stage2(lavis_kwargs.get("t5_model", self.DEFAULT_LLM), llm_precision, alignment_weight,
                          pformer_checkpoint, for_training, lm_weight, teacher_precision)

    def prepare_lavis_samples(self, samples):
        """Split each caption into ``text_input`` (prefix) / ``text_output`` (suffix) unless given.

        A caption that starts with the model's ``prompt`` (captioning fine-tune: "a photo of ...") is split
        after the prompt, so the encoder reads what ``generate`` feeds it; others after 1 .. max(1, n // 2) words.
        """
        if "text_output" in samples:
            return samples
        prefixes, suffixes = zip(*(self.split_caption(t) for t in _as_list(samples["text_input"])))
        return dict(samples, text_input=list(prefixes), text_output=list(suffixes))

    def split_caption(self, text):
        prompt = (self.prompt or "").strip()
        if prompt and text.startswith(prompt) and text[len(prompt):].strip():
            return prompt, text[len(prompt):].strip()
        return split_prefix_suffix(text, self.rng, stage="stage2")

    def alignment_texts(self, samples):
        texts = _as_list(samples["text_input"])
        if "text_output" in samples:
            texts = [f"{a} {b}".strip() for a, b in zip(texts, _as_list(samples["text_output"]))]
        return [strip_prompt(t, self.prompt) for t in texts]

    def predict_answers(self, samples, num_beams=5, inference_method="generate", *args, **kwargs):
        """LAVIS's ``Blip2T5.predict_answers`` ('generate' only, said loudly; lemmatizer without exit(1))."""
        self._check_inference_method(inference_method)
        return super().predict_answers(samples, num_beams, inference_method, *args, **kwargs)
