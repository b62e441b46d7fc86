"""The LLM tokenizer with an ``<image>`` token, and ``BlipImageProcessor``'s config from LAVIS's eval processor."""
import copy
import json
import os

from omegaconf import OmegaConf

from lavis_pformer.export_hf import ExportError
from lavis_pformer.export_hf.weights_files import write_json

IMAGE_TOKEN = "<image>"


def image_processor_config(run_cfg, preprocess, image_size):
    """preprocessor_config.json for ``BlipImageProcessor`` with the LAVIS eval processor's settings."""
    from lavis.common.registry import registry
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    source, proc_cfg = None, None
    for name, dataset in (run_cfg.get("datasets") or {}).items():
        eval_cfg = ((dataset or {}).get("vis_processor") or {}).get("eval")
        if eval_cfg is not None:
            source, proc_cfg = f"datasets.{name}.vis_processor.eval", eval_cfg
            break
    if proc_cfg is None and preprocess is not None and (preprocess.get("vis_processor") or {}).get("eval"):
        source, proc_cfg = "the model type's preprocess.vis_processor.eval", preprocess.vis_processor.eval
    if proc_cfg is None:
        source = "default (blip_image_eval)"
        proc_cfg = OmegaConf.create({"name": "blip_image_eval", "image_size": image_size})
    cls = registry.get_processor_class(proc_cfg.get("name"))
    if cls is None:
        raise ExportError(f"eval image processor '{proc_cfg.get('name')}' ({source}) is not a registered LAVIS processor")
    processor = cls.from_config(proc_cfg)
    steps = list(getattr(getattr(processor, "transform", None), "transforms", []))
    kinds = [type(s).__name__ for s in steps]
    if kinds != ["Resize", "ToTensor", "Normalize"]:
        raise ExportError(
            f"eval image processor '{proc_cfg.get('name')}' ({source}) does {kinds}; BlipImageProcessor can express "
            "Resize(square, bicubic) -> ToTensor -> Normalize only"
        )
    resize, _, normalize = steps
    size = resize.size if isinstance(resize.size, (list, tuple)) else (resize.size, resize.size)
    if len(size) != 2 or size[0] != size[1] or resize.interpolation != InterpolationMode.BICUBIC \
            or isinstance(resize, transforms.RandomResizedCrop):
        raise ExportError(f"eval image processor ({source}) resizes to {resize.size} with {resize.interpolation}; "
                          "only a square bicubic resize is expressible")
    if size[0] != image_size:
        raise ExportError(f"eval image processor ({source}) resizes to {size[0]} px but the model's ViT takes "
                          f"{image_size} px (model.image_size); make them equal")
    return {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "Blip2Processor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": int(size[0]), "width": int(size[1])},
        "resample": 3,  # PIL bicubic, as torchvision's Resize applies to PIL images
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in normalize.mean],
        "image_std": [float(x) for x in normalize.std],
    }, source


def save_tokenizer(tokenizer, out_dir, decoder_only):
    """The LLM tokenizer with ``<image>`` as an extra special token; returns the token's id."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_additional_special_tokens=False)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if decoder_only:
        tokenizer.padding_side = "left"  # batched prompts end where generation starts
    tokenizer.save_pretrained(out_dir)
    # Drop the local path LAVIS loaded the tokenizer from.
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        tok_config = json.load(f)
    tok_config.pop("name_or_path", None)
    tok_config["padding_side"] = tokenizer.padding_side
    tok_config["processor_class"] = "Blip2Processor"
    write_json(config_path, tok_config)
    return image_token_id, len(tokenizer)
