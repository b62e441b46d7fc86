"""Stage 0, shared by OPT and T5: a P-Former trained on text alone against a frozen LLM.

Subclasses (``pformer_opt``, ``pformer_t5``) load the LLM and define ``llm_loss`` (reconstruction
through the prompt), ``llm_qa_loss``, ``llm_input_embeddings`` (the VQ codebook) and ``generate``.

Optional extension (off by default, not in the paper): ``qa_weight`` > 0 adds a text-only QA term. For
(caption, question, answer) records the frozen LLM reads ``[prompt(caption) ; "Question: q Short
answer:"]`` and is trained, through the prompt only, to produce the answer. No image is involved.
"""
import logging
import os

import torch

from lavis.models.blip2_models.blip2 import Blip2Base

from lavis_pformer.backbones import BackboneMixin, bert_tokenizer, hub_load_errors
from lavis_pformer.checkpoints.loading import CheckpointMixin
from lavis_pformer.errors import ConfigError
from lavis_pformer.losses import two_view_contrastive_loss, vq_commitment_loss
from lavis_pformer.model_keys import (as_bool, as_float, as_int, as_precision, backbone_names, model_path,
                                      starting_checkpoint)
from lavis_pformer.pformer import PFormer
from lavis_pformer.text import QA_PROMPT, mask_tokens

PFORMER_EXPORT_NAME = "pformer.pth"


class PFormerPretrain(CheckpointMixin, BackboneMixin, Blip2Base):
    """P-Former + frozen LLM.  forward -> {"loss", "loss_lm", "loss_c", "loss_vq"} (weighted terms)."""

    # Set by the OPT / T5 variant: the LLM's config key and the config defaults that differ between them.
    LLM_KEY = DEFAULT_LLM = DEFAULT_LLM_PRECISION = DEFAULT_MASK_PROB = DEFAULT_VQ_WEIGHT = None

    def __init__(self, bert_model, llm_name, num_query_token=32, max_txt_len=32, embed_dim=256,
                 mask_prob=0.25, lm_weight=1.0, contrastive_weight=1.0, vq_weight=1.0,
                 label_smoothing=0.1, vq_chunk_size=8192, qa_weight=0.0, qa_prompt=QA_PROMPT,
                 contrastive_key_grad=False, llm_train_mode=True):
        self.set_backbones(bert_model=bert_model)
        super().__init__()
        self.tokenizer = bert_tokenizer(bert_model)
        self.llm_name = llm_name
        self.num_query_token = num_query_token
        self.max_txt_len = max_txt_len
        self.mask_prob = mask_prob
        self.weights = {"lm": lm_weight, "c": contrastive_weight, "vq": vq_weight, "qa": qa_weight}
        self.qa_prompt = qa_prompt
        self.label_smoothing = label_smoothing
        self.vq_chunk_size = vq_chunk_size
        self.embed_dim = embed_dim
        self.contrastive_key_grad = bool(contrastive_key_grad)
        self.llm_train_mode = bool(llm_train_mode)

    def build_pformer(self, llm_hidden_size):
        """Called by subclasses once the LLM (and so its width) is known."""
        self.pformer = PFormer.from_bert(
            self.bert_model, self.num_query_token, llm_hidden_size, self.llm_name, embed_dim=self.embed_dim
        )

    @staticmethod
    def freeze(module):
        for p in module.parameters():
            p.requires_grad = False
        return module.eval()

    def train(self, mode=True):
        """LAVIS's runner calls model.train() every epoch. With ``llm_train_mode`` (default, as the reference
        implementation and stock BLIP-2 stage 2) the frozen LLM follows, so its dropout is active while the
        P-Former trains; with ``llm_train_mode: False`` it stays in eval mode (no dropout)."""
        super().train(mode)
        if not self.llm_train_mode:
            self.llm_module().eval()
        return self

    def llm_module(self):
        raise NotImplementedError

    def llm_input_embeddings(self):
        """[V, H_llm] frozen input-embedding matrix (the VQ codebook)."""
        return self.llm_module().get_input_embeddings().weight

    def llm_loss(self, prompt, texts):
        """Causal / seq2seq loss of reconstructing ``texts`` from ``prompt`` [B, Q, H_llm]."""
        raise NotImplementedError

    def llm_qa_loss(self, prompt, questions, answers):
        """Loss of the LLM answering ``qa_prompt.format(question)`` after ``prompt``, on the answer only."""
        raise NotImplementedError

    def tokenize(self, texts):
        return self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(self.device)

    def forward(self, samples):
        texts = samples["text_input"]
        tokens = self.tokenize(texts)
        # Two views of every sentence (independent maskings and dropout), one encoder pass for both.
        prob = self.mask_prob if self.training else 0.0
        ids = torch.cat([mask_tokens(tokens.input_ids, self.tokenizer, prob)
                         for _ in range(2)])
        out = self.pformer(ids, tokens.attention_mask.repeat(2, 1))
        batch = len(texts)
        prompt = out.prompt[:batch]

        losses = {"loss_lm": self.weights["lm"] * self.llm_loss(prompt, texts)}
        if self.weights["c"] > 0:
            losses["loss_c"] = self.weights["c"] * two_view_contrastive_loss(
                out.text_feat[:batch], out.text_feat[batch:], self.pformer.temperature(), self.label_smoothing,
                key_grad=self.contrastive_key_grad,
            )
        if self.weights["vq"] > 0:
            losses["loss_vq"] = self.weights["vq"] * vq_commitment_loss(
                prompt, self.llm_input_embeddings(), chunk_size=self.vq_chunk_size
            )
        if self.weights["qa"] > 0:
            if "question" not in samples or "answer" not in samples:
                raise ConfigError(
                    "qa_weight > 0 needs (caption, question, answer) records: point the sentence_corpus at a "
                    'JSON-lines file whose records have "caption", "question" and "answer" (e.g. the demo\'s '
                    "qa_triples.jsonl), or set qa_weight: 0"
                )
            questions = [self.qa_prompt.format(q) for q in samples["question"]]
            losses["loss_qa"] = self.weights["qa"] * self.llm_qa_loss(prompt, questions, samples["answer"])
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def prompt(self, texts):
        """The P-Former prompt of ``texts`` (no masking): [B, Q, H_llm]."""
        tokens = self.tokenize(texts)
        return self.pformer(tokens.input_ids, tokens.attention_mask).prompt

    def export_checkpoint(self, output_dir):
        """Write the P-Former alone (+ metadata) for stages 1 and 2; the runner calls it at each save."""
        path = os.path.join(output_dir, PFORMER_EXPORT_NAME)
        self.pformer.save(path)
        return path

    @classmethod
    def from_config(cls, cfg):
        """Keys: ``LLM_KEY`` (opt_model / t5_model), llm_precision, mask_prob, vq_weight (defaults of the OPT / T5
        variant), those of :meth:`common_kwargs`, load_pretrained / pretrained, load_finetuned / finetuned. All are
        read and checked here, before anything is built."""
        kwargs = dict(
            **{cls.LLM_KEY: model_path(cfg, cls.LLM_KEY, cls.DEFAULT_LLM)},
            llm_precision=as_precision(cfg, "llm_precision", cls.DEFAULT_LLM_PRECISION),
            mask_prob=as_float(cfg, "mask_prob", cls.DEFAULT_MASK_PROB, minimum=0),
            vq_weight=as_float(cfg, "vq_weight", cls.DEFAULT_VQ_WEIGHT, minimum=0),
            **cls.common_kwargs(cfg),
        )
        start, backbones = starting_checkpoint(cfg), backbone_names(cfg)
        with hub_load_errors(backbones):
            model = cls(**kwargs)
        return model.finish_from_config(start)

    @classmethod
    def common_kwargs(cls, cfg):
        """Config keys shared by the OPT and T5 variants, type-checked."""
        return dict(
            bert_model=model_path(cfg, "bert_model", "bert-base-uncased"),
            num_query_token=as_int(cfg, "num_query_token", 32, minimum=1),
            max_txt_len=as_int(cfg, "max_txt_len", 32, minimum=2),
            embed_dim=as_int(cfg, "embed_dim", 256, minimum=1),
            lm_weight=as_float(cfg, "lm_weight", 1.0, minimum=0),
            contrastive_weight=as_float(cfg, "contrastive_weight", 1.0, minimum=0),
            label_smoothing=as_float(cfg, "label_smoothing", 0.1, minimum=0),
            vq_chunk_size=as_int(cfg, "vq_chunk_size", 8192, minimum=1),
            qa_weight=as_float(cfg, "qa_weight", 0.0, minimum=0),
            qa_prompt=cfg.get("qa_prompt", QA_PROMPT),
            contrastive_key_grad=as_bool(cfg, "contrastive_key_grad", False),
            llm_train_mode=as_bool(cfg, "llm_train_mode", True),
        )

    def finish_from_config(self, start):
        """Load ``start`` (the :class:`~lavis_pformer.model_keys.StartingCheckpoint` ``from_config`` read, or None)."""
        self.load_starting_checkpoint(start)
        logging.info(
            "P-Former stage 0: Q=%d, LLM %s, weights %s, mask_prob %.2f, LLM in %s mode while training, "
            "contrastive gradient through %s",
            self.num_query_token, self.llm_name, self.weights, self.mask_prob,
            "train" if self.llm_train_mode else "eval", "rows and gathered columns" if self.contrastive_key_grad
            else "rows only",
        )
        return self
