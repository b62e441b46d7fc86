"""The model section of a run config, read and checked once, at the top of each model's ``from_config``.

A ``from_config`` reads every key it uses with the readers here and hands the checked values down: its
constructor's arguments (among them :class:`AlignmentKeys`, which the P-Former teacher's set-up takes whole), the
:class:`StartingCheckpoint` it loads (:mod:`lavis_pformer.checkpoints`) and the backbone names that an error of
transformers' loading quotes. Nothing below ``from_config`` reads the config again.

A value that is not what its key needs is an error that names the key, the value and the fix, not a guess: the
reference configs' trailing commas (``alignment_weight: 10,``) turned numbers and booleans into strings that were
then silently used.
"""
from typing import NamedTuple

from omegaconf import OmegaConf

from lavis_pformer.errors import ConfigError
from lavis_pformer.paths import resolve_file, resolve_model_path
from lavis_pformer.precision import DTYPES

# The keys of the backbones that transformers loads (by hub name or from a folder).
BACKBONE_KEYS = ("bert_model", "opt_model", "t5_model")


# --- one key -------------------------------------------------------------------------------------------------

def as_float(cfg, key, default=None, minimum=None):
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(f"model.{key} is required (a number)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"model.{key} must be a number, got {value!r} ({type(value).__name__}); "
            "remove quotes or trailing commas in the yaml, e.g. `{key}: 10`".replace("{key}", key)
        )
    if minimum is not None and value < minimum:
        raise ConfigError(f"model.{key} must be >= {minimum}, got {value}")
    return float(value)


def as_int(cfg, key, default=None, minimum=None):
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"model.{key} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"model.{key} must be >= {minimum}, got {value}")
    return value


def as_bool(cfg, key, default=None):
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(
            f"model.{key} must be true or false, got {value!r} ({type(value).__name__}); "
            "remove quotes or trailing commas in the yaml"
        )
    return value


def optional_int(cfg, key):
    return None if cfg.get(key) is None else as_int(cfg, key, minimum=1)


def optional_str(cfg, key):
    value = cfg.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"model.{key} must be a string, got {value!r} ({type(value).__name__})")
    return value or None


def as_precision(cfg, key, default):
    """A precision name (``fp16``, ``bf16``, ``fp32``: :data:`~lavis_pformer.precision.DTYPES`)."""
    value = cfg.get(key, default)
    if value not in DTYPES:
        raise ConfigError(f"model.{key} must be one of {sorted(DTYPES)}, got '{value}'")
    return value


def model_path(cfg, key, default):
    """A backbone: an absolute local path, or a hub name (:func:`~lavis_pformer.paths.resolve_model_path`)."""
    return resolve_model_path(cfg.get(key, default), f"model.{key}")


def vit_config_of(cfg):
    """``vit_config`` as a dict, its ``checkpoint`` resolved (working directory, then the repository).

    With ``custom_vit`` it gives the size and optionally the weights; with ``eva_clip_g`` / ``clip_L`` only
    ``checkpoint``, a local copy of the weights LAVIS would download."""
    vit_config = cfg.get("vit_config")
    if vit_config is None:
        return None
    if OmegaConf.is_config(vit_config):
        vit_config = OmegaConf.to_container(vit_config, resolve=True)
    if not isinstance(vit_config, dict):
        raise ConfigError(f"model.vit_config must be a mapping (patch_size, embed_dim, ...), got {vit_config!r}")
    vit_config = dict(vit_config)
    if vit_config.get("checkpoint"):
        vit_config["checkpoint"] = resolve_file(vit_config["checkpoint"], "model.vit_config.checkpoint")
    return vit_config


# --- groups of keys ------------------------------------------------------------------------------------------

def lavis_vit_qformer_kwargs(cfg):
    """The image-encoder / Q-Former keys every LAVIS BLIP-2 ``from_config`` reads, type-checked."""
    return dict(
        vit_model=cfg.get("vit_model", "eva_clip_g"),
        img_size=as_int(cfg, "image_size", 224, minimum=1),
        drop_path_rate=as_float(cfg, "drop_path_rate", 0, minimum=0),
        use_grad_checkpoint=as_bool(cfg, "use_grad_checkpoint", False),
        vit_precision=cfg.get("vit_precision", "fp16"),
        freeze_vit=as_bool(cfg, "freeze_vit", True),
        num_query_token=as_int(cfg, "num_query_token", 32, minimum=1),
        max_txt_len=as_int(cfg, "max_txt_len", 32, minimum=2),
    )


class AlignmentKeys:
    """The keys of the frozen P-Former teacher and ``loss_align`` (stages 1, 2 and video), read once; the model
    hands them whole to ``PFormerAlignmentMixin.setup_alignment`` (:mod:`lavis_pformer.models.alignment`).

    - ``alignment_weight`` (float >= 0): the weight of ``loss_align`` (the model's default: w1 = 10, w2 = 100);
    - ``pformer_checkpoint`` (str or None): stage 0's ``pformer.pth``;
    - ``teacher_precision`` (``fp32`` / ``fp16`` / ``bf16``): the teacher's precision; a training task fills it in
      by ``run.device`` when the config leaves it unset (:mod:`lavis_pformer.tasks`).
    """

    def __init__(self, cfg, default_weight):
        self.alignment_weight = as_float(cfg, "alignment_weight", default_weight, minimum=0)
        self.pformer_checkpoint = optional_str(cfg, "pformer_checkpoint")
        self.teacher_precision = cfg.get("teacher_precision") or "fp32"
        if self.teacher_precision not in DTYPES:
            raise ConfigError(
                f"model.teacher_precision must be one of {', '.join(sorted(DTYPES))}, got {self.teacher_precision!r}; "
                "leave it unset for the default (fp16 when run.device is cuda, fp32 on the CPU)")


def plugin_kwargs(cls, cfg, for_training):
    """Backbones and alignment keys of the plugin's BLIP-2 models (stages 1 and 2)."""
    return dict(
        bert_model=model_path(cfg, "bert_model", "bert-base-uncased"),
        vit_config=vit_config_of(cfg),
        cross_attention_freq=as_int(cfg, "cross_attention_freq", 2, minimum=1),
        alignment=AlignmentKeys(cfg, cls.DEFAULT_ALIGNMENT_WEIGHT),
        for_training=bool(for_training),
    )


class StartingCheckpoint(NamedTuple):
    """The checkpoint a model starts from. ``complete``: a ``finetuned`` checkpoint (evaluation, caption
    fine-tuning), which must hold every trainable tensor; else an earlier stage's ``pretrained``."""

    path: str
    complete: bool


def starting_checkpoint_key(cfg):
    """The key of the checkpoint a model starts from: ``finetuned`` with ``load_finetuned``, else ``pretrained``
    unless ``load_pretrained`` is False, else None (the backbones alone)."""
    if cfg.get("load_finetuned", False):
        return "finetuned"
    if cfg.get("load_pretrained", True):
        return "pretrained"
    return None


def starting_checkpoint(cfg):
    """The :class:`StartingCheckpoint` that :func:`starting_checkpoint_key` names, or None; its path must be given."""
    key = starting_checkpoint_key(cfg)
    if key == "finetuned":
        path = cfg.get("finetuned")
        if not path:
            raise ConfigError("model.load_finetuned is True but model.finetuned is empty; give a checkpoint path")
        return StartingCheckpoint(path, complete=True)
    if key == "pretrained":
        path = cfg.get("pretrained")
        if not path:
            raise ConfigError(
                "model.pretrained is empty; give the previous stage's checkpoint "
                "(--options model.pretrained=path/checkpoint_N.pth) or set model.load_pretrained=False "
                "to start from the backbones alone"
            )
        return StartingCheckpoint(path, complete=False)
    return None


def backbone_names(cfg):
    """{key: value as given} of the backbone keys the config sets (``hub_load_errors`` quotes them)."""
    return {key: cfg.get(key) for key in BACKBONE_KEYS if cfg.get(key) is not None}
