"""Stage 2, shared by OPT and T5: what ``blip2_opt_pformer`` and ``blip2_t5_pformer`` add to LAVIS's models.

``lm_weight`` scales LAVIS's LM loss, the prompt is kept concatenable for every LLM precision, and one
``from_config`` reads the config of both. ``<llm>_proj`` starts from stage 1's ``llm_proj``
(:mod:`~lavis_pformer.checkpoints.stages`).
"""
import torch

from lavis_pformer.backbones import hub_load_errors
from lavis_pformer.errors import ConfigError, SetupError
from lavis_pformer.model_keys import (as_bool, as_float, as_precision, backbone_names, lavis_vit_qformer_kwargs,
                                      model_path, plugin_kwargs, starting_checkpoint)
from lavis_pformer.precision import LOW_PRECISION


class Stage2Mixin:
    """Shared by the OPT and T5 stage-2 models: the frozen LLM's set-up, ``lm_weight`` and the prompt's dtype.

    ``lm_weight`` (default 1) scales LAVIS's LM loss; ``lm_weight: 0`` trains on the alignment loss alone
    (the reference's alignment-only stage 2): the LLM is then not run in ``forward``.
    """

    PROJ = None  # "opt_proj" / "t5_proj" (Stage2CheckpointMixin renames stage 1's llm_proj to it)
    LLM_KEY = None  # "opt_model" / "t5_model": the config key and attribute of the LLM
    DEFAULT_LLM = None  # the LLM when the config names none
    DEFAULT_LLM_PRECISION = None  # llm_precision when the config gives none
    # The autocast dtype under which LAVIS's forward concatenates the prompt with the LLM's token embeddings:
    # None when it is the prompt's own context (Blip2OPT), bfloat16 for Blip2T5 (inside maybe_autocast(bf16)).
    CONCAT_AUTOCAST_DTYPE = None

    def setup_stage2(self, llm_name, llm_precision, alignment, for_training, lm_weight):
        """After LAVIS's constructor: the frozen LLM cast to ``llm_precision`` and left out of checkpoints, the
        alignment to the P-Former (``alignment``: :class:`~lavis_pformer.model_keys.AlignmentKeys`), ``lm_weight``
        and the prompt's dtype."""
        self._llm_name = llm_name
        llm = self.cast_llm(getattr(self, self.LLM_KEY), llm_precision)
        setattr(self, self.LLM_KEY, llm)
        self.exclude_from_checkpoint(self.LLM_KEY + ".")
        self.setup_alignment(
            alignment, num_query_token=self.query_tokens.shape[1], llm_hidden_size=llm.config.hidden_size,
            llm_name=llm_name, for_training=for_training,
        )
        self.setup_lm_weight(lm_weight)
        self.setup_prompt_dtype()

    def setup_prompt_dtype(self):
        """Make LAVIS's ``torch.cat([prompt, token embeddings])`` work for every LLM precision under autocast.

        Autocast refuses to concatenate tensors of two different low precisions ("Unexpected floating
        ScalarType in at::autocast::prioritize"): LAVIS's Blip2OPT meets it with a bf16 OPT under run.amp (the
        prompt is fp16), LAVIS's Blip2T5 with its default bf16 T5 under run.amp, and with an fp16 T5 (its
        concatenation runs under bf16 autocast). A hook on the projection returns the prompt in fp32 in those
        cases (autocast then concatenates in fp32 and the LLM's layers cast as usual); the default pairing
        (fp16 OPT, fp16 prompt) is left exactly as LAVIS runs it.
        """
        getattr(self, self.PROJ).register_forward_hook(self._prompt_for_concat)

    def _prompt_for_concat(self, module, inputs, prompt):
        if prompt.dtype not in LOW_PRECISION:
            return None
        embedding = getattr(self, self.LLM_KEY).get_input_embeddings().weight.dtype
        if prompt.dtype == embedding and self.CONCAT_AUTOCAST_DTYPE in (None, embedding):
            return None
        return prompt.float()

    def setup_lm_weight(self, lm_weight):
        """Call after ``setup_alignment``."""
        self.lm_weight = float(lm_weight)
        if self.lm_weight < 0:
            raise ConfigError(f"model.lm_weight must be >= 0, got {self.lm_weight:g}")
        if self.lm_weight == 0 and self.alignment_weight == 0:
            raise ConfigError("model.lm_weight and model.alignment_weight are both 0: nothing to train; set "
                             "lm_weight: 1 (LM loss) and/or alignment_weight > 0 (alignment to the P-Former)")

    def alignment_source(self):
        return getattr(self, self.PROJ)

    def alignment_prediction(self, projected):
        return projected

    def lavis_loss_terms(self, output):
        return {} if output["loss"] is None else {"loss_lm": self.lm_weight * output["loss"]}

    def project_queries(self, image_embeds):
        """``<llm>_proj`` of the Q-Former's query output over ``image_embeds`` [B, Q, H_llm]."""
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image_embeds.device)
        query_output = self.Qformer.bert(
            query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, return_dict=True,
        )
        return getattr(self, self.PROJ)(query_output.last_hidden_state)

    def projected_queries(self, image):
        """``<llm>_proj(query_output)`` [B, Q, H_llm] computed as LAVIS's stage-2 ``forward`` computes it (the ViT
        under ``maybe_autocast``, the Q-Former and projection outside), without the LLM."""
        with self.maybe_autocast():
            image_embeds = self.ln_vision(self.visual_encoder(image))
        return self.project_queries(image_embeds)

    def image_prompt(self, image):
        """The soft prompt the LLM reads for ``image`` [B, 3, H, W], computed as LAVIS's ``generate`` computes it
        (all under ``maybe_autocast``) [B, Q, H_llm]."""
        with self.maybe_autocast():
            return self.project_queries(self.ln_vision(self.visual_encoder(image)))

    def forward(self, samples):
        """LAVIS's forward ({"loss": LM loss}); with ``lm_weight`` 0 only the projected queries are computed
        (the alignment hook reads them) and the result is {"loss": None}."""
        if self.lm_weight > 0:
            return super().forward(samples)
        if getattr(self, "pformer_teacher", None) is None:
            raise SetupError(
                f"{type(self).__name__}: lm_weight is 0 and there is no P-Former teacher, so there is no loss. "
                "An alignment-only stage 2 needs model.alignment_weight > 0, model.pformer_checkpoint and run.task "
                "image_text_pretrain_pformer or captioning_pformer (which build the model for training)."
            )
        self.projected_queries(samples["image"])
        return {"loss": None}

    def _check_inference_method(self, inference_method):
        if inference_method != "generate":
            raise ConfigError(
                f"{type(self).__name__}.predict_answers supports inference_method 'generate' only, got "
                f"{inference_method!r}; set run.inference_method: generate"
            )

    @classmethod
    def from_config(cls, cfg, for_training=False):
        """Keys: those of LAVIS's Blip2OPT / Blip2T5 (vit_model, image_size, num_query_token, opt_model /
        t5_model, drop_path_rate, use_grad_checkpoint, vit_precision, freeze_vit, prompt, max_txt_len) +
        apply_lemmatizer, cross_attention_freq (2, as LAVIS; must be the value of the stage-1 checkpoint it starts
        from), bert_model, vit_config, llm_precision (fp16 for OPT, bf16 for T5), alignment_weight (default 100),
        lm_weight (default 1; 0 = alignment only), pformer_checkpoint, load_pretrained / pretrained (a stage-1
        checkpoint), load_finetuned / finetuned. All are read and checked here, before anything is built.
        """
        kwargs = dict(
            **{cls.LLM_KEY: model_path(cfg, cls.LLM_KEY, cls.DEFAULT_LLM)},
            lm_weight=as_float(cfg, "lm_weight", 1.0, minimum=0),
            prompt=cfg.get("prompt", "") or "",
            llm_precision=as_precision(cfg, "llm_precision", cls.DEFAULT_LLM_PRECISION),
            apply_lemmatizer=as_bool(cfg, "apply_lemmatizer", False),
            **lavis_vit_qformer_kwargs(cfg),
            **plugin_kwargs(cls, cfg, for_training),
        )
        start, backbones = starting_checkpoint(cfg), backbone_names(cfg)
        with hub_load_errors(backbones):
            model = cls(**kwargs)
        model.load_starting_checkpoint(start)
        return model
