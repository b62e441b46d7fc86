"""Backbones chosen in the model config, by hub name or local directory.

LAVIS 1.0.2 hard-codes "bert-base-uncased" in ``Blip2Base.init_tokenizer`` / ``init_Qformer`` and only
knows ``eva_clip_g`` / ``clip_L`` in ``init_vision_encoder``. ``BackboneMixin`` overrides those three
methods (LAVIS's constructors call them on ``self``) so that the plugin's models honour:

- ``bert_model``: hub name or directory for the BERT tokenizer and the Q-Former's config/initial weights;
- ``cross_attention_freq``: the Q-Former's cross-attention every N-th layer, also in stage 2 (LAVIS's
  Blip2OPT / Blip2T5 always build it with 2);
- ``vit_model``: ``eva_clip_g`` / ``clip_L`` (LAVIS's own code) or ``custom_vit``, a ViT whose size is
  given by ``vit_config`` (patch_size, embed_dim, depth, num_heads, mlp_ratio, checkpoint);
- ``llm_precision``: dtype of the frozen LLM (``fp16`` as LAVIS; ``bf16``; ``fp32`` for CPU runs).

It only builds. The keys come read and checked from the model's ``from_config`` (:mod:`lavis_pformer.model_keys`;
what fits the ViT that ``vit_model`` names, ``vit_config``'s sizes, is checked by that ViT's builder here); what a
checkpoint holds and how it is loaded is :mod:`lavis_pformer.checkpoints`.
"""
import contextlib
import logging
import os
from functools import partial

import torch
import torch.nn as nn

from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
from lavis.models.eva_vit import VisionTransformer
from transformers import BertTokenizer

from lavis_pformer.checkpoints.files import load_state_dict_file
from lavis_pformer.errors import CheckpointError, ConfigError, MissingFileError, SetupError
from lavis_pformer.precision import DTYPES, LOW_PRECISION, cpu_autocast
from lavis_pformer.vit_weights import (LAVIS_VIT_FILES, OFFLINE_VARIABLES, lavis_vit_cache_file, lavis_vit_from_file,
                                       offline_mode, weights_fingerprint)


def bert_tokenizer(bert_model):
    """BERT tokenizer of ``bert_model`` with BLIP-2's extra ``[DEC]`` bos token."""
    tokenizer = BertTokenizer.from_pretrained(bert_model)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def custom_vit(img_size, vit_config, drop_path_rate=0.0, use_grad_checkpoint=False):
    """LAVIS's EVA ``VisionTransformer`` at the size given in ``vit_config``; random init or a local file.

    Output of ``forward``: [B, 1 + (img_size / patch_size)^2, embed_dim].
    """
    cfg = dict(vit_config or {})
    checkpoint = cfg.pop("checkpoint", None)
    allowed = {"patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"}
    unknown = set(cfg) - allowed
    if unknown:
        raise ConfigError(f"model.vit_config has unknown keys {sorted(unknown)}; allowed: {sorted(allowed | {'checkpoint'})}")
    vit = VisionTransformer(
        img_size=img_size, patch_size=cfg.get("patch_size", 16), embed_dim=cfg.get("embed_dim", 768),
        depth=cfg.get("depth", 12), num_heads=cfg.get("num_heads", 12), mlp_ratio=cfg.get("mlp_ratio", 4.0),
        qkv_bias=True, use_mean_pooling=False, drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_checkpoint=use_grad_checkpoint,
    )
    if checkpoint:
        state = load_state_dict_file(checkpoint, what="custom_vit weights (model.vit_config.checkpoint)")
        try:
            vit.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"model.vit_config.checkpoint {checkpoint} does not fit the ViT that model.vit_config and "
                f"model.image_size describe ({vit_config}, image_size {img_size}): {str(e).splitlines()[-1].strip()}. "
                "Set vit_config (patch_size, embed_dim, depth, num_heads, mlp_ratio) to the sizes the file was saved with."
            ) from None
    return vit


@contextlib.contextmanager
def sentencepiece_conversion_errors():
    """A clear SetupError when transformers 4.26 cannot convert a sentencepiece tokenizer (a T5 folder
    without tokenizer.json) because the installed protobuf is too new for its generated code."""
    try:
        yield
    except TypeError as e:
        if "Descriptors cannot be created directly" not in str(e):
            raise
        import google.protobuf

        raise SetupError(
            f"protobuf {google.protobuf.__version__} is too new for the sentencepiece tokenizer conversion of "
            "transformers 4.26 (needed for a T5 tokenizer folder without tokenizer.json): install the verified "
            "versions with `make install` (requirements-verified.txt pins protobuf==3.20.3), or "
            "`pip install protobuf==3.20.3`"
        ) from None


# What transformers says when a backbone name is neither a local folder nor a model it can fetch.
_HUB_LOAD_ERRORS = ("Can't load", "We couldn't connect", "is not a local folder and is not a valid model identifier",
                    "does not appear to have a file named", "Incorrect path_or_model_id")


@contextlib.contextmanager
def hub_load_errors(backbone_names):
    """A MissingFileError quoting ``backbone_names`` ({config key: value as given}: ``model_keys.backbone_names``)
    when transformers cannot load one of the backbones."""
    try:
        yield
    except OSError as e:
        if isinstance(e, MissingFileError) or not any(m in str(e) for m in _HUB_LOAD_ERRORS):
            raise
        named = ", ".join(f"model.{key}={value!r}" for key, value in backbone_names.items())
        raise MissingFileError(
            f"a backbone of the model config cannot be loaded ({named}): {str(e).splitlines()[0]} Give an existing "
            "local folder or a hub name; offline (HF_HUB_OFFLINE=1) only local folders and models already in the "
            "cache load."
        ) from None


class BackboneMixin:
    """Put before the LAVIS class: ``class Blip2OPTPFormer(BackboneMixin, Blip2OPT)``.

    Call ``self.set_backbones(...)`` before the LAVIS constructor runs.
    """

    def set_backbones(self, bert_model="bert-base-uncased", vit_config=None, cross_attention_freq=None):
        # Plain attributes set before nn.Module.__init__ (LAVIS's __init__ reads them via the overrides).
        object.__setattr__(self, "bert_model", bert_model)
        object.__setattr__(self, "vit_config", dict(vit_config or {}))
        object.__setattr__(self, "_cross_attention_freq", cross_attention_freq)

    def init_tokenizer(self):
        return bert_tokenizer(self.bert_model)

    def init_Qformer(self, num_query_token, vision_width, cross_attention_freq=None):
        """LAVIS's Q-Former from ``bert_model``; ``cross_attention_freq``: the caller's (Blip2Qformer passes its
        own), else the model's ``cross_attention_freq`` key (Blip2OPT / Blip2T5 pass none), else 2."""
        if cross_attention_freq is None:
            cross_attention_freq = getattr(self, "_cross_attention_freq", None) or 2
        config = BertConfig.from_pretrained(self.bert_model)
        config.encoder_width = vision_width
        config.add_cross_attention = True
        config.cross_attention_freq = cross_attention_freq
        config.query_length = num_query_token
        qformer = BertLMHeadModel.from_pretrained(self.bert_model, config=config)
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
        return qformer, query_tokens

    def init_vision_encoder(self, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        # Where the ViT's weights come from: LAVIS's pretrained ones, a file, or a random initialisation.
        self._vit_origin = {"vit_model": model_name, "checkpoint": None, "fingerprint": None}
        if model_name != "custom_vit":
            if model_name not in LAVIS_VIT_FILES:
                raise ConfigError(f"unknown model.vit_model '{model_name}': use eva_clip_g, clip_L or custom_vit")
            weights = self._lavis_vit_weights(model_name)
            if weights is None:  # LAVIS's download (or its cache)
                return Blip2Base.init_vision_encoder(model_name, img_size, drop_path_rate, use_grad_checkpoint,
                                                     precision)
            self._vit_origin["checkpoint"] = weights
            return lavis_vit_from_file(model_name, weights, img_size, drop_path_rate, use_grad_checkpoint, precision)
        vit = custom_vit(img_size, self.vit_config, drop_path_rate, use_grad_checkpoint)
        self._vit_origin["checkpoint"] = self.vit_config.get("checkpoint") or None
        self._vit_origin["fingerprint"] = weights_fingerprint(vit)  # as built, before any precision cast
        if precision == "fp16":
            vit = vit.half()
        return vit, LayerNorm(vit.num_features)

    OWN_PRECISION = ()  # prefixes of submodules whose precision is their own: it does not choose the autocast

    def maybe_autocast(self, dtype=torch.float16):
        """LAVIS: CUDA autocast on a GPU, nothing on the CPU, so that a model with fp16 / bf16 backbones cannot run
        on a CPU at all (fp32 images meet fp16 ViT weights). Here, on the CPU, the same sections run under CPU
        autocast with the same dtype (:func:`~lavis_pformer.precision.cpu_autocast`) when a backbone holds fp16 /
        bf16 weights: the closest check of the GPU precisions that a CPU allows. fp32 models on the CPU are
        unchanged (no autocast); GPUs: LAVIS's own."""
        if self.device.type != "cpu":
            return super().maybe_autocast(dtype)
        if any(p.dtype in LOW_PRECISION for n, p in self.named_parameters() if not n.startswith(self.OWN_PRECISION)):
            return cpu_autocast(dtype)
        return contextlib.nullcontext()

    def _lavis_vit_weights(self, model_name):
        """The local weights file of LAVIS's ``eva_clip_g`` / ``clip_L``: ``vit_config.checkpoint``; offline without
        it, LAVIS's cache file; None: let LAVIS download (online)."""
        extra = sorted(set(self.vit_config) - {"checkpoint"})
        if extra:
            raise ConfigError(
                f"model.vit_config {extra}: the size of {model_name} is fixed by LAVIS; with vit_model {model_name}, "
                "vit_config takes only `checkpoint` (a local copy of its weights). Use vit_model: custom_vit for a "
                "ViT of another size."
            )
        weights = self.vit_config.get("checkpoint") or None
        if weights is not None or not offline_mode():
            return weights
        cached = lavis_vit_cache_file(model_name)
        if os.path.isfile(cached):
            logging.info("offline: %s weights from LAVIS's cache %s", model_name, cached)
            return cached
        raise MissingFileError(
            f"model.vit_model {model_name}: LAVIS downloads its weights ({LAVIS_VIT_FILES[model_name]}), but this run "
            f"is offline ({' / '.join(OFFLINE_VARIABLES)}) and LAVIS's cache has no {cached}. Copy the file to the "
            f"node and set model.vit_config.checkpoint to it (e.g. --options model.vit_config.checkpoint="
            f"/models/{LAVIS_VIT_FILES[model_name]}), or place it at {cached}."
        )

    @staticmethod
    def cast_llm(llm, precision):
        """Cast the frozen LLM to ``llm_precision`` (LAVIS loads OPT in fp16 and T5 in bf16), a name of
        :data:`~lavis_pformer.precision.DTYPES` (``from_config`` checked it)."""
        return llm.to(DTYPES[precision])
