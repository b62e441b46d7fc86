"""Stage 2, shared by OPT and T5: what ``blip2_opt_pformer`` and ``blip2_t5_pformer`` add to LAVIS's models.

``<llm>_proj`` starts from stage 1's ``llm_proj`` (the stage-1-only tensors are dropped, as LAVIS does),
``lm_weight`` scales LAVIS's LM loss, and one ``from_config`` reads the config of both.
"""
import logging
import re

import torch

from lavis_pformer.backbones import hub_load_errors
from lavis_pformer.config_checks import as_bool, as_float
from lavis_pformer.errors import CheckpointError, ConfigError, SetupError
from lavis_pformer.models.common import lavis_vit_qformer_kwargs, plugin_kwargs
from lavis_pformer.paths import resolve_model_path
from lavis_pformer.precision import LOW_PRECISION

# Tensors of a stage-1 checkpoint that stage 2 has no place for (LAVIS drops them with strict=False): the
# ITC / ITM / ITG heads, the Q-Former's text embeddings and the text-side feed-forward of every layer.
STAGE1_ONLY_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.", "Qformer.cls.",
                        "Qformer.bert.embeddings.word_embeddings.", "Qformer.bert.embeddings.position_embeddings.")
STAGE1_ONLY_KEYS = ("temp",)
_TEXT_FFN = re.compile(r"^Qformer\.bert\.encoder\.layer\.\d+\.(output|intermediate)\.")


def is_stage1_only(key):
    return key.startswith(STAGE1_ONLY_PREFIXES) or key in STAGE1_ONLY_KEYS or bool(_TEXT_FFN.match(key))


class Stage2Mixin:
    """Shared by the OPT and T5 stage-2 models: ``<llm>_proj`` from stage 1's ``llm_proj``, and ``lm_weight``.

    ``lm_weight`` (default 1) scales LAVIS's LM loss; ``lm_weight: 0`` trains on the alignment loss alone
    (the reference's alignment-only stage 2): the LLM is then not run in ``forward``.
    """

    PROJ = None  # "opt_proj" / "t5_proj"
    LLM_KEY = None  # "opt_model" / "t5_model": the config key and attribute of the LLM
    DEFAULT_LLM = None  # the LLM when the config names none
    DEFAULT_LLM_PRECISION = None  # llm_precision when the config gives none
    # The autocast dtype under which LAVIS's forward concatenates the prompt with the LLM's token embeddings:
    # None when it is the prompt's own context (Blip2OPT), bfloat16 for Blip2T5 (inside maybe_autocast(bf16)).
    CONCAT_AUTOCAST_DTYPE = None

    def setup_stage2(self, llm_name, llm_precision, alignment_weight, pformer_checkpoint, for_training, lm_weight,
                     teacher_precision="fp32"):
        """After LAVIS's constructor: the frozen LLM cast to ``llm_precision`` and left out of checkpoints, the
        alignment to the P-Former, ``lm_weight`` and the prompt's dtype."""
        self._llm_name = llm_name
        llm = self.cast_llm(getattr(self, self.LLM_KEY), llm_precision)
        setattr(self, self.LLM_KEY, llm)
        self.exclude_from_checkpoint(self.LLM_KEY + ".")
        self.setup_alignment(
            alignment_weight, pformer_checkpoint, num_query_token=self.query_tokens.shape[1],
            llm_hidden_size=llm.config.hidden_size, llm_name=llm_name, for_training=for_training,
            teacher_precision=teacher_precision,
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

    def adapt_state_dict(self, state_dict):
        """A stage-1 checkpoint: ``llm_proj.*`` becomes ``<llm>_proj.*`` and its stage-1-only tensors are
        dropped; anything else it holds must fit this model (``load_checkpoint`` refuses the rest)."""
        if f"{self.PROJ}.weight" in state_dict:
            return state_dict  # a stage-2 checkpoint
        proj = getattr(self, self.PROJ)
        if "llm_proj.weight" in state_dict:
            width = state_dict["llm_proj.weight"].shape[0]
            if width != proj.out_features:
                raise CheckpointError(
                    f"the stage-1 checkpoint's llm_proj has width {width} but this model's LLM needs "
                    f"{proj.out_features}: stage 1 was trained with a P-Former for another LLM"
                )
        own = set(self.state_dict())
        adapted, dropped = {}, []
        for key, value in state_dict.items():
            if key.startswith("llm_proj."):
                adapted[self.PROJ + key[len("llm_proj"):]] = value
            elif key not in own and is_stage1_only(key):
                dropped.append(key)
            else:
                adapted[key] = value
        if dropped:
            logging.info("stage-1 checkpoint: %s; %d stage-1-only tensors (ITC/ITM/ITG heads, text embeddings and "
                         "text feed-forward layers) dropped, as LAVIS does",
                         f"llm_proj -> {self.PROJ}" if "llm_proj.weight" in state_dict else "no llm_proj",
                         len(dropped))
        return adapted

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
        checkpoint), load_finetuned / finetuned.
        """
        with hub_load_errors(cfg):
            model = cls(
                **{cls.LLM_KEY: resolve_model_path(cfg.get(cls.LLM_KEY, cls.DEFAULT_LLM), f"model.{cls.LLM_KEY}")},
                lm_weight=as_float(cfg, "lm_weight", 1.0, minimum=0),
                prompt=cfg.get("prompt", "") or "",
                llm_precision=cfg.get("llm_precision", cls.DEFAULT_LLM_PRECISION),
                apply_lemmatizer=as_bool(cfg, "apply_lemmatizer", False),
                **lavis_vit_qformer_kwargs(cfg),
                **plugin_kwargs(cls, cfg, for_training),
            )
        model.load_checkpoint_from_config(cfg)
        return model
