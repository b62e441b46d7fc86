"""Stage 0 against a frozen Flan-T5 (``pformer_t5``).

Each sentence of n words is split after k words, k uniform in 1 .. 1 + n // 2 (the reference's stage-0
distribution, ``lavis_pformer.text.split_prefix_suffix``): the T5 encoder reads ``[prompt ; prefix]`` and
the decoder predicts the suffix (it may be empty, always for one-word sentences: the target is then just
</s>). The P-Former sees the whole sentence, unmasked by default.
"""
import os
import random

import torch
from transformers import T5Config, T5TokenizerFast

from lavis.common.registry import registry
from lavis.models.blip2_models.modeling_t5 import T5ForConditionalGeneration

from lavis_pformer.backbones import sentencepiece_conversion_errors
from lavis_pformer.models.common import CONFIG_DIR
from lavis_pformer.models.pformer_pretrain import PFormerPretrain
from lavis_pformer.precision import cat_in_dtype
from lavis_pformer.text import split_prefix_suffix


@registry.register_model("pformer_t5")
class PFormerT5(PFormerPretrain):
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pformer_flant5xl": os.path.join(CONFIG_DIR, "pformer_flant5xl.yaml"),
        "pformer_flant5xxl": os.path.join(CONFIG_DIR, "pformer_flant5xxl.yaml"),
        "tiny": os.path.join(CONFIG_DIR, "pformer_t5_tiny.yaml"),
    }
    LLM_KEY, DEFAULT_LLM, DEFAULT_LLM_PRECISION = "t5_model", "google/flan-t5-xl", "bf16"
    DEFAULT_MASK_PROB, DEFAULT_VQ_WEIGHT = 0.0, 0.0

    def __init__(self, t5_model="google/flan-t5-xl", llm_precision="bf16", **kwargs):
        super().__init__(llm_name=t5_model, **kwargs)
        with sentencepiece_conversion_errors():
            self.t5_tokenizer = T5TokenizerFast.from_pretrained(t5_model)
        config = T5Config.from_pretrained(t5_model)
        config.dense_act_fn = "gelu"  # as LAVIS's Blip2T5
        t5 = T5ForConditionalGeneration.from_pretrained(t5_model, config=config)
        self.t5_model = self.freeze(self.cast_llm(t5, llm_precision))
        self.exclude_from_checkpoint("t5_model.")
        self.build_pformer(self.t5_model.config.hidden_size)
        self.rng = random.Random(0)

    def llm_module(self):
        return self.t5_model

    def encoder_inputs(self, prompt, prefixes):
        """[prompt ; embed(prefix)] [B, Q + P, H] and its attention mask."""
        tokens = self.t5_tokenizer(
            prefixes, padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(prompt.device)
        embeds = self.t5_model.encoder.embed_tokens(tokens.input_ids)
        attention = torch.cat(
            [torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device), tokens.attention_mask], dim=1
        )
        return cat_in_dtype([prompt, embeds], embeds.dtype), attention

    def split(self, text):
        """(prefix, suffix) of one sentence, with stage 0's prefix-length distribution."""
        return split_prefix_suffix(text, self.rng, stage="stage0")

    def llm_loss(self, prompt, texts):
        prefixes, suffixes = zip(*(self.split(t) for t in texts))
        return self.seq2seq_loss(prompt, prefixes, suffixes)

    def seq2seq_loss(self, prompt, encoder_texts, targets_texts):
        """T5 reads ``[prompt ; encoder_texts]`` and predicts ``targets_texts``."""
        embeds, attention = self.encoder_inputs(prompt, list(encoder_texts))
        out_tokens = self.t5_tokenizer(
            list(targets_texts), padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(prompt.device)
        targets = out_tokens.input_ids.masked_fill(out_tokens.input_ids == self.t5_tokenizer.pad_token_id, -100)
        with self.maybe_autocast(dtype=torch.bfloat16):
            return self.t5_model(
                inputs_embeds=embeds, attention_mask=attention, decoder_attention_mask=out_tokens.attention_mask,
                labels=targets, return_dict=True,
            ).loss

    def llm_qa_loss(self, prompt, questions, answers):
        return self.seq2seq_loss(prompt, questions, answers)

    @torch.no_grad()
    def generate(self, samples, num_beams=1, max_length=30, min_length=1, prefix_words=1, **kwargs):
        """T5's reconstruction from the prompt and the first ``prefix_words`` words: list of str."""
        texts = samples["text_input"]
        prompt = self.prompt(texts)
        prefixes = [" ".join(t.split()[:prefix_words]) for t in texts]
        embeds, attention = self.encoder_inputs(prompt, prefixes)
        with self.maybe_autocast(dtype=torch.bfloat16):
            out = self.t5_model.generate(
                inputs_embeds=embeds, attention_mask=attention, num_beams=num_beams,
                max_new_tokens=max_length, min_length=min_length, **kwargs,
            )
        suffixes = self.t5_tokenizer.batch_decode(out, skip_special_tokens=True)
        return [f"{p} {s}".strip() for p, s in zip(prefixes, suffixes)]
