"""Train the demo's tiny OPT language model on a shapes-world text corpus, offline, on a few CPU cores.

The miniature demo has no pretrained LLM, so it trains one from scratch and then freezes it, as OPT is
frozen in the paper. Command line::

    python -m lavis_pformer.demo.train_lm --world DIR --out DIR [--steps 3000] [--layers 3]
        [--width 128] [--heads 4] [--ffn 512] [--batch-size 64] [--lr 2e-3] [--seed 0]
        [--max-offset 8] [--log-every 100] [--threads N]

Python: ``train_lm(world_dir, out_dir, ...)`` returns the report dict also written to
``out_dir/lm_report.json``.

What ``out_dir`` holds
----------------------
An OPT-style slow tokenizer (``GPT2Tokenizer``: ``</s>`` is bos and eos, ``<pad>`` is id 1, a bos is
prepended to every text, ``"\\n"`` is a single token, as BLIP-2 OPT uses it as end of text) over a
byte-level BPE trained on the world's ``corpus.txt``, and a ``transformers`` ``OPTForCausalLM``
(``word_embed_proj_dim == hidden_size``), both saved with ``save_pretrained``: LAVIS loads them with
``lavis.models.blip2_models.modeling_opt.OPTForCausalLM.from_pretrained(out_dir)`` and
``AutoTokenizer.from_pretrained(out_dir, use_fast=False)`` (the evaluation below loads them that way).

Training
--------
- Texts: each corpus line, as ``</s>`` + line + ``"\\n"`` (a line with a context segment,
  ``context</s>text``, as ``</s>`` + context + ``</s>`` + text + ``"\\n"``); next-token cross-entropy on every token,
  answer tokens (the words after ``"Short answer:"``, up to ``"."`` or the end of the line) weighted x3.
- Position offsets: at use time BLIP-2 puts Q soft-prompt vectors before the text, so the text sits at
  positions Q..Q+T of OPT's learned absolute position embedding. Every training text therefore starts
  at a random position, uniform in 0..``max_offset`` (its positions are shifted; nothing is put
  before it: a prefix of attended random tokens, tried first, delayed learning to read the context),
  and the LM works with and without a prefix.
- Speed: padding is only ever on the right (so a plain causal mask is exact and positions are the
  row's offset + 0..T-1), and the forward pass runs the model's own modules with
  ``scaled_dot_product_attention`` on the real tokens only (``fast_logits``; it matches
  ``OPTForCausalLM.forward``, see tests/test_demo_lm.py).
- AdamW, linear warm-up over the first 5% of the steps then cosine decay to 10% of ``lr``, gradient
  clipping at 1, no dropout.

Evaluation ("answering from a textual scene", the ceiling of the image side)
---------------------------------------------------------------------------
For each question of the world's val split, ``"<caption> Question: <q> Short answer:"`` (the caption
of its image from captions_val.json) is fed to the saved model (loaded through LAVIS), greedy, at most
3 new tokens, ``"\\n"`` ends the answer. The prediction is the generated text up to the first ``"\\n"``
or ``"."``, stripped, and scored as the image side's answers are (``vqa_scores``: LAVIS's answer
normalisation). Accuracy per question type (color, shape, count, yesno), overall, overall without
yes/no, the share of predictions inside their type's answer set (``on_type``), and the same with the
caption as a context segment before the bos (``context``: ``"<caption></s>Question: <q> Short answer:"``,
the layout the image side produces, its soft prompt standing where the caption stands here).
"""
import argparse
import json
import math
import os
import random
import re
import time

import torch
import torch.nn.functional as F

from lavis_pformer.demo.vqa_scores import score_answers
from lavis_pformer.synthetic.shapes_world import SEGMENT_SEP
from lavis_pformer.text import QA_PROMPT

Q = 8  # soft-prompt length of the demo's P-Former / Q-Former (pipeline SCALES["cpu"]["num_query_token"])
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: <s>=0, <pad>=1, </s>=2 (bos = eos), <unk>=3
PAD_ID, BOS_ID = 1, 2
ANSWER_WEIGHT = 3.0
ANSWER_CUE = QA_PROMPT.split("{}")[1].strip()  # "Short answer:"
_ANSWER_RE = re.compile(re.escape(ANSWER_CUE) + r"( [^.\n]*)")  # an answer: up to "." or the end of the line


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

def build_tokenizer(lines, out_dir, vocab_size=800):
    """Train a byte-level BPE on ``lines`` and save it as OPT's slow tokenizer under ``out_dir``.

    Returns (slow GPT2Tokenizer, fast ``tokenizers`` ByteLevelBPETokenizer with the same vocabulary,
    used to encode the corpus quickly with character offsets).
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    os.makedirs(out_dir, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS)
    bpe.save_model(out_dir)
    tokenizer = GPT2Tokenizer(
        os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
        bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>", add_bos_token=True,
    )
    tokenizer.save_pretrained(out_dir)
    assert tokenizer.pad_token_id == PAD_ID and tokenizer.bos_token_id == BOS_ID
    assert len(tokenizer("\n", add_special_tokens=False).input_ids) == 1, "'\\n' must be one token"
    return tokenizer, bpe


def encode_corpus(lines, bpe, tokenizer, check=64, answer_weight=ANSWER_WEIGHT):
    """Token ids and per-token loss weights of every line: ``</s>`` + segment for each of the line's
    ``</s>``-separated segments, then ``"\\n"`` (a line without a separator is one segment).

    The weight of token i is the weight of predicting it (``answer_weight`` for answer tokens, else 1);
    the segments of the first ``check`` lines are also encoded with the slow tokenizer, which must agree.
    """
    segments = [line.split(SEGMENT_SEP) for line in lines]
    texts = [seg + ("\n" if i == len(segs) - 1 else "") for segs in segments for i, seg in enumerate(segs)]
    encodings = iter(bpe.encode_batch(texts))
    pieces = iter(texts)
    ids, weights = [], []
    for segs in segments:
        line_ids, line_weights = [], []
        for _ in segs:
            text, enc = next(pieces), next(encodings)
            spans = [(m.start(1), m.end(1)) for m in _ANSWER_RE.finditer(text)]
            line_weights.append(1.0)  # the bos: never a target in the first segment, predicted after a context
            for start, end in enc.offsets:
                line_weights.append(answer_weight if any(start < e and end > s for s, e in spans) else 1.0)
            line_ids += [BOS_ID] + enc.ids
        ids.append(line_ids)
        weights.append(line_weights)
    for text in texts[:check]:
        slow = tokenizer(text).input_ids
        fast = [BOS_ID] + bpe.encode(text).ids
        if slow != fast:
            raise AssertionError(f"fast and slow tokenizers disagree on {text!r}: {fast} vs {slow}")
    return ids, weights


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------

def batches(ids, weights, batch_size, max_offset, rng):
    """Endless stream of (input_ids, targets, weights, valid, offsets) batches in random order.

    input_ids / targets / weights / valid are [B, T]; offsets [B] is each text's first position, uniform in
    0..max_offset. Rows are right-padded; ``valid`` marks the text. Position t's target is token t+1;
    padding has weight 0. Batches are not bucketed by length (in this corpus length goes with content: a
    batch of short texts would hold no questions); ``fast_logits`` makes the padding nearly free instead.
    """
    n = len(ids)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            members = order[start : start + batch_size]
            T = max(len(ids[i]) for i in members) - 1  # inputs drop the last token
            inp = torch.full((len(members), T), PAD_ID, dtype=torch.long)
            tgt = torch.full((len(members), T), PAD_ID, dtype=torch.long)
            wgt = torch.zeros((len(members), T))
            valid = torch.zeros((len(members), T), dtype=torch.bool)
            for r, i in enumerate(members):
                seq = ids[i]
                inp[r, : len(seq) - 1] = torch.tensor(seq[:-1])
                tgt[r, : len(seq) - 1] = torch.tensor(seq[1:])
                wgt[r, : len(seq) - 1] = torch.tensor(weights[i][1:])
                valid[r, : len(seq) - 1] = True
            offsets = torch.tensor([rng.randint(0, max_offset) for _ in members], dtype=torch.long)
            yield inp, tgt, wgt, valid, offsets


def warmup_cosine_lr(step, steps, lr, warmup_frac=0.05, floor=0.1, schedule="cosine"):
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

def _load_split(world_dir, split):
    with open(os.path.join(world_dir, f"vqa_{split}.json"), encoding="utf-8") as f:
        questions = json.load(f)
    with open(os.path.join(world_dir, f"captions_{split}.json"), encoding="utf-8") as f:
        captions = {str(r["image_id"]): r["caption"] for r in json.load(f)}
    # the caption before the question, and as a context segment before the bos (where the image side puts its
    # soft prompt)
    return [
        {"prompt": captions[str(q["image_id"])] + " " + QA_PROMPT.format(q["question"]),
         "context_prompt": captions[str(q["image_id"])] + SEGMENT_SEP + QA_PROMPT.format(q["question"]),
         "answer": q["answer"][0] if isinstance(q["answer"], list) else q["answer"],
         "question_type": q["question_type"]}
        for q in questions
    ]


@torch.no_grad()
def quick_accuracy(model, tokenizer, items, batch_size=256):
    """Per-type accuracy of the argmax first answer token (one forward pass; for training logs)."""
    was_training = model.training
    model.eval()
    hits = {}
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            enc = [encode_segments(tokenizer, it["prompt"]) for it in chunk]
            T = max(len(e) for e in enc)
            inp = torch.full((len(chunk), T), PAD_ID, dtype=torch.long)
            select = torch.zeros((len(chunk), T), dtype=torch.bool)
            valid = torch.zeros((len(chunk), T), dtype=torch.bool)
            for r, e in enumerate(enc):
                inp[r, : len(e)] = torch.tensor(e)
                valid[r, : len(e)] = True
                select[r, len(e) - 1] = True
            device = model.lm_head.weight.device
            pred = fast_logits(model, inp.to(device), valid=valid.to(device), select=select.to(device))
            pred = pred.argmax(-1).tolist()
            for it, p in zip(chunk, pred):
                hits.setdefault(it["question_type"], []).append(clean_answer(tokenizer.decode([p])) == it["answer"])
    finally:
        model.train(was_training)
    return {t: sum(h) / len(h) for t, h in hits.items()}


def clean_answer(text):
    """The predicted answer in generated text: up to the first newline or full stop, stripped."""
    return text.split("\n")[0].split(".")[0].strip()


def encode_segments(tokenizer, text):
    """Token ids of ``text`` as the LM was trained on it: bos + ids of each ``</s>``-separated segment."""
    ids = []
    for segment in text.split(SEGMENT_SEP):
        ids += [tokenizer.bos_token_id] + tokenizer(segment, add_special_tokens=False).input_ids
    return ids


@torch.no_grad()
def answer_questions(model, tokenizer, prompts, batch_size=128, max_new_tokens=3):
    """Greedy answers (LAVIS-style ``generate``: left padding, ``"\\n"`` ends) for text prompts."""
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    answers = []
    for start in range(0, len(prompts), batch_size):
        rows = [encode_segments(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r)
            attention_mask[i, width - len(r):] = 1
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, eos_token_id=newline, pad_token_id=tokenizer.pad_token_id,
        )
        answers += [clean_answer(t) for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return answers


def evaluate_text_ceiling(out_dir, world_dir, split="val"):
    """Load the saved LM through LAVIS and answer ``split``'s questions from the caption text, with the caption
    in the question's segment and (``context``) as a context segment before the bos."""
    from transformers import AutoTokenizer

    from lavis.models.blip2_models.modeling_opt import OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out_dir, use_fast=False)
    model = OPTForCausalLM.from_pretrained(out_dir).eval()
    items = _load_split(world_dir, split)
    answer_sets = {}
    world_path = os.path.join(world_dir, "world.json")
    if os.path.exists(world_path):
        with open(world_path, encoding="utf-8") as f:
            answer_sets = json.load(f).get("answers", {})

    def score(prompt_key):
        predictions = answer_questions(model, tokenizer, [it[prompt_key] for it in items])
        return score_answers([(it["question_type"], p, it["answer"]) for it, p in zip(items, predictions)],
                             answer_sets)

    result = score("prompt")
    result["split"] = split
    result["context"] = score("context_prompt")
    return result


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def _default_threads():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def train_lm(world_dir, out_dir, steps=3000, layers=3, width=128, heads=4, ffn=512, batch_size=64, lr=2e-3,
             seed=0, max_offset=Q, log_every=100, vocab_size=800, weight_decay=0.01, threads=None,
             eval_split="val", schedule="cosine", warmup=0.05, betas=(0.9, 0.98), quick_eval=True,
             answer_weight=ANSWER_WEIGHT, device="cpu", log=print):
    """Train, save (tokenizer + OPTForCausalLM under ``out_dir``), evaluate; returns the report dict."""
    t_start = time.time()
    threads = threads or _default_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with open(os.path.join(world_dir, "corpus.txt"), encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        if not lines:
            raise ValueError(f"{world_dir}/corpus.txt is empty")
        segments = [segment for line in lines for segment in line.split(SEGMENT_SEP)]
        tokenizer, bpe = build_tokenizer(segments, out_dir, vocab_size=vocab_size)
        ids, weights = encode_corpus(lines, bpe, tokenizer, answer_weight=answer_weight)
        vocab = len(tokenizer)
        lengths = [len(x) for x in ids]
        # room for the longest training text at the largest offset, and at least 128 positions
        max_positions = max(128, 2 ** math.ceil(math.log2(max(lengths) + max_offset + 1)))
        model = build_model(vocab, layers, width, heads, ffn, max_positions, seed=seed).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        t_prep = time.time() - t_start
        log(f"[train_lm] {len(lines)} texts, {sum(lengths)} tokens (max {max(lengths)}), vocab {vocab}, "
            f"{n_params / 1e6:.2f}M parameters, {threads} threads, prep {t_prep:.1f}s")

        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_positions" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_positions" not in n)]
        optim = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))
        rng = random.Random(seed)
        torch.manual_seed(seed)
        stream = batches(ids, weights, batch_size, max_offset, rng)
        quick_items = _load_split(world_dir, eval_split) if quick_eval else None
        model.train()
        history, window, window_tokens = [], 0.0, 0.0
        pad_tokens = real_tokens = 0
        first_loss = None
        t0 = time.time()
        for step in range(steps):
            inp, tgt, wgt, valid, offsets = (t.to(device) for t in next(stream))
            for group in optim.param_groups:
                group["lr"] = warmup_cosine_lr(step, steps, lr, warmup, schedule=schedule)
            select = wgt > 0
            logits = fast_logits(model, inp, valid=valid, select=select, offsets=offsets)
            w = wgt[select]
            nll = F.cross_entropy(logits, tgt[select], reduction="none")
            loss = (nll * w).sum() / w.sum()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            value = loss.item()
            if first_loss is None:
                first_loss = value
            window += value
            window_tokens += 1
            real_tokens += int(valid.sum())
            pad_tokens += int((~valid).sum())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                mean = window / window_tokens
                entry = {"step": step + 1, "loss": round(mean, 4), "elapsed_s": round(time.time() - t0, 1)}
                msg = ""
                if quick_items:
                    entry["quick_accuracy"] = {t: round(a, 3) for t, a in
                                               quick_accuracy(model, tokenizer, quick_items).items()}
                    msg = " first-token acc " + " ".join(f"{t} {a:.2f}" for t, a in entry["quick_accuracy"].items())
                history.append(entry)
                log(f"[train_lm] step {step + 1}/{steps} loss {mean:.4f} "
                    f"lr {warmup_cosine_lr(step, steps, lr, warmup, schedule=schedule):.2e} elapsed {time.time() - t0:.1f}s{msg}")
                window = window_tokens = 0.0
        t_train = time.time() - t0
        model.eval().cpu()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

        t1 = time.time()
        result = evaluate_text_ceiling(out_dir, world_dir, eval_split)
        t_eval = time.time() - t1
        chance = None
        world_path = os.path.join(world_dir, "world.json")
        if os.path.exists(world_path):
            with open(world_path, encoding="utf-8") as f:
                chance = json.load(f).get(f"chance_{eval_split}" if eval_split != "test" else "chance")
        report = {
            "out_dir": os.path.abspath(out_dir),
            "world_dir": os.path.abspath(world_dir),
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "max_offset": max_offset,
            "threads": threads,
            "device": str(device),
            "sizes": {"layers": layers, "width": width, "heads": heads, "ffn": ffn, "vocab_size": vocab,
                      "max_position_embeddings": max_positions, "parameters": n_params},
            "corpus": {"texts": len(lines), "tokens": sum(lengths), "max_tokens": max(lengths),
                       "answer_weight": answer_weight},
            "loss_first": first_loss,
            "loss_last": history[-1]["loss"] if history else None,
            "loss_history": history,
            "padding_share": pad_tokens / max(1, pad_tokens + real_tokens),
            "time_s": {"prepare": round(t_prep, 1), "train": round(t_train, 1), "eval": round(t_eval, 1),
                       "total": round(time.time() - t_start, 1)},
            "text_ceiling": result,
            "accuracy": {t: v["accuracy"] for t, v in result["per_type"].items()},
            "overall": result["overall"],
            "overall_excl_yesno": result["overall_excl_yesno"],
            "chance": chance,
        }
        with open(os.path.join(out_dir, "lm_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        acc = " ".join(f"{t} {a:.3f}" for t, a in report["accuracy"].items())
        log(f"[train_lm] text ceiling ({eval_split}): {acc} overall {report['overall']:.3f}; "
            f"with the caption before the bos: overall {result['context']['overall']:.3f}; "
            f"train {t_train:.1f}s, total {report['time_s']['total']:.1f}s")
        return report
    finally:
        torch.set_num_threads(old_threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="shapes-world folder (corpus.txt, vqa_val.json, ...)")
    ap.add_argument("--out", required=True, help="output folder for the tokenizer, model and lm_report.json")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-offset", type=int, default=Q, help=f"largest random position offset (default Q={Q})")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--vocab-size", type=int, default=800)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the available cores)")
    ap.add_argument("--eval-split", default="val", choices=["val", "test"])
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                    help="after a linear warm-up: cosine decay to 10%% of --lr, or constant")
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up share of the steps")
    ap.add_argument("--beta2", type=float, default=0.98)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--answer-weight", type=float, default=ANSWER_WEIGHT, help="loss weight of answer tokens")
    ap.add_argument("--no-quick-eval", action="store_true", help="skip the first-token accuracy in the logs")
    ap.add_argument("--device", default="cpu", help="torch device of the training (cpu, cuda)")
    args = ap.parse_args(argv)
    report = train_lm(args.world, args.out, steps=args.steps, layers=args.layers, width=args.width,
                      heads=args.heads, ffn=args.ffn, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      max_offset=args.max_offset, log_every=args.log_every, vocab_size=args.vocab_size,
                      threads=args.threads, eval_split=args.eval_split, schedule=args.schedule,
                      warmup=args.warmup, betas=(0.9, args.beta2), weight_decay=args.weight_decay,
                      quick_eval=not args.no_quick_eval, answer_weight=args.answer_weight, device=args.device)
    print(json.dumps({k: report[k] for k in ("accuracy", "overall", "overall_excl_yesno", "time_s")}, indent=1))


if __name__ == "__main__":
    main()
