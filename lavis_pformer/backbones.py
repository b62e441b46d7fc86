"""Backbones chosen in the model config, by hub name or local directory.

LAVIS 1.0.2 hard-codes "bert-base-uncased" in ``Blip2Base.init_tokenizer`` / ``init_Qformer`` and only
knows ``eva_clip_g`` / ``clip_L`` in ``init_vision_encoder``. ``BackboneMixin`` overrides those three
methods (LAVIS's constructors call them on ``self``) so that the plugin's models honour:

- ``bert_model``: hub name or directory for the BERT tokenizer and the Q-Former's config/initial weights;
- ``cross_attention_freq``: the Q-Former's cross-attention every N-th layer, also in stage 2 (LAVIS's
  Blip2OPT / Blip2T5 always build it with 2);
- ``vit_model``: ``eva_clip_g`` / ``clip_L`` (LAVIS's own code) or ``custom_vit``, a ViT whose size is
  given by ``vit_config`` (patch_size, embed_dim, depth, num_heads, mlp_ratio, checkpoint);
- ``llm_precision``: dtype of the frozen LLM (``fp16`` as LAVIS; ``bf16``; ``fp32`` for CPU runs);

and loads checkpoints safely: ``torch.load(weights_only=True)``, ``load_pretrained: False`` to start
from the backbones alone. A checkpoint tensor that has no place in the model (beyond the stage-1-only
heads a subclass's ``adapt_state_dict`` drops, as LAVIS does) is an error that names the config key to
fix, never a warning: loading must not silently drop trained weights. Missing trainable tensors are a
WARNING when starting from an earlier stage (they start anew) and an error for ``finetuned``.
"""
import contextlib
import logging
import os
from functools import partial

import torch
import torch.nn as nn

from lavis.common.utils import is_url
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
from lavis.models.eva_vit import VisionTransformer
from transformers import BertTokenizer

from lavis_pformer.checkpoint_files import (CROSS_ATTENTION, EXTRA_STATE_KEY, QFORMER_LAYER, checkpoint_arch,
                                            cross_attention_freq_of, cross_attention_layers, load_state_dict_file,
                                            read_checkpoint)
from lavis_pformer.errors import CheckpointError, ConfigError, MissingFileError, SetupError
from lavis_pformer.precision import LOW_PRECISION, cpu_autocast
from lavis_pformer.vit_weights import (LAVIS_VIT_FILES, OFFLINE_VARIABLES, lavis_vit_cache_file, lavis_vit_from_file,
                                       offline_mode, weights_fingerprint)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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
BACKBONE_KEYS = ("bert_model", "opt_model", "t5_model")


@contextlib.contextmanager
def hub_load_errors(cfg):
    """A MissingFileError naming the backbone keys of ``cfg`` when transformers cannot load one of them."""
    try:
        yield
    except OSError as e:
        if isinstance(e, MissingFileError) or not any(m in str(e) for m in _HUB_LOAD_ERRORS):
            raise
        named = ", ".join(f"model.{k}={cfg.get(k)!r}" for k in BACKBONE_KEYS if cfg.get(k) is not None)
        raise MissingFileError(
            f"a backbone of the model config cannot be loaded ({named}): {str(e).splitlines()[0]} Give an existing "
            "local folder or a hub name; offline (HF_HUB_OFFLINE=1) only local folders and models already in the "
            "cache load."
        ) from None


def _drop_non_checkpoint_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k[len(prefix):].startswith(module._non_checkpoint_prefixes)]:
        del state_dict[key]


class BackboneMixin:
    """Put before the LAVIS class: ``class Blip2OPTPFormer(BackboneMixin, Blip2OPT)``.

    Call ``self.set_backbones(...)`` before the LAVIS constructor runs.
    """

    def set_backbones(self, bert_model="bert-base-uncased", vit_config=None, cross_attention_freq=None):
        # Plain attributes set before nn.Module.__init__ (LAVIS's __init__ reads them via the overrides).
        object.__setattr__(self, "bert_model", bert_model)
        object.__setattr__(self, "vit_config", dict(vit_config or {}))
        object.__setattr__(self, "_cross_attention_freq", cross_attention_freq)

    def exclude_from_checkpoint(self, *prefixes):
        """Never put these submodules (frozen LLM, P-Former teacher) into ``state_dict()``.

        LAVIS's runner drops frozen *parameters* from its checkpoints, but not tensors shared with
        them under another name (OPT's tied ``lm_head.weight``) nor buffers.
        """
        if not hasattr(self, "_non_checkpoint_prefixes"):
            self._non_checkpoint_prefixes = ()
            self._register_state_dict_hook(_drop_non_checkpoint_keys)
        self._non_checkpoint_prefixes += tuple(prefixes)

    def _not_in_checkpoint(self, key):
        """Keys a checkpoint may lack: frozen backbones, excluded modules, and the metadata (older checkpoints)."""
        return key == EXTRA_STATE_KEY or key.startswith(getattr(self, "_non_checkpoint_prefixes", ())) or key in {
            n for n, p in self.named_parameters() if not p.requires_grad
        }

    def load_state_dict(self, state_dict, strict=True):
        """Strict about what a checkpoint carries: trainable tensors; frozen backbones may be absent.

        (LAVIS's resume and best-checkpoint reload call this with strict=True.)
        """
        msg = super().load_state_dict(state_dict, strict=False)
        missing = [k for k in msg.missing_keys if not self._not_in_checkpoint(k)]
        if strict and (missing or msg.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not match {type(self).__name__}: missing {missing}, unexpected {msg.unexpected_keys}"
            )
        return msg

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
        """Cast the frozen LLM to ``llm_precision`` (LAVIS loads OPT in fp16 and T5 in bf16)."""
        if precision not in DTYPES:
            raise ConfigError(f"model.llm_precision must be one of {sorted(DTYPES)}, got '{precision}'")
        return llm.to(DTYPES[precision])

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """``load_finetuned`` -> ``finetuned``; else ``load_pretrained`` (default True) -> ``pretrained``."""
        if cfg.get("load_finetuned", False):
            path = cfg.get("finetuned")
            if not path:
                raise ConfigError("model.load_finetuned is True but model.finetuned is empty; give a checkpoint path")
            return self.load_checkpoint(path, require_complete=True)
        if cfg.get("load_pretrained", True):
            path = cfg.get("pretrained")
            if not path:
                raise ConfigError(
                    "model.pretrained is empty; give the previous stage's checkpoint "
                    "(--options model.pretrained=path/checkpoint_N.pth) or set model.load_pretrained=False "
                    "to start from the backbones alone"
                )
            return self.load_from_pretrained(path)
        logging.info("load_pretrained is False: starting from the backbones alone")

    def load_from_pretrained(self, url_or_filename):
        return self.load_checkpoint(url_or_filename)

    def load_checkpoint(self, url_or_filename, require_complete=False):
        """Load weights; ``require_complete`` (``finetuned`` checkpoints, evaluation) makes any missing
        trainable tensor an error instead of a warning. A tensor of the checkpoint that the model has no
        place for (after ``adapt_state_dict``) is always an error: it would be trained work thrown away."""
        if is_url(url_or_filename):
            from lavis.common.dist_utils import download_cached_file

            url_or_filename = download_cached_file(url_or_filename, check_hash=False, progress=True)
        checkpoint = read_checkpoint(url_or_filename, what="model checkpoint")
        if require_complete:
            self.check_checkpoint_arch(url_or_filename, checkpoint_arch(checkpoint))
        state_dict = checkpoint["model"] if isinstance(checkpoint, dict) and "model" in checkpoint else checkpoint
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"model checkpoint: {url_or_filename} does not hold a state dict")
        state_dict = dict(state_dict)
        meta = state_dict.pop(EXTRA_STATE_KEY, None)
        self.check_checkpoint_meta(meta, url_or_filename, "finetuned" if require_complete else "pretrained")
        state_dict = self.adapt_state_dict(state_dict)
        try:
            msg = self.load_state_dict(state_dict, strict=False)
        except RuntimeError as e:  # size mismatches (raised by torch even with strict=False)
            mismatches = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
            if not mismatches:
                raise
            raise CheckpointError(
                f"{url_or_filename} holds tensors of other shapes than {type(self).__name__} ({len(mismatches)}, e.g. "
                f"{mismatches[0]}): it was trained with another configuration (model.bert_model, "
                "model.num_query_token, model.vit_model / vit_config / image_size, or the LLM); use the values of the "
                "run that wrote it."
            ) from None
        missing = [k for k in msg.missing_keys if not self._not_in_checkpoint(k)]
        self._refuse_dropped_tensors(url_or_filename, state_dict, msg.unexpected_keys, missing)
        if missing and require_complete:
            raise CheckpointError(
                f"{url_or_filename} lacks {len(missing)} tensors that {type(self).__name__} needs (e.g. {missing[:3]}): "
                "it is not a checkpoint of this model (e.g. a stage-1 or stage-0 checkpoint given for a stage-2 "
                "model); give the checkpoint of a stage-2 or caption fine-tuning run as model.finetuned"
            )
        if missing:
            logging.warning("%s: %d trainable tensors not in the checkpoint (they start from their initialisation): "
                            "%s", url_or_filename, len(missing), missing)
        self.apply_checkpoint_meta(meta)
        logging.info("loaded checkpoint %s (%d tensors)", url_or_filename, len(state_dict))
        return msg

    def _refuse_dropped_tensors(self, path, state_dict, unexpected, missing):
        """A CheckpointError, naming the config key to fix, if trained tensors would be dropped."""
        if not unexpected and not cross_attention_layers(missing):
            return
        name = type(self).__name__
        problems = []
        dropped_xattn = [k for k in unexpected if CROSS_ATTENTION.match(k)]
        if dropped_xattn or cross_attention_layers(missing):
            theirs = cross_attention_layers(state_dict)
            ours = cross_attention_layers(k for k, _ in self.named_parameters())
            layers = [int(m.group(1)) for k in state_dict for m in [QFORMER_LAYER.match(k)] if m]
            freq = cross_attention_freq_of(theirs, max(layers) + 1 if layers else 0)
            own = getattr(getattr(getattr(self, "Qformer", None), "config", None), "cross_attention_freq", "?")
            fix = (f"Set model.cross_attention_freq: {freq}, the value the checkpoint was trained with."
                   if freq else "Use the model.cross_attention_freq and model.bert_model it was trained with.")
            losses = [f"{len(dropped_xattn)} trained tensors would be dropped"] if dropped_xattn else []
            untrained = cross_attention_layers(missing)
            if untrained:
                losses.append(f"{len(untrained)} layer(s) would start with untrained cross-attention")
            problems.append(
                f"the checkpoint's Q-Former has cross-attention in layers {theirs} but this model (model."
                f"cross_attention_freq: {own}) builds it in layers {ours}: {' and '.join(losses)}. {fix}"
            )
        other = [k for k in unexpected if not CROSS_ATTENTION.match(k)]
        if other:
            problems.append(
                f"{len(other)} tensors have no place in {name} and would be dropped (e.g. {other[:4]}): it is a "
                "checkpoint of another model, or of a differently sized configuration (model.bert_model, "
                "model.num_query_token); give a checkpoint of this model or of its previous stage."
            )
        raise CheckpointError(f"{path} does not fit {name}: " + " Also: ".join(problems))

    # --- checkpoint metadata: StageCheckpointMixin (stages 1, 2, video) implements these -------------------

    def check_checkpoint_meta(self, meta, path, role):
        """Refuse a checkpoint whose recorded metadata does not fit this model (``role``: "pretrained",
        "finetuned" or "resume")."""

    def apply_checkpoint_meta(self, meta):
        """After loading: take over what the metadata carries (e.g. a ViT that came from no file)."""

    # Archs whose checkpoints this model can evaluate as-is (besides its own), e.g. stock "blip2_opt".
    compatible_archs = ()

    def check_checkpoint_arch(self, path, arch):
        """A ``finetuned`` checkpoint must come from a run of this model (or its stock LAVIS twin)."""
        from lavis.common.registry import registry

        own = {name for name, cls in registry.mapping["model_name_mapping"].items() if cls is type(self)}
        if arch is not None and arch not in own | set(self.compatible_archs):
            raise CheckpointError(
                f"{path} was written by a '{arch}' run, so it is not a checkpoint of this model "
                f"({', '.join(sorted(own))}); give model.finetuned the checkpoint of a "
                f"{' / '.join(sorted(own | set(self.compatible_archs)))} run (stage 2 or caption fine-tuning)"
            )

    def adapt_state_dict(self, state_dict):
        """Hook for subclasses to rename keys of an earlier stage's checkpoint."""
        return state_dict
