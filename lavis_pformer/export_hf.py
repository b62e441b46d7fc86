"""Export a trained BLIP-2 to a folder that Hugging Face transformers loads as ``Blip2ForConditionalGeneration``.

    python -m lavis_pformer.export_hf --cfg-path <stage-2 or caption fine-tuning config> \\
        --checkpoint <checkpoint_N.pth> --out <dir> [--dtype fp32|fp16|bf16] [--options key=value ...]

The model (``blip2_opt_pformer`` / ``blip2_t5_pformer``; a stock LAVIS ``blip2_opt`` / ``blip2_t5`` checkpoint
too, with the plugin's arch named in the config) is built from the config as an evaluation run builds it
(``model.finetuned`` = the checkpoint, no P-Former teacher), then written as:

- ``config.json``: ``Blip2Config`` (vision, Q-Former and LLM configs; ``num_query_tokens``; ``image_token_index``);
- ``model.safetensors`` (or shards + ``model.safetensors.index.json``): ViT, ``ln_vision`` (HF's
  ``post_layernorm``), query tokens, Q-Former, projection, frozen LLM;
- the LLM tokenizer with an ``<image>`` token, ``preprocessor_config.json`` (the LAVIS eval image processor's
  resize / normalisation), ``processor_config.json`` (``num_query_tokens``), ``generation_config.json``;
- ``README.md`` (model card with the training provenance) and ``export_provenance.json`` (the same, as data).

Current transformers marks the image positions in ``input_ids`` with ``num_query_tokens`` copies of
``<image>`` (``Blip2Processor`` adds them) and puts the projected query outputs there, which is the
sequence LAVIS builds (queries, then the text tokens). What cannot be expressed faithfully is refused with
an ``ExportError``: a ViT other than LAVIS's EVA ViT (``eva_clip_g``, ``custom_vit``), EVA options that
``Blip2VisionModel`` lacks (layer scale, relative position bias, no q/v bias, ...), Q-Former options that
``Blip2QFormerModel`` lacks (relative position embeddings, cross-attention layers not at a fixed
frequency), an eval image processor other than resize + normalise.

The one approximation: LAVIS's ``ln_vision`` uses LayerNorm eps 1e-5 while the EVA blocks use 1e-6, and
``Blip2VisionConfig`` has a single ``layer_norm_eps``; the export takes the blocks' value (logged, and stated in
the model card; docs/export.md gives its measured effect).

No transformers newer than LAVIS's is needed to export; the weights are written in the safetensors format
by ``write_safetensors`` below (the format is a JSON header and the raw little-endian tensor bytes).
"""
import argparse
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import sys
import tempfile

import torch
import torch.nn as nn
from omegaconf import OmegaConf

IMAGE_TOKEN = "<image>"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
# LAVIS's caption generation default (Blip2OPT / Blip2T5 ``generate(max_length=30)``: new tokens).
DEFAULT_MAX_NEW_TOKENS = 30
NOT_FOUND = "file not found at export time (paths are relative to the training working directory)"


class ExportError(ValueError):
    """The model cannot be written as a transformers Blip2ForConditionalGeneration without changing what it computes."""


# ----------------------------------------------------------------------------------------------------------------
# safetensors writing
# ----------------------------------------------------------------------------------------------------------------

def write_safetensors(path, tensors, metadata=None):
    """Write ``{name: tensor}`` to ``path`` in the safetensors format.

    Layout: 8-byte little-endian header size N, N bytes of JSON header ({name: {dtype, shape, data_offsets}},
    ``__metadata__``: str -> str) padded with spaces to a multiple of 8, then the tensors' bytes back to back.
    """
    if sys.byteorder != "little":
        raise ExportError("writing safetensors needs a little-endian machine")
    header = {"__metadata__": {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ExportError(f"tensor {name} has dtype {tensor.dtype}, which the export does not write")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for tensor in tensors.values():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                f.write(flat.view(torch.uint8).numpy().data)


def write_weights(out_dir, tensors, max_shard_bytes):
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when larger than ``max_shard_bytes``."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards, current, current_size = [], {}, 0
    for name, tensor in tensors.items():
        if current and current_size + sizes[name] > max_shard_bytes:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensor
        current_size += sizes[name]
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, {"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, file_name), shard, {"format": "pt"})
        names.append(file_name)
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    return names


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_size(text):
    """'5GB', '200MB', '100KB' or a number of bytes -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    value = str(text).strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            break
    else:
        number, factor = value, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ExportError(f"--max-shard-size: cannot read {text!r}; give e.g. 5GB, 500MB or a number of bytes")
    if size <= 0:
        raise ExportError(f"--max-shard-size must be positive, got {text!r}")
    return size


# ----------------------------------------------------------------------------------------------------------------
# Building the LAVIS model from the training config
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# Vision encoder: LAVIS EVA ViT + ln_vision -> Blip2VisionModel
# ----------------------------------------------------------------------------------------------------------------

def _layer_norm_eps(module, what):
    if not isinstance(module, nn.LayerNorm):
        raise ExportError(f"{what} is a {type(module).__name__}, not a LayerNorm")
    if not module.elementwise_affine or module.weight is None or module.bias is None:
        raise ExportError(f"{what} has no affine weight/bias, which Blip2VisionModel's LayerNorms have")
    return module.eps


def vision_part(model, vit_model_name):
    """(Blip2VisionConfig dict, {hf name: tensor}, notes) for ``model.visual_encoder`` + ``model.ln_vision``."""
    from lavis.models.eva_vit import VisionTransformer as EvaViT

    vit = model.visual_encoder
    if vit_model_name not in ("eva_clip_g", "custom_vit") or not isinstance(vit, EvaViT):
        raise ExportError(
            f"model.vit_model '{vit_model_name}' ({type(vit).__module__}.{type(vit).__name__}) cannot be exported: "
            "transformers' Blip2VisionModel is LAVIS's EVA ViT (eva_clip_g, or custom_vit); LAVIS's clip_L has a "
            "pre-LayerNorm and another attention layout that it cannot express"
        )
    conv = vit.patch_embed.proj
    img_size, patch = tuple(vit.patch_embed.img_size), tuple(vit.patch_embed.patch_size)
    problems = []
    if img_size[0] != img_size[1] or patch[0] != patch[1]:
        problems.append(f"non-square image {img_size} or patch {patch}")
    if tuple(conv.kernel_size) != patch or tuple(conv.stride) != patch or conv.padding not in ((0, 0), 0) \
            or conv.bias is None:
        problems.append("patch embedding is not a biased Conv2d with kernel = stride = patch size")
    if vit.pos_embed is None:
        problems.append("no absolute position embedding (use_abs_pos_emb=False)")
    if getattr(vit, "rel_pos_bias", None) is not None:
        problems.append("a shared relative position bias")
    dim, blocks = vit.embed_dim, list(vit.blocks)
    if not blocks:
        problems.append("no transformer blocks")
    eps, widths, heads = set(), set(), set()
    for i, block in enumerate(blocks):
        attn = block.attn
        heads.add(attn.num_heads)
        if getattr(block, "gamma_1", None) is not None or getattr(block, "gamma_2", None) is not None:
            problems.append(f"block {i}: layer scale (init_values)")
        if getattr(attn, "relative_position_bias_table", None) is not None:
            problems.append(f"block {i}: relative position bias")
        if attn.q_bias is None or attn.v_bias is None:
            problems.append(f"block {i}: attention without q/v bias (qkv_bias=False)")
        if attn.qkv.weight.shape != (3 * dim, dim) or attn.qkv.bias is not None:
            problems.append(f"block {i}: attention head width x heads != embed_dim (attn_head_dim)")
        head_dim = dim // attn.num_heads
        if head_dim * attn.num_heads != dim or not math.isclose(attn.scale, head_dim ** -0.5, rel_tol=1e-9):
            problems.append(f"block {i}: attention scale {attn.scale} is not head_dim ** -0.5 (qk_scale)")
        act = block.mlp.act
        if not isinstance(act, nn.GELU) or getattr(act, "approximate", "none") != "none":
            problems.append(f"block {i}: MLP activation {act} is not exact GELU")
        widths.add(block.mlp.fc1.out_features)
        eps.add(_layer_norm_eps(block.norm1, f"block {i} norm1"))
        eps.add(_layer_norm_eps(block.norm2, f"block {i} norm2"))
    if len(eps) > 1 or len(widths) > 1 or len(heads) > 1:
        problems.append(f"blocks differ in LayerNorm eps {sorted(eps)}, MLP width {sorted(widths)} "
                        f"or heads {sorted(heads)}")
    if problems:
        raise ExportError(
            f"the ViT ({vit_model_name}) has what transformers' Blip2VisionModel cannot express: " + "; ".join(problems)
        )
    block_eps = eps.pop()
    ln_eps = _layer_norm_eps(model.ln_vision, "ln_vision")
    notes = []
    if ln_eps != block_eps:
        notes.append(
            f"LAVIS's ln_vision uses LayerNorm eps {ln_eps:g} and the ViT blocks {block_eps:g}; Blip2VisionConfig has "
            f"one layer_norm_eps, set to the blocks' {block_eps:g}, so HF's post_layernorm (= ln_vision) differs by "
            "that eps."
        )
    config = dict(
        model_type="blip_2_vision_model", hidden_size=dim, intermediate_size=widths.pop(), num_hidden_layers=len(blocks),
        num_attention_heads=heads.pop(), image_size=img_size[0], patch_size=patch[0], hidden_act="gelu",
        layer_norm_eps=block_eps, attention_dropout=0.0, qkv_bias=True,
    )
    p = "vision_model."
    tensors = {
        p + "embeddings.class_embedding": vit.cls_token,
        p + "embeddings.position_embedding": vit.pos_embed,
        p + "embeddings.patch_embedding.weight": conv.weight,
        p + "embeddings.patch_embedding.bias": conv.bias,
    }
    used = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i, block in enumerate(blocks):
        q = f"{p}encoder.layers.{i}."
        attn = block.attn
        tensors.update({
            q + "layer_norm1.weight": block.norm1.weight, q + "layer_norm1.bias": block.norm1.bias,
            q + "self_attn.qkv.weight": attn.qkv.weight,
            # HF keeps one qkv bias with the key part fixed at zero; EVA keeps q_bias and v_bias (k has none).
            q + "self_attn.qkv.bias": torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias]),
            q + "self_attn.projection.weight": attn.proj.weight, q + "self_attn.projection.bias": attn.proj.bias,
            q + "layer_norm2.weight": block.norm2.weight, q + "layer_norm2.bias": block.norm2.bias,
            q + "mlp.fc1.weight": block.mlp.fc1.weight, q + "mlp.fc1.bias": block.mlp.fc1.bias,
            q + "mlp.fc2.weight": block.mlp.fc2.weight, q + "mlp.fc2.bias": block.mlp.fc2.bias,
        })
        used |= {f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
            "mlp.fc2.bias")}
    left = sorted(set(vit.state_dict()) - used)
    if left:
        raise ExportError(f"the ViT has tensors with no place in Blip2VisionModel: {left[:8]}")
    tensors[p + "post_layernorm.weight"] = model.ln_vision.weight
    tensors[p + "post_layernorm.bias"] = model.ln_vision.bias
    return config, tensors, notes


# ----------------------------------------------------------------------------------------------------------------
# Q-Former -> Blip2QFormerModel
# ----------------------------------------------------------------------------------------------------------------

def qformer_part(model, vision_width):
    """(Blip2QFormerConfig dict, {hf name: tensor}) for ``model.Qformer.bert`` and ``model.query_tokens``."""
    bert = model.Qformer.bert
    cfg = bert.config
    layers = list(bert.encoder.layer)
    problems = []
    position = getattr(cfg, "position_embedding_type", "absolute")
    if position != "absolute":
        problems.append(f"position_embedding_type '{position}' (relative attention scores)")
    freq = getattr(cfg, "cross_attention_freq", None)
    if not getattr(cfg, "add_cross_attention", False) or not isinstance(freq, int) or freq < 1:
        problems.append(f"add_cross_attention={getattr(cfg, 'add_cross_attention', None)}, cross_attention_freq={freq}")
    else:
        where = [i for i, layer in enumerate(layers) if getattr(layer, "has_cross_attention", False)]
        if where != [i for i in range(len(layers)) if i % freq == 0]:
            problems.append(f"cross-attention in layers {where}, not every {freq} layers from layer 0")
    if cfg.hidden_size % cfg.num_attention_heads:
        problems.append("hidden_size not a multiple of num_attention_heads")
    if not isinstance(cfg.hidden_act, str):
        problems.append(f"hidden_act {cfg.hidden_act!r} is not a named activation")
    for i, layer in enumerate(layers):
        if getattr(layer, "intermediate_query", None) is None or getattr(layer, "output_query", None) is None:
            problems.append(f"layer {i} has no query feed-forward (intermediate_query / output_query)")
        for name in ("attention", "crossattention"):
            att = getattr(layer, name, None)
            if att is not None and getattr(att.self, "position_embedding_type", "absolute") != "absolute":
                problems.append(f"layer {i} {name}: relative position embeddings")
    if problems:
        raise ExportError("the Q-Former has what transformers' Blip2QFormerModel cannot express: " + "; ".join(problems))
    encoder_width = getattr(cfg, "encoder_width", vision_width)
    if encoder_width != vision_width:
        raise ExportError(f"the Q-Former cross-attends to width {encoder_width} but the ViT is {vision_width} wide")
    config = dict(
        model_type="blip_2_qformer", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=len(layers), num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout_prob, attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.initializer_range,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id, cross_attention_frequency=freq,
        encoder_hidden_size=vision_width, use_qformer_text_input=False,
    )
    tensors = {"query_tokens": model.query_tokens, "qformer.layernorm.weight": bert.embeddings.LayerNorm.weight,
               "qformer.layernorm.bias": bert.embeddings.LayerNorm.bias}
    for i, layer in enumerate(layers):
        blocks = [("attention", layer.attention)]
        if layer.has_cross_attention:
            blocks.append(("crossattention", layer.crossattention))
        for name, att in blocks:
            src, dst = att.self, f"qformer.encoder.layer.{i}.{name}."
            for lin in ("query", "key", "value"):
                tensors[dst + f"attention.{lin}.weight"] = getattr(src, lin).weight
                tensors[dst + f"attention.{lin}.bias"] = getattr(src, lin).bias
            tensors[dst + "output.dense.weight"] = att.output.dense.weight
            tensors[dst + "output.dense.bias"] = att.output.dense.bias
            tensors[dst + "output.LayerNorm.weight"] = att.output.LayerNorm.weight
            tensors[dst + "output.LayerNorm.bias"] = att.output.LayerNorm.bias
        dst = f"qformer.encoder.layer.{i}."
        tensors[dst + "intermediate_query.dense.weight"] = layer.intermediate_query.dense.weight
        tensors[dst + "intermediate_query.dense.bias"] = layer.intermediate_query.dense.bias
        for n in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
            tensors[dst + "output_query." + n] = layer.output_query.get_parameter(n)
    # Everything the Q-Former holds for the image -> query path must have been placed (text-side layers are
    # None in LAVIS's Blip2OPT / Blip2T5; the position_ids buffer is not a weight).
    placed = {id(t) for t in tensors.values()}
    missed = [n for n, t in bert.named_parameters() if id(t) not in placed]
    if missed:
        raise ExportError(f"Q-Former tensors with no place in Blip2QFormerModel: {missed[:8]}")
    return config, tensors


# ----------------------------------------------------------------------------------------------------------------
# Language model, tokenizer, image processor
# ----------------------------------------------------------------------------------------------------------------

def llm_of(model):
    from lavis.models.blip2_models.blip2_opt import Blip2OPT

    if isinstance(model, Blip2OPT):
        return model.opt_model, model.opt_tokenizer, model.opt_proj, True
    return model.t5_model, model.t5_tokenizer, model.t5_proj, False


def tied_names(llm_config, decoder_only):
    """{tied name: source name} that transformers re-creates on load (so they are not written)."""
    tie = getattr(llm_config, "tie_word_embeddings", True)
    if decoder_only:
        return {"lm_head.weight": "model.decoder.embed_tokens.weight"} if tie else {}
    tied = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if tie:
        tied["lm_head.weight"] = "shared.weight"
    return tied


def language_part(model, image_token_id):
    """(text config dict, {hf name: tensor}, added vocabulary rows) for the frozen LLM and the projection."""
    llm, _, proj, decoder_only = llm_of(model)
    state = llm.state_dict()
    tied = tied_names(llm.config, decoder_only)
    for name, source in tied.items():
        if name in state and not torch.equal(state[name], state[source]):
            raise ExportError(f"the LLM's {name} differs from {source}, but its config ties them (tie_word_embeddings)")
    state = {k: v for k, v in state.items() if k not in tied}
    vocab = llm.config.vocab_size
    added = 0
    if image_token_id >= vocab:
        # The tokenizer fills the embedding table: make room for <image> (its embedding is never read, the
        # query outputs replace it; its output logit is suppressed in generation_config.json).
        added = image_token_id + 1 - vocab
        rows = ["model.decoder.embed_tokens.weight"] if decoder_only else ["shared.weight"]
        if not decoder_only and "lm_head.weight" in state:
            rows.append("lm_head.weight")
        for name in rows:
            weight = state[name]
            state[name] = torch.cat([weight, weight.new_zeros(added, weight.shape[1])])
    text_config = llm.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "_commit_hash"):
        text_config.pop(key, None)
    text_config["vocab_size"] = vocab + added
    tensors = {"language_projection.weight": proj.weight, "language_projection.bias": proj.bias}
    tensors.update({"language_model." + k: v for k, v in state.items()})
    return text_config, tensors, added


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


# ----------------------------------------------------------------------------------------------------------------
# Provenance and model card
# ----------------------------------------------------------------------------------------------------------------

def _plain(cfg):
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def read_run_config(path):
    """The run config a LAVIS checkpoint carries (``checkpoint["config"]``), or None; reads no tensor data."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (a missing or foreign file is reported, not fatal)
        logging.warning("cannot read %s for its run config (%s)", path, e)
        return None
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    return config if isinstance(config, dict) else None


def stage_name(config):
    model = config.get("model") or {}
    arch, task = str(model.get("arch", "")), str((config.get("run") or {}).get("task", ""))
    if arch.startswith("pformer_"):
        return "stage 0 (P-Former)"
    if arch.startswith("blip2_qformer"):
        return "stage 1 (Q-Former: ITC + ITM + ITG + w1 x alignment)"
    if "caption" in task:
        return "caption fine-tuning"
    return "stage 2 (LM + w2 x alignment)"


def dataset_summary(config):
    out = []
    for name, dataset in (config.get("datasets") or {}).items():
        info = (dataset or {}).get("build_info") or {}
        storage = {}
        for kind in ("annotations", "images", "features", "storage"):
            value = info.get(kind)
            if isinstance(value, dict):
                if "storage" in value:
                    storage[kind] = value["storage"]
                else:
                    storage.update({f"{kind}.{split}": (v or {}).get("storage") if isinstance(v, dict) else v
                                    for split, v in value.items()})
            elif value is not None:
                storage[kind] = value
        out.append({"name": name, "storage": storage or "LAVIS default build_info"})
    return out


def dataset_text(dataset):
    storage = dataset["storage"]
    if isinstance(storage, dict):
        storage = ", ".join(f"{k}: `{v}`" for k, v in storage.items())
    return f"{dataset['name']} ({storage})"


def pformer_info(path):
    info = {"path": path}
    if not path:
        return None
    if not os.path.isfile(path):
        info["note"] = NOT_FOUND
        logging.warning("P-Former checkpoint %s not found: the model card will lack its sha256", path)
        return info
    info["sha256"] = sha256_of(path)
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta") or {}
        info.update({k: meta[k] for k in ("llm_name", "llm_hidden_size", "num_query_token", "bert_model") if k in meta})
    except Exception as e:  # noqa: BLE001
        info["note"] = f"not readable as a P-Former checkpoint ({type(e).__name__})"
    return info


def collect_provenance(checkpoint, run_cfg):
    """Stages from the exported checkpoint back through ``model.pretrained``, each with w, data and P-Former."""
    from lavis.common.registry import registry

    stages, seen = [], set()
    path, config, source = checkpoint, read_run_config(checkpoint), "checkpoint"
    if config is None:
        config, source = _plain(run_cfg), "--cfg-path (the checkpoint carries no run config)"
    while config is not None and len(stages) < 6:
        model = config.get("model") or {}
        cls = registry.get_model_class(model.get("arch", ""))
        weight = model.get("alignment_weight", getattr(cls, "DEFAULT_ALIGNMENT_WEIGHT", None))
        entry = {
            "stage": stage_name(config), "checkpoint": path, "config_source": source, "arch": model.get("arch"),
            "alignment_weight": weight, "pformer": pformer_info(model.get("pformer_checkpoint") or None)
            if weight else None, "datasets": dataset_summary(config),
        }
        if path and os.path.isfile(path):
            entry["sha256"] = sha256_of(path)
        stages.append(entry)
        previous = model.get("pretrained") if model.get("load_pretrained", True) else None
        if not previous or previous in seen or str(previous).startswith(("http://", "https://")):
            if previous:
                stages.append({"stage": "earlier", "checkpoint": previous, "note": "not followed"})
            break
        seen.add(previous)
        if not os.path.isfile(previous):
            stages.append({"stage": "earlier", "checkpoint": previous, "note": NOT_FOUND})
            break
        path, config, source = previous, read_run_config(previous), "checkpoint"
        if config is None:
            stages.append({"stage": "earlier", "checkpoint": previous, "note": "carries no run config"})
            break
    return stages


def model_card(summary):
    """README.md for the export folder."""
    prov, lines = summary["provenance"], []
    decoder_only = summary["decoder_only"]
    lines += [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [blip-2, p-former, lavis]",
        "---",
        "",
        f"# BLIP-2 ({summary['arch']}, {summary['llm']}) trained with P-Former",
        "",
        "A BLIP-2 model trained in LAVIS with the P-Former recipe (*Bootstrapping Vision-Language Learning with",
        "Decoupled Language Pre-training*, NeurIPS 2023) by lavis-pformer, exported to transformers'",
        "`Blip2ForConditionalGeneration` by `python -m lavis_pformer.export_hf`. At inference it is a plain BLIP-2:",
        "the P-Former was a training-time teacher only and is not part of this folder.",
        "",
        "## Use",
        "",
        "Tested with transformers 5.25.0 (`FOLDER`: this folder's path, or its Hub id):",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import Blip2ForConditionalGeneration, Blip2Processor",
        "",
        "processor = Blip2Processor.from_pretrained(FOLDER)  # backend=\"pil\": LAVIS's exact resize",
        "model = Blip2ForConditionalGeneration.from_pretrained(FOLDER).eval()",
        f"inputs = processor(images=Image.open(\"photo.jpg\").convert(\"RGB\"), text={json.dumps(summary['prompt'])}, "
        "return_tensors=\"pt\")",
        "ids = model.generate(**inputs, generation_config=model.generation_config)  # this folder's defaults",
        "print(processor.batch_decode(ids[:, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"
        if decoder_only else "print(processor.batch_decode(ids, skip_special_tokens=True))",
        "```",
        "",
        f"- Image: {summary['image_size']} px, bicubic resize, CLIP normalisation (the LAVIS eval processor, from "
        f"{summary['image_processor_source']}).",
        f"- Prompt: the model's caption prompt is {json.dumps(summary['prompt'])}; for zero-shot VQA LAVIS passes "
        "`\"Question: {} Short answer:\".format(question)` as the text.",
        f"- Generation stops at {summary['eos_note']}; `generation_config.json` sets max_new_tokens="
        f"{summary['max_new_tokens']} and greedy decoding.",
        "",
        "## Training provenance",
        "",
        "| stage | checkpoint | w (alignment weight) | P-Former checkpoint (sha256) | data |",
        "|---|---|---|---|---|",
    ]
    for entry in prov:
        pformer = entry.get("pformer") or {}
        pf = "none (alignment_weight 0: BLIP-2 baseline)" if entry.get("alignment_weight") == 0 else (
            f"`{pformer.get('path')}` ({pformer.get('sha256') or pformer.get('note', 'unknown')})" if pformer else "-")
        data = "; ".join(dataset_text(d) for d in entry.get("datasets", [])) or "-"
        ckpt = f"`{entry.get('checkpoint')}`" + (f" (sha256 {entry['sha256']})" if entry.get("sha256") else "")
        if entry.get("note"):
            ckpt += f" — {entry['note']}"
        weight = entry.get("alignment_weight", "-")
        lines.append(f"| {entry['stage']} | {ckpt} | {weight if weight is not None else '-'} | {pf} | {data} |")
    pformers = [e["pformer"] for e in prov if e.get("pformer") and e["pformer"].get("llm_name")]
    if pformers:
        p = pformers[0]
        lines += ["", f"P-Former (stage 0) trained for LLM `{p.get('llm_name')}` (width {p.get('llm_hidden_size')}, "
                      f"{p.get('num_query_token')} queries, BERT `{p.get('bert_model')}`)."]
    lines += [
        "",
        "## Export",
        "",
        f"- Backbones: ViT `{summary['vit_model']}`, Q-Former from `{summary['bert_model']}`, LLM `{summary['llm']}` "
        "(frozen, weights as LAVIS held them).",
        f"- Weights: {summary['dtype']} (Q-Former and query tokens float32, as transformers keeps them).",
        f"- `<image>` token id {summary['image_token_id']}: `Blip2Processor` puts {summary['num_query_tokens']} of them "
        "before the text; the model replaces them with the projected query outputs (LAVIS's sequence).",
    ]
    if summary["added_vocab_rows"]:
        lines.append(f"- The LLM's vocabulary had no free row for `<image>`: {summary['added_vocab_rows']} zero row(s) "
                     "added, which `generation_config.json` suppresses (`suppress_tokens`; pass "
                     "`generation_config=model.generation_config` as above).")
    lines += [f"- {note}" for note in summary["notes"]]
    lines += [f"- Exported {summary['date']} with lavis-pformer {summary['lavis_pformer_version']}, "
              f"LAVIS {summary['lavis_version']}, torch {summary['torch_version']}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------

def export(cfg_path, checkpoint, out_dir, options=(), dtype="fp32", max_shard_size="5GB", overwrite=False):
    """Write the transformers folder; returns a summary dict (also in ``export_provenance.json``)."""
    import lavis

    import lavis_pformer

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    max_shard_bytes = parse_size(max_shard_size)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise ExportError(f"--out {out_dir} exists and is not empty; choose another folder or pass --overwrite")

    model, model_cfg, run_cfg, preprocess = build_lavis_model(cfg_path, checkpoint, options)
    llm, tokenizer, _, decoder_only = llm_of(model)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export_hf-", dir=parent)
    try:
        with torch.no_grad():
            image_token_id, tokenizer_len = save_tokenizer(tokenizer, tmp, decoder_only)
            vision_config, vision_tensors, notes = vision_part(model, model_cfg.get("vit_model"))
            qformer_config, qformer_tensors = qformer_part(model, vision_config["hidden_size"])
            text_config, text_tensors, added = language_part(model, image_token_id)
        for note in notes:
            logging.warning("%s", note)
        num_query_tokens = int(model.query_tokens.shape[1])
        target = DTYPES[dtype]
        tensors = {}
        for name, tensor in {**vision_tensors, **qformer_tensors, **text_tensors}.items():
            tensor = tensor.detach()
            keep_fp32 = name == "query_tokens" or name.startswith("qformer.")
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float32 if keep_fp32 else target)
            tensors[name] = tensor
        config = {
            "architectures": ["Blip2ForConditionalGeneration"],
            "model_type": "blip-2",
            "num_query_tokens": num_query_tokens,
            "image_token_index": image_token_id,
            "use_decoder_only_language_model": decoder_only,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "dtype": DTYPE_NAMES[target],
            "vision_config": vision_config,
            "qformer_config": qformer_config,
            "text_config": text_config,
        }
        files = write_weights(tmp, tensors, max_shard_bytes)

        image_size = vision_config["image_size"]
        processor_cfg, processor_source = image_processor_config(run_cfg, preprocess, image_size)
        write_json(os.path.join(tmp, "preprocessor_config.json"), processor_cfg)
        write_json(os.path.join(tmp, "processor_config.json"),
                   {"processor_class": "Blip2Processor", "num_query_tokens": num_query_tokens})

        max_new_tokens = int((run_cfg.get("run") or {}).get("max_len", DEFAULT_MAX_NEW_TOKENS))
        generation = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False,
                      "pad_token_id": llm.config.pad_token_id}
        if decoder_only:
            # LAVIS's Blip2OPT ends generation at "\n" (the token it appends to every training caption). The
            # language model's own generation defaults come from text_config, so eos is set there too.
            newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
            generation.update(bos_token_id=llm.config.bos_token_id, eos_token_id=newline)
            config["text_config"]["eos_token_id"] = newline
            eos_note = f'"\\n" (token {newline}), as LAVIS\'s Blip2OPT'
        else:
            generation.update(eos_token_id=llm.config.eos_token_id,
                              decoder_start_token_id=llm.config.decoder_start_token_id)
            eos_note = f"the T5 end-of-sequence token ({llm.config.eos_token_id}), as LAVIS's Blip2T5"
        if added:
            generation["suppress_tokens"] = list(range(text_config["vocab_size"] - added, text_config["vocab_size"]))
        write_json(os.path.join(tmp, "generation_config.json"), generation)
        write_json(os.path.join(tmp, "config.json"), config)

        summary = {
            "arch": model_cfg.get("arch"),
            "llm": model_cfg.get("opt_model") if decoder_only else model_cfg.get("t5_model"),
            "vit_model": model_cfg.get("vit_model"),
            "bert_model": model_cfg.get("bert_model", "bert-base-uncased"),
            "decoder_only": decoder_only,
            "prompt": model.prompt or "",
            "image_size": image_size,
            "image_processor_source": processor_source,
            "num_query_tokens": num_query_tokens,
            "image_token_id": image_token_id,
            "tokenizer_size": tokenizer_len,
            "added_vocab_rows": added,
            "dtype": DTYPE_NAMES[target],
            "max_new_tokens": max_new_tokens,
            "eos_note": eos_note,
            "notes": notes,
            "weight_files": files,
            "num_tensors": len(tensors),
            "provenance": collect_provenance(checkpoint, run_cfg),
            "date": datetime.date.today().isoformat(),
            "lavis_pformer_version": lavis_pformer.__version__,
            "lavis_version": getattr(lavis, "__version__", "1.0.2"),
            "torch_version": torch.__version__,
        }
        write_json(os.path.join(tmp, "export_provenance.json"), summary)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(summary))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lavis_pformer.export_hf",
        description="Export a trained BLIP-2 (OPT / Flan-T5) to a transformers Blip2ForConditionalGeneration folder.",
    )
    parser.add_argument("--cfg-path", required=True,
                        help="the stage-2 or caption fine-tuning config the model was trained with")
    parser.add_argument("--checkpoint", required=True,
                        help="the run's checkpoint (checkpoint_N.pth / checkpoint_best.pth)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="weights dtype (default fp32; Q-Former and query tokens stay fp32)")
    parser.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--options", nargs="+", default=[],
                        help="override settings of the config, as key=value (e.g. model.llm_precision=fp32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = export(args.cfg_path, args.checkpoint, args.out, args.options, args.dtype, args.max_shard_size,
                         args.overwrite)
    except (ExportError, ValueError, FileNotFoundError) as e:  # user errors (config, checkpoint, paths)
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {summary['num_tensors']} tensors in {', '.join(summary['weight_files'])}, "
          f"image token {summary['image_token_id']}, {summary['num_query_tokens']} query tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
