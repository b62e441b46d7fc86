"""LAVIS's BLIP-2 parts as transformers' ``Blip2`` configs and tensor names: the EVA ViT + ``ln_vision`` as
``Blip2VisionModel``, the Q-Former as ``Blip2QFormerModel``, the frozen LLM and its projection. What transformers
cannot express is refused with an ``ExportError``."""
import math

import torch
import torch.nn as nn

from lavis_pformer.export_hf import ExportError


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
