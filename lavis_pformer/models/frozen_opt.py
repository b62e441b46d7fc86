"""Soft prompt -> frozen OPT, shared by the image (``blip2_opt_pformer``) and video (``video_opt_pformer``) models.

A soft prompt [B, Q, H_opt] is put before the OPT's token embeddings: :meth:`FrozenOPTMixin.caption_loss` is
the causal LM loss of the captions that follow it, :meth:`FrozenOPTMixin.generate_after_prompt` the texts the
OPT continues after it and a text prompt. The set-up, loss and generation are those of LAVIS's ``Blip2OPT``;
the image model keeps LAVIS's own ``__init__``, ``forward`` and ``generate`` and uses this module for VQA.
"""
import torch
from transformers import AutoTokenizer

from lavis.models.blip2_models.modeling_opt import OPTForCausalLM

from lavis_pformer.precision import DTYPES, cat_in_dtype


class FrozenOPTMixin:
    """Needs ``opt_model``, ``opt_tokenizer`` and ``eos_token_id`` (set by :meth:`setup_opt` or LAVIS's Blip2OPT)."""

    def setup_opt(self, opt_model, llm_precision, prompt, max_txt_len):
        """The frozen OPT (in ``llm_precision``, a name of :data:`~lavis_pformer.precision.DTYPES`), its tokenizer
        and the caption prompt, as LAVIS's ``Blip2OPT.__init__`` sets them up; the OPT is left out of checkpoints."""
        self.opt_tokenizer = AutoTokenizer.from_pretrained(opt_model, use_fast=False)
        self.opt_model = OPTForCausalLM.from_pretrained(opt_model, torch_dtype=DTYPES[llm_precision])
        for param in self.opt_model.parameters():
            param.requires_grad = False
        self.exclude_from_checkpoint("opt_model.")
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]
        self.max_txt_len = max_txt_len
        self.prompt = prompt or ""
        self.prompt_length = int(self.opt_tokenizer(self.prompt, return_tensors="pt").attention_mask.sum())

    def llm_autocast(self):
        """Autocast to the OPT's own low precision (fp16 for an fp32 OPT)."""
        dtype = self.opt_model.dtype
        return self.maybe_autocast(dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16)

    def caption_loss(self, inputs_opt, texts):
        """Causal LM loss of ``text + "\\n"`` after the soft prompt (prompt, padding and the prefix ignored)."""
        device = inputs_opt.device
        self.opt_tokenizer.padding_side = "right"
        tokens = self.opt_tokenizer([t + "\n" for t in texts], return_tensors="pt", padding="longest",
                                    truncation=True, max_length=self.max_txt_len).to(device)
        targets = tokens.input_ids.masked_fill(tokens.input_ids == self.opt_tokenizer.pad_token_id, -100)
        if self.prompt:
            targets[:, : self.prompt_length] = -100
        prefix_len = inputs_opt.shape[1]
        targets = torch.cat([targets.new_full((targets.shape[0], prefix_len), -100), targets], dim=1)
        embeds = self.opt_model.get_input_embeddings()(tokens.input_ids)
        inputs_embeds = cat_in_dtype([inputs_opt, embeds], embeds.dtype)
        attention_mask = torch.cat([tokens.attention_mask.new_ones(inputs_opt.shape[:2]), tokens.attention_mask], 1)
        with self.llm_autocast():
            out = self.opt_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=targets,
                                 return_dict=True)
        return out.loss

    def generate_after_prompt(self, inputs_opt, texts, autocast, num_beams=5, do_sample=False, num_captions=1,
                              **generate_kwargs):
        """What the OPT writes after [soft prompt ; text] for each text, stripped (``num_captions`` per text).

        The texts are padded on the left, so every one ends right before what is generated, and never truncated
        (``max_txt_len`` bounds training captions only). Beam search by default; ``do_sample`` samples
        ``num_captions`` sequences with one beam. ``generate_kwargs`` go to the OPT's ``generate``.
        """
        try:
            self.opt_tokenizer.padding_side = "left"
            tokens = self.opt_tokenizer(list(texts), return_tensors="pt", padding="longest").to(inputs_opt.device)
        finally:
            self.opt_tokenizer.padding_side = "right"
        attention_mask = torch.cat([tokens.attention_mask.new_ones(inputs_opt.shape[:2]), tokens.attention_mask], 1)
        if do_sample:
            num_beams = 1
        query_embeds = inputs_opt.repeat_interleave(num_captions if do_sample else num_beams, dim=0)
        with autocast:
            outputs = self.opt_model.generate(
                input_ids=tokens.input_ids, query_embeds=query_embeds.to(self.opt_model.dtype),
                attention_mask=attention_mask, do_sample=do_sample, num_beams=num_beams,
                num_return_sequences=num_captions, eos_token_id=self.eos_token_id, **generate_kwargs,
            )
        generated = self.opt_tokenizer.batch_decode(outputs[:, tokens.input_ids.shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in generated]
