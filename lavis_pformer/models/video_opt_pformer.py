"""Video captioning on precomputed clip features with a frozen OPT (``video_opt_pformer``; paper Table 7, VATEX).

Clip features -> a Q-Former connector (Q query tokens cross-attending to the unmasked clips) -> ``opt_proj`` -> a
soft prompt the frozen OPT reads (:mod:`~lavis_pformer.models.frozen_opt`), plus the alignment loss of image stage 2
(:class:`~lavis_pformer.models.alignment.PFormerAlignmentMixin`). What it computes, what it trains and its samples:
docs/training.md (Video captioning).
"""
import logging
import os

import torch
import torch.nn as nn

from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm

from lavis_pformer.backbones import BackboneMixin, hub_load_errors
from lavis_pformer.checkpoints.loading import CheckpointMixin
from lavis_pformer.checkpoints.records import StageRecordsMixin
from lavis_pformer.errors import ConfigError, SetupError
from lavis_pformer.model_keys import (AlignmentKeys, as_float, as_int, as_precision, backbone_names, model_path,
                                      optional_str, starting_checkpoint)
from lavis_pformer.models.alignment import PFormerAlignmentMixin
from lavis_pformer.models.common import CONFIG_DIR
from lavis_pformer.models.frozen_opt import FrozenOPTMixin

FEATURES_KEY, MASK_KEY = "clip_features", "clip_mask"


class VideoOPT(FrozenOPTMixin, CheckpointMixin, BackboneMixin, Blip2Base):
    """The video captioner without the P-Former side: connector + projection + frozen OPT."""

    def __init__(self, bert_model="bert-base-uncased", num_query_token=32, cross_attention_freq=2, feat_dim=1024,
                 max_clips=32, opt_model="facebook/opt-2.7b", llm_precision="fp16", prompt="", max_txt_len=32,
                 lm_weight=1.0):
        self.set_backbones(bert_model=bert_model)
        super().__init__()
        self._llm_name = opt_model
        self.tokenizer = self.init_tokenizer()  # BERT tokenizer: the P-Former teacher reads captions with it
        self.feat_dim, self.max_clips, self.lm_weight = int(feat_dim), int(max_clips), float(lm_weight)

        self.ln_features = LayerNorm(self.feat_dim)
        self.clip_position = nn.Parameter(torch.zeros(1, self.max_clips, self.feat_dim))
        nn.init.trunc_normal_(self.clip_position, std=0.02)
        self.Qformer, self.query_tokens = self.init_Qformer(num_query_token, self.feat_dim, cross_attention_freq)
        # text-only parts of the Q-Former are unused (as in LAVIS's Blip2OPT)
        self.Qformer.cls = None
        self.Qformer.bert.embeddings.word_embeddings = None
        self.Qformer.bert.embeddings.position_embeddings = None
        for layer in self.Qformer.bert.encoder.layer:
            layer.output = None
            layer.intermediate = None

        self.setup_opt(opt_model, llm_precision, prompt, max_txt_len)
        self.opt_proj = nn.Linear(self.Qformer.config.hidden_size, self.opt_model.config.hidden_size)

    def clip_inputs(self, samples):
        """(features [B, T, feat_dim], mask [B, T] long) from the samples, checked."""
        if FEATURES_KEY not in samples:
            raise ConfigError(f"{type(self).__name__} reads samples['{FEATURES_KEY}'] (clip features [B, T, feat_dim]); "
                           f"got keys {sorted(samples)}. Use the video_features_caption dataset builder.")
        features = samples[FEATURES_KEY]
        if features.dim() != 3 or features.shape[-1] != self.feat_dim:
            raise ConfigError(f"{FEATURES_KEY} must be [B, T, {self.feat_dim}] (model.feat_dim), "
                             f"got {tuple(features.shape)}")
        if features.shape[1] > self.max_clips:
            raise ConfigError(f"{FEATURES_KEY} has {features.shape[1]} clips, more than model.max_clips="
                             f"{self.max_clips}; set the dataset's max_clips to at most the model's")
        mask = samples.get(MASK_KEY)
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        if mask.shape != features.shape[:2]:
            raise ValueError(f"{MASK_KEY} {tuple(mask.shape)} does not match {FEATURES_KEY} {tuple(features.shape)}")
        if not bool((mask.sum(1) > 0).all()):
            raise ValueError(f"{MASK_KEY}: every video needs at least one clip")
        return features, mask.long()

    def encode_video(self, features, mask):
        """Connector output [B, Q, H_q]: the query tokens after attending to the unmasked clips."""
        clips = self.ln_features(features) + self.clip_position[:, : features.shape[1]].to(features.dtype)
        output = self.Qformer.bert(
            query_embeds=self.query_tokens.expand(features.shape[0], -1, -1),
            encoder_hidden_states=clips, encoder_attention_mask=mask, return_dict=True,
        )
        return output.last_hidden_state

    def video_prompt(self, features, mask):
        """The soft prompt the OPT reads: opt_proj(connector output) [B, Q, H_llm]."""
        with self.maybe_autocast():
            return self.opt_proj(self.encode_video(features, mask))

    def forward(self, samples):
        """{"loss": captioning loss} ({"loss": None} when lm_weight is 0: only the prompt is computed)."""
        inputs_opt = self.video_prompt(*self.clip_inputs(samples))
        if self.lm_weight == 0:
            return {"loss": None}
        texts = samples["text_input"]
        return {"loss": self.caption_loss(inputs_opt, [texts] if isinstance(texts, str) else list(texts))}

    @torch.no_grad()
    def generate(self, samples, use_nucleus_sampling=False, num_beams=5, max_length=30, min_length=1, top_p=0.9,
                 repetition_penalty=1.0, length_penalty=1.0, num_captions=1, temperature=1):
        """Captions of the videos (``num_captions`` per video), as LAVIS's Blip2OPT.generate for images."""
        features, mask = self.clip_inputs(samples)
        prompt = samples.get("prompt", self.prompt) or ""
        return self.generate_after_prompt(
            self.video_prompt(features, mask), [prompt] * features.shape[0], self.llm_autocast(),
            num_beams=num_beams, do_sample=use_nucleus_sampling, num_captions=num_captions, top_p=top_p,
            temperature=temperature, max_new_tokens=max_length, min_length=min_length,
            repetition_penalty=repetition_penalty, length_penalty=length_penalty,
        )


@registry.register_model("video_opt_pformer")
class VideoOPTPFormer(PFormerAlignmentMixin, StageRecordsMixin, VideoOPT):
    """forward -> {"loss", "loss_lm", "loss_align"} (loss_align only with a teacher, loss_lm only if lm_weight > 0)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "vatex_opt2.7b": os.path.join(CONFIG_DIR, "video_opt_pformer_vatex_opt2.7b.yaml"),
        "tiny": os.path.join(CONFIG_DIR, "video_opt_pformer_tiny.yaml"),
    }
    # The captioning loss is trained with the prompt aligned as in image stage 2 (w2 = 100, docs/method.md).
    DEFAULT_ALIGNMENT_WEIGHT = 100.0
    LLM_KEY = "opt_model"
    VISION_WIDTH_KEY = "model.feat_dim"

    def __init__(self, alignment, for_training=False, **video_kwargs):
        """Arguments: the keys ``from_config`` read (``alignment``: :class:`~lavis_pformer.model_keys.AlignmentKeys`)."""
        super().__init__(**video_kwargs)
        self.setup_alignment(
            alignment, num_query_token=self.query_tokens.shape[1], llm_hidden_size=self.opt_model.config.hidden_size,
            llm_name=video_kwargs.get("opt_model", "facebook/opt-2.7b"), for_training=for_training,
        )
        if self.lm_weight == 0 and self.alignment_weight == 0:
            raise ConfigError("model.lm_weight and model.alignment_weight are both 0: nothing to train; set "
                             "lm_weight: 1 (captioning) and/or alignment_weight > 0 (alignment to the P-Former)")

    def alignment_source(self):
        return self.opt_proj

    def alignment_prediction(self, projected):
        return projected

    def lavis_loss_terms(self, output):
        return {} if output["loss"] is None else {"loss_lm": self.lm_weight * output["loss"]}

    def forward(self, samples):
        if self.lm_weight == 0 and self.pformer_teacher is None:
            raise SetupError(
                f"{type(self).__name__}: lm_weight is 0 and there is no P-Former teacher, so there is no loss. "
                "An alignment-only run needs model.alignment_weight > 0, model.pformer_checkpoint and run.task "
                "captioning_pformer (which builds the model for training)."
            )
        return super().forward(samples)

    @classmethod
    def from_config(cls, cfg, for_training=False):
        """Keys: bert_model, num_query_token (32), cross_attention_freq (2), feat_dim (1024), max_clips (32),
        opt_model, llm_precision (fp16), prompt (""), max_txt_len (32), lm_weight (1), alignment_weight (100),
        pformer_checkpoint, teacher_precision, load_pretrained / pretrained, load_finetuned / finetuned. All are read and checked
        here, before anything is built.
        """
        kwargs = dict(
            bert_model=model_path(cfg, "bert_model", "bert-base-uncased"),
            num_query_token=as_int(cfg, "num_query_token", 32, minimum=1),
            cross_attention_freq=as_int(cfg, "cross_attention_freq", 2, minimum=1),
            feat_dim=as_int(cfg, "feat_dim", 1024, minimum=1),
            max_clips=as_int(cfg, "max_clips", 32, minimum=1),
            opt_model=model_path(cfg, "opt_model", "facebook/opt-2.7b"),
            llm_precision=as_precision(cfg, "llm_precision", "fp16"),
            prompt=optional_str(cfg, "prompt") or "",
            max_txt_len=as_int(cfg, "max_txt_len", 32, minimum=2),
            lm_weight=as_float(cfg, "lm_weight", 1.0, minimum=0),
            alignment=AlignmentKeys(cfg, cls.DEFAULT_ALIGNMENT_WEIGHT),
            for_training=bool(for_training),
        )
        start, backbones = starting_checkpoint(cfg), backbone_names(cfg)
        with hub_load_errors(backbones):
            model = cls(**kwargs)
        model.load_starting_checkpoint(start)
        logging.info("%s: %d trainable parameters", cls.__name__,
                     sum(p.numel() for p in model.parameters() if p.requires_grad))
        return model
