"""Stage 0 against a frozen OPT decoder (``pformer_opt``).

loss_lm: OPT reads ``[prompt (Q vectors) ; embed(text + "\\n")]`` and reproduces ``text + "\\n"``;
prompt positions and padding are ignored. Plus the two-view contrastive and VQ terms (see the base).
"""
import os

import torch
from transformers import AutoTokenizer

from lavis.common.registry import registry
from lavis.models.blip2_models.modeling_opt import OPTForCausalLM

from lavis_pformer.models.common import CONFIG_DIR
from lavis_pformer.models.pformer_pretrain import PFormerPretrain
from lavis_pformer.precision import cat_in_dtype


@registry.register_model("pformer_opt")
class PFormerOPT(PFormerPretrain):
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pformer_opt2.7b": os.path.join(CONFIG_DIR, "pformer_opt2.7b.yaml"),
        "pformer_opt6.7b": os.path.join(CONFIG_DIR, "pformer_opt6.7b.yaml"),
        "tiny": os.path.join(CONFIG_DIR, "pformer_opt_tiny.yaml"),
    }
    LLM_KEY, DEFAULT_LLM, DEFAULT_LLM_PRECISION = "opt_model", "facebook/opt-2.7b", "fp16"
    DEFAULT_MASK_PROB, DEFAULT_VQ_WEIGHT = 0.25, 1.0

    def __init__(self, opt_model="facebook/opt-2.7b", llm_precision="fp16", **kwargs):
        super().__init__(llm_name=opt_model, **kwargs)
        self.opt_tokenizer = AutoTokenizer.from_pretrained(opt_model, use_fast=False)
        self.opt_model = self.freeze(self.cast_llm(OPTForCausalLM.from_pretrained(opt_model), llm_precision))
        self.exclude_from_checkpoint("opt_model.")
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]
        self.build_pformer(self.opt_model.config.hidden_size)

    def llm_module(self):
        return self.opt_model

    def opt_inputs(self, prompt, texts):
        """Embeddings [B, Q + T, H], attention mask and targets (-100 on prompt and padding)."""
        self.opt_tokenizer.padding_side = "right"
        tokens = self.opt_tokenizer(
            texts, return_tensors="pt", padding="longest", truncation=True, max_length=self.max_txt_len
        ).to(prompt.device)
        targets = tokens.input_ids.masked_fill(tokens.input_ids == self.opt_tokenizer.pad_token_id, -100)
        ignore = torch.full(prompt.shape[:2], -100, dtype=torch.long, device=prompt.device)
        embeds = self.opt_model.get_input_embeddings()(tokens.input_ids)
        attention = torch.cat([torch.ones_like(ignore), tokens.attention_mask], dim=1)
        return cat_in_dtype([prompt, embeds], embeds.dtype), attention, torch.cat([ignore, targets], dim=1)

    def llm_loss(self, prompt, texts):
        embeds, attention, targets = self.opt_inputs(prompt, [t + "\n" for t in texts])
        with self.maybe_autocast():
            return self.opt_model(inputs_embeds=embeds, attention_mask=attention, labels=targets, return_dict=True).loss

    def llm_qa_loss(self, prompt, questions, answers):
        texts = [f"{q} {a}\n" for q, a in zip(questions, answers)]
        embeds, attention, targets = self.opt_inputs(prompt, texts)
        question_lengths = self.opt_tokenizer(questions, return_tensors="pt", padding="longest").attention_mask.sum(1)
        positions = torch.arange(targets.size(1), device=targets.device)
        before_answer = positions[None, :] < prompt.size(1) + question_lengths.to(targets.device)[:, None]
        with self.maybe_autocast():
            return self.opt_model(
                inputs_embeds=embeds, attention_mask=attention, labels=targets.masked_fill(before_answer, -100),
                return_dict=True,
            ).loss

    @torch.no_grad()
    def generate(self, samples, num_beams=1, max_length=30, min_length=1, **kwargs):
        """OPT's reconstruction of ``samples["text_input"]`` from the P-Former prompt alone: list of str."""
        prompt = self.prompt(samples["text_input"])
        bos = self.opt_tokenizer([""] * prompt.size(0), return_tensors="pt").to(prompt.device)
        attention = torch.cat([torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device),
                               bos.attention_mask], dim=1)
        with self.maybe_autocast():
            out = self.opt_model.generate(
                input_ids=bos.input_ids, query_embeds=prompt.repeat_interleave(num_beams, 0).to(self.opt_model.dtype),
                attention_mask=attention, num_beams=num_beams, max_new_tokens=max_length, min_length=min_length,
                eos_token_id=self.eos_token_id, **kwargs,
            )
        texts = self.opt_tokenizer.batch_decode(out[:, bos.input_ids.shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]
