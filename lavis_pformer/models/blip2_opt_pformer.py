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

Adds what LAVIS 1.0.2's Blip2OPT lacks for zero-shot VQA: ``predict_answers`` and ``apply_lemmatizer``.
"""
import logging
import os
import re

import torch

from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_opt import Blip2OPT

from lavis_pformer.backbones import BackboneMixin, hub_load_errors
from lavis_pformer.precision import LOW_PRECISION
from lavis_pformer.config_checks import as_bool, as_float
from lavis_pformer.errors import CheckpointError, ConfigError, SetupError
from lavis_pformer.models.alignment import LemmatizerMixin, PFormerAlignmentMixin
from lavis_pformer.models.common import CONFIG_DIR, lavis_vit_qformer_kwargs, plugin_kwargs
from lavis_pformer.paths import resolve_model_path

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
    # The autocast dtype under which LAVIS's forward concatenates the prompt with the LLM's token embeddings:
    # None when it is the prompt's own context (Blip2OPT), bfloat16 for Blip2T5 (inside maybe_autocast(bf16)).
    CONCAT_AUTOCAST_DTYPE = None

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

    def projected_queries(self, image):
        """``<llm>_proj(query_output)`` [B, Q, H_llm] computed as LAVIS's stage-2 ``forward`` computes it (the ViT
        under ``maybe_autocast``, the Q-Former and projection outside), without the LLM."""
        with self.maybe_autocast():
            image_embeds = self.ln_vision(self.visual_encoder(image))
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
        query_output = self.Qformer.bert(
            query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, return_dict=True,
        )
        return getattr(self, self.PROJ)(query_output.last_hidden_state)

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


@registry.register_model("blip2_opt_pformer")
class Blip2OPTPFormer(PFormerAlignmentMixin, Stage2Mixin, LemmatizerMixin, BackboneMixin, Blip2OPT):
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

    def __init__(self, bert_model="bert-base-uncased", vit_config=None, llm_precision="fp16",
                 alignment_weight=DEFAULT_ALIGNMENT_WEIGHT, pformer_checkpoint=None, apply_lemmatizer=False,
                 for_training=False, lm_weight=1.0, cross_attention_freq=2, **lavis_kwargs):
        self.set_backbones(bert_model=bert_model, vit_config=vit_config, cross_attention_freq=cross_attention_freq)
        super().__init__(**lavis_kwargs)
        self._llm_name = lavis_kwargs.get("opt_model", "facebook/opt-2.7b")
        self.opt_model = self.cast_llm(self.opt_model, llm_precision)
        self.exclude_from_checkpoint("opt_model.")
        self._apply_lemmatizer = apply_lemmatizer
        self._lemmatizer = None
        self.setup_alignment(
            alignment_weight, pformer_checkpoint, num_query_token=self.query_tokens.shape[1],
            llm_hidden_size=self.opt_model.config.hidden_size,
            llm_name=lavis_kwargs.get("opt_model", "facebook/opt-2.7b"), for_training=for_training,
        )
        self.setup_lm_weight(lm_weight)
        self.setup_prompt_dtype()

    def image_prompt(self, image):
        """The soft prompt OPT reads for ``image`` [B, 3, H, W]: opt_proj(query output) [B, Q, H_opt]."""
        with self.maybe_autocast():
            image_embeds = self.ln_vision(self.visual_encoder(image))
            image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
            query_output = self.Qformer.bert(
                query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
                encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, return_dict=True,
            )
            return self.opt_proj(query_output.last_hidden_state)

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
        inputs_opt = self.image_prompt(image)
        try:
            # Decoder-only generation: pad on the left so every prompt ends right before the answer. Never
            # truncated (max_txt_len bounds training captions only): a long question would lose "Short answer:".
            self.opt_tokenizer.padding_side = "left"
            tokens = self.opt_tokenizer(texts, return_tensors="pt", padding="longest").to(image.device)
        finally:
            self.opt_tokenizer.padding_side = "right"
        attention_mask = torch.cat(
            [torch.ones(inputs_opt.shape[:2], dtype=torch.long, device=image.device), tokens.attention_mask], dim=1
        )
        with self.maybe_autocast():
            outputs = self.opt_model.generate(
                input_ids=tokens.input_ids,
                query_embeds=inputs_opt.repeat_interleave(num_beams, dim=0).to(self.opt_model.dtype),
                attention_mask=attention_mask, do_sample=False, num_beams=num_beams, max_new_tokens=max_len,
                min_length=min_len, eos_token_id=self.eos_token_id, length_penalty=length_penalty,
            )
        answers = self.opt_tokenizer.batch_decode(outputs[:, tokens.input_ids.shape[1]:], skip_special_tokens=True)
        answers = [a.strip() for a in answers]
        if self._apply_lemmatizer:
            answers = self._lemmatize(answers)
        return answers

    @classmethod
    def from_config(cls, cfg, for_training=False):
        """Keys: Blip2OPT's (vit_model, image_size, num_query_token, opt_model, drop_path_rate,
        use_grad_checkpoint, vit_precision, freeze_vit, prompt, max_txt_len) + cross_attention_freq (2, as
        LAVIS; must be the value of the stage-1 checkpoint it starts from), bert_model, vit_config,
        llm_precision (fp16), alignment_weight (default 100), lm_weight (default 1; 0 = alignment only),
        pformer_checkpoint, apply_lemmatizer, load_pretrained / pretrained (a stage-1 checkpoint),
        load_finetuned / finetuned.
        """
        with hub_load_errors(cfg):
            model = cls(
                opt_model=resolve_model_path(cfg.get("opt_model", "facebook/opt-2.7b"), "model.opt_model"),
                lm_weight=as_float(cfg, "lm_weight", 1.0, minimum=0),
                prompt=cfg.get("prompt", "") or "",
                llm_precision=cfg.get("llm_precision", "fp16"),
                apply_lemmatizer=as_bool(cfg, "apply_lemmatizer", False),
                **lavis_vit_qformer_kwargs(cfg),
                **plugin_kwargs(cls, cfg, for_training),
            )
        model.load_checkpoint_from_config(cfg)
        return model
