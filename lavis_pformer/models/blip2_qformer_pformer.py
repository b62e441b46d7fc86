"""Stage 1 (``blip2_qformer_pformer``): LAVIS BLIP-2 stage 1 (ITC + ITM + ITG) + alignment to the P-Former.

``loss_align = alignment_weight * MSE(llm_proj(query_output), P-Former prompt(caption))`` where
``query_output`` [B, Q, H_q] is the Q-Former's image-only query pass (the first ``Qformer.bert`` call of
``Blip2Qformer.forward``) and ``llm_proj = Linear(H_q, H_llm)`` is new and trainable. H_llm is the width
recorded in the P-Former checkpoint, so the same stage 1 serves an OPT and a T5 P-Former. The stage-1
checkpoint carries ``llm_proj`` into stage 2 (``opt_proj`` / ``t5_proj``).

Without a teacher (``alignment_weight: 0`` or built for inference) there is no ``llm_proj`` unless the
config gives ``llm_hidden_size`` (then it is created, frozen, and not trained), or a loaded checkpoint
holds one (``load_checkpoint`` then recreates it at the checkpoint's width).
"""
import logging
import os

import torch.nn as nn

from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

from lavis_pformer.backbones import BackboneMixin, hub_load_errors
from lavis_pformer.config_checks import as_int
from lavis_pformer.models.alignment import PFormerAlignmentMixin
from lavis_pformer.models.common import CONFIG_DIR, lavis_vit_qformer_kwargs, optional_int, optional_str, plugin_kwargs


@registry.register_model("blip2_qformer_pformer")
class Blip2QformerPFormer(PFormerAlignmentMixin, BackboneMixin, Blip2Qformer):
    """forward -> {"loss", "loss_itc", "loss_itm", "loss_lm", "loss_align"} (loss_align only with a teacher)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain": os.path.join(CONFIG_DIR, "blip2_qformer_pformer_pretrain.yaml"),
        "tiny": os.path.join(CONFIG_DIR, "blip2_qformer_pformer_tiny.yaml"),
    }
    compatible_archs = ("blip2", "blip2_feature_extractor")
    DEFAULT_ALIGNMENT_WEIGHT = 10.0

    def __init__(self, bert_model="bert-base-uncased", vit_config=None, alignment_weight=DEFAULT_ALIGNMENT_WEIGHT,
                 pformer_checkpoint=None, llm_hidden_size=None, llm_name=None, for_training=False,
                 cross_attention_freq=2, teacher_precision="fp32", **lavis_kwargs):
        self.set_backbones(bert_model=bert_model, vit_config=vit_config, cross_attention_freq=cross_attention_freq)
        super().__init__(cross_attention_freq=cross_attention_freq, **lavis_kwargs)
        teacher = self.setup_alignment(
            alignment_weight, pformer_checkpoint, num_query_token=self.query_tokens.shape[1],
            llm_hidden_size=llm_hidden_size, llm_name=llm_name, for_training=for_training,
            teacher_precision=teacher_precision,
        )
        width = teacher.llm_hidden_size if teacher is not None else llm_hidden_size
        self.llm_proj = None
        if width:
            self.llm_proj = nn.Linear(self.Qformer.config.hidden_size, width)
            if self.alignment_weight <= 0:
                # Not trained (and DDP must not wait for its gradient); stage 2 then starts its projection anew.
                self.llm_proj.requires_grad_(False)
                logging.info("alignment_weight is 0: llm_proj (width %d) is created but frozen", width)

    def alignment_source(self):
        return self.Qformer.bert  # first call in Blip2Qformer.forward: the image-only query pass

    def alignment_prediction(self, query_output):
        return self.llm_proj(query_output.last_hidden_state[:, : self.query_tokens.shape[1]])

    def lavis_loss_terms(self, output):
        return {"loss_itc": output.loss_itc, "loss_itm": output.loss_itm, "loss_lm": output.loss_lm}

    def adapt_state_dict(self, state_dict):
        """A checkpoint with ``llm_proj`` restores it even if this model was built without one."""
        weight = state_dict.get("llm_proj.weight")
        if self.llm_proj is None and weight is not None:
            self.llm_proj = nn.Linear(weight.shape[1], weight.shape[0]).to(self.query_tokens.device)
            logging.info("created llm_proj (width %d) for the checkpoint's weights", weight.shape[0])
        return state_dict

    @classmethod
    def from_config(cls, cfg, for_training=False):
        """Keys: Blip2Qformer's (vit_model, image_size, num_query_token, cross_attention_freq, drop_path_rate,
        use_grad_checkpoint, vit_precision, freeze_vit, max_txt_len, embed_dim) + bert_model, vit_config,
        alignment_weight (default 10), pformer_checkpoint, llm_hidden_size, llm_name (both optional: checked
        against the P-Former checkpoint when given), load_pretrained / pretrained, load_finetuned / finetuned.
        """
        with hub_load_errors(cfg):
            model = cls(
                embed_dim=as_int(cfg, "embed_dim", 256, minimum=1),
                llm_hidden_size=optional_int(cfg, "llm_hidden_size"),
                llm_name=optional_str(cfg, "llm_name"),
                **lavis_vit_qformer_kwargs(cfg),
                **plugin_kwargs(cls, cfg, for_training),
            )
        model.load_checkpoint_from_config(cfg)
        return model
