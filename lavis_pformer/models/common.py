"""What the model files share: where their configs live and the config readers of their ``from_config``."""
import os

from omegaconf import OmegaConf

from lavis_pformer.config_checks import as_bool, as_float, as_int
from lavis_pformer.errors import ConfigError
from lavis_pformer.paths import resolve_file, resolve_model_path

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")


def optional_int(cfg, key):
    return None if cfg.get(key) is None else as_int(cfg, key, minimum=1)


def optional_str(cfg, key):
    value = cfg.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"model.{key} must be a string, got {value!r} ({type(value).__name__})")
    return value or None


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


def plugin_kwargs(cls, cfg, for_training):
    """Backbones and alignment keys of the plugin's BLIP-2 models (stages 1 and 2)."""
    checkpoint = optional_str(cfg, "pformer_checkpoint")
    return dict(
        bert_model=resolve_model_path(cfg.get("bert_model", "bert-base-uncased"), "model.bert_model"),
        vit_config=vit_config_of(cfg),
        cross_attention_freq=as_int(cfg, "cross_attention_freq", 2, minimum=1),
        alignment_weight=as_float(cfg, "alignment_weight", cls.DEFAULT_ALIGNMENT_WEIGHT, minimum=0),
        pformer_checkpoint=checkpoint,
        teacher_precision=cfg.get("teacher_precision", "fp32"),
        for_training=bool(for_training),
    )
