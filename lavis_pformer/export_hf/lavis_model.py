"""The LAVIS model to export, built from its training config as an evaluation run builds it."""
import os

from omegaconf import OmegaConf

from lavis_pformer.export_hf import ExportError


def load_run_config(cfg_path, options=()):
    if not os.path.isfile(cfg_path):
        raise ExportError(f"--cfg-path: no file at {cfg_path}")
    try:
        cfg = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(list(options or [])))
    except Exception as e:
        raise ExportError(f"--cfg-path {cfg_path}: cannot read it as a yaml config ({e})") from e
    if "model" not in cfg or "arch" not in cfg.model:
        raise ExportError(f"{cfg_path}: the config has no model.arch; give the stage-2 or caption fine-tuning config")
    return cfg


def model_class(arch, cfg_path):
    import lavis_pformer  # noqa: F401  (registers the plugin's models)
    from lavis.common.registry import registry
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    from lavis.models.blip2_models.blip2_t5 import Blip2T5

    from lavis_pformer.backbones import BackboneMixin

    cls = registry.get_model_class(arch)
    if cls is None:
        raise ExportError(f"{cfg_path}: unknown model.arch '{arch}'")
    if not (issubclass(cls, (Blip2OPT, Blip2T5)) and issubclass(cls, BackboneMixin)):
        exportable = sorted(name for name, c in registry.mapping["model_name_mapping"].items()
                            if issubclass(c, (Blip2OPT, Blip2T5)) and issubclass(c, BackboneMixin))
        raise ExportError(
            f"{cfg_path}: model.arch '{arch}' is not an image-to-text BLIP-2 with an LLM; export the config of a "
            f"stage-2 or caption fine-tuning run ({', '.join(exportable)}). A stock LAVIS blip2_opt / blip2_t5 "
            "checkpoint is exported with the plugin's arch (blip2_opt_pformer / blip2_t5_pformer) in the config."
        )
    return cls


def build_lavis_model(cfg_path, checkpoint, options=()):
    """(model, merged model config, run config, the model type's preprocess config) for ``checkpoint``, built as
    an evaluation run builds it."""
    run_cfg = load_run_config(cfg_path, options)
    arch = run_cfg.model.arch
    cls = model_class(arch, cfg_path)
    model_type = run_cfg.model.get("model_type")
    if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
        raise ExportError(f"{cfg_path}: unknown model.model_type '{model_type}' for arch '{arch}'; "
                          f"choose one of {', '.join(sorted(cls.PRETRAINED_MODEL_CONFIG_DICT))}")
    if not os.path.isfile(checkpoint):
        raise ExportError(f"--checkpoint: no file at {checkpoint}")
    default = OmegaConf.load(cls.default_config_path(model_type))
    model_cfg = OmegaConf.merge(
        default.model, run_cfg.model,
        {"load_finetuned": True, "finetuned": os.path.abspath(checkpoint), "load_pretrained": False},
    )
    model = cls.from_config(model_cfg)  # for_training=False: no P-Former teacher
    model.eval()
    preprocess = default.get("preprocess")
    return model, model_cfg, run_cfg, preprocess
