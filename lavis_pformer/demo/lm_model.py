"""The demo LM: a ``transformers`` ``OPTForCausalLM`` and a fast forward pass for right-padded batches."""
import torch
import torch.nn.functional as F

from lavis_pformer.demo.lm_data import BOS_ID, PAD_ID


def build_model(vocab_size, layers, width, heads, ffn, max_positions, seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        ffn_dim=ffn, max_position_embeddings=max_positions, word_embed_proj_dim=width,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=BOS_ID, do_layer_norm_before=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
    )
    return OPTForCausalLM(config)


def fast_logits(model, input_ids=None, inputs_embeds=None, valid=None, select=None, offsets=None):
    """OPT's forward for right-padded batches whose real tokens are all attended, using the model's modules.

    Positions are 0..T-1 (what OPT derives from the attention mask when only right padding is masked)
    plus ``offsets`` ([B] long, default 0) per row; attention is causal (right padding never reaches
    real tokens). ``valid`` ([B, T] bool, a prefix of each row; default all) marks the real tokens:
    embeddings, projections, feed-forward layers and the LM head run on those tokens only, packed, and
    only attention sees the padded [B, T] layout, so padding costs little. ``select`` ([B, T] bool,
    inside ``valid``) keeps only those positions' logits, returned flat [N, V] in row-major order;
    otherwise logits are [B, T, V] (zero at padding).
    """
    decoder = model.model.decoder
    cfg = model.config
    B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    if valid is None:
        valid = torch.ones((B, T), dtype=torch.bool, device=(input_ids if input_ids is not None else inputs_embeds).device)
    if inputs_embeds is None:
        h = decoder.embed_tokens(input_ids[valid])
    else:
        h = inputs_embeds[valid]
    if decoder.project_in is not None:
        h = decoder.project_in(h)
    H = h.shape[-1]
    positions = torch.arange(T, device=h.device).expand(B, T)
    if offsets is not None:
        positions = positions + offsets.to(h.device)[:, None]
    positions = positions[valid]
    h = h + decoder.embed_positions.weight[positions + decoder.embed_positions.offset]
    nh = cfg.num_attention_heads
    hd = H // nh
    drop = model.training
    for layer in decoder.layers:
        attn = layer.self_attn
        x = layer.self_attn_layer_norm(h) if layer.do_layer_norm_before else h
        qkv = h.new_zeros((B, T, 3 * H))
        qkv[valid] = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        q, k, v = qkv.view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=attn.dropout if drop else 0.0,
                                           scale=attn.scaling)
        o = attn.out_proj(o.transpose(1, 2).reshape(B, T, H)[valid])
        h = h + F.dropout(o, p=layer.dropout, training=drop)
        if not layer.do_layer_norm_before:
            h = layer.self_attn_layer_norm(h)
        x = layer.final_layer_norm(h) if layer.do_layer_norm_before else h
        x = layer.fc2(layer.activation_fn(layer.fc1(x)))
        h = h + F.dropout(x, p=layer.dropout, training=drop)
        if not layer.do_layer_norm_before:
            h = layer.final_layer_norm(h)
    if select is not None:
        h = h[select[valid]]
    if decoder.final_layer_norm is not None:
        h = decoder.final_layer_norm(h)
    if decoder.project_out is not None:
        h = decoder.project_out(h)
    logits = model.lm_head(h)
    if select is not None:
        return logits
    out = logits.new_zeros((B, T, logits.shape[-1]))
    out[valid] = logits
    return out
