"""Train the demo's frozen encoder-decoder LM, a small T5, on a shapes-world text corpus, offline, on one CPU thread.

It stands for Flan-T5 in the paper's Table 5 as the OPT of ``train_lm`` stands for OPT. Command line::

    python -m lavis_pformer.demo.t5_lm --world DIR --out DIR [--steps 1500] [--layers 2] [--width 128]
        [--heads 8] [--ffn 256] [--batch-size 64] [--lr 2e-3] [--position-lr-scale 50] [--qa-share 0.5]
        [--seed 0] [--threads 1]

Python: ``train_t5(world_dir, out_dir, ...)`` returns the report also written to ``out_dir/t5_report.json``.
``out_dir`` holds T5's sentencepiece tokenizer (slow and fast) and a ``T5ForConditionalGeneration`` saved with
``save_pretrained``: LAVIS's ``Blip2T5`` (``t5_model: out_dir``) and ``pformer_t5`` load it. The examples:
``t5_data``; the evaluation: ``t5_eval``; docs/demo.md.
"""
import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from lavis_pformer.demo.t5_data import ANSWER_WEIGHT, batches, build_tokenizer, encoder_ids, pad, read_records
from lavis_pformer.demo.t5_eval import evaluate_t5, question_items
from lavis_pformer.demo.train_lm import warmup_cosine_lr, world_chance
from lavis_pformer.text import QA_PROMPT


def build_model(vocab_size, layers, width, heads, ffn, seed=0):
    """A Flan-T5-shaped model (gated GELU, untied LM head, no dropout), ``layers`` encoder and decoder blocks.

    ``dense_act_fn`` is "gelu", the activation ``Blip2T5`` sets when it loads a T5. The LM head starts at std
    ``width ** -0.5``, so that the first logits are of order 1: T5's own init (std 1) makes them about
    ``width ** 0.5`` and suits Adafactor's relative steps, not AdamW's.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=width // heads, d_ff=ffn, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    config.dense_act_fn = "gelu"
    model = T5ForConditionalGeneration(config)
    torch.nn.init.normal_(model.lm_head.weight, std=width ** -0.5)
    return model


def adamw(model, lr, weight_decay, position_lr_scale):
    """AdamW; no weight decay on norms and position biases; the relative position biases at ``position_lr_scale``
    times the learning rate.

    Under Adam a parameter moves by about the learning rate per step at most, and a head attends to a fixed
    neighbour (the previous word: what reading "red circle" needs) only once its bias is several units large:
    thousands of steps at 2e-3, while T5's other weights are small and learn in relative steps.
    """
    position = [p for n, p in model.named_parameters() if "relative_attention_bias" in n]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "relative_attention_bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
                              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
                              {"params": position, "weight_decay": 0.0, "lr_scale": position_lr_scale}],
                             lr=lr, betas=(0.9, 0.98))


def weighted_loss(model, input_ids, attention_mask, labels, weights):
    """Cross-entropy of the decoder's targets, each token weighted (0 at padding): sum(w * nll) / sum(w)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   decoder_input_ids=model._shift_right(labels)).logits
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    w = weights.flatten()
    return (nll * w).sum() / w.sum()


@torch.no_grad()
def first_token_accuracy(model, tokenizer, items, batch_size=256):
    """Per-type share of questions whose answer's first token is T5's argmax first output (for training logs)."""
    was_training = model.training
    model.eval()
    hits = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rows = encoder_ids(tokenizer, [it["caption"] for it in chunk], [QA_PROMPT.format(it["question"]) for it in chunk])
        ids = pad(rows, tokenizer.pad_token_id)
        start_ids = torch.full((len(chunk), 1), model.config.decoder_start_token_id, dtype=torch.long)
        logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                       decoder_input_ids=start_ids).logits[:, 0]
        firsts = tokenizer([it["answer"] for it in chunk], add_special_tokens=False).input_ids
        for it, p, t in zip(chunk, logits.argmax(-1).tolist(), firsts):
            hits.setdefault(it["question_type"], []).append(p == t[0])
    model.train(was_training)
    return {t: sum(h) / len(h) for t, h in hits.items()}


def train_steps(model, optim, stream, steps, lr_at, log_every, quick, log):
    """``steps`` steps of ``weighted_loss`` on ``stream``; ``quick``: (tokenizer, val items) logged every
    ``log_every`` steps, or None. Returns (loss history, first loss)."""
    model.train()
    history, window, count, first_loss = [], 0.0, 0, None
    t0 = time.time()
    for step in range(steps):
        batch = next(stream)
        for group in optim.param_groups:
            group["lr"] = lr_at(step) * group["lr_scale"]
        loss = weighted_loss(model, *batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        window, count = window + value, count + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "loss": round(window / count, 4), "elapsed_s": round(time.time() - t0, 1)}
            msg = ""
            if quick:
                entry["first_token_accuracy"] = {t: round(a, 3) for t, a in first_token_accuracy(model, *quick).items()}
                msg = " first-token acc " + " ".join(f"{t} {a:.2f}" for t, a in entry["first_token_accuracy"].items())
            history.append(entry)
            log(f"[t5_lm] step {step + 1}/{steps} loss {entry['loss']:.4f} lr {lr_at(step):.2e} "
                f"elapsed {entry['elapsed_s']:.1f}s{msg}")
            window, count = 0.0, 0
    return history, first_loss


def train_t5(world_dir, out_dir, steps=1500, layers=2, width=128, heads=8, ffn=256, batch_size=64, lr=2e-3,
             qa_share=0.5, seed=0, vocab_size=160, weight_decay=0.01, warmup=0.05, position_lr_scale=50.0,
             answer_weight=ANSWER_WEIGHT,
             threads=1, log_every=250, eval_split="val", quick_eval=True, log=print):
    """Train, save (tokenizer + T5ForConditionalGeneration under ``out_dir``), evaluate; returns the report."""
    t_start, cpu_start = time.time(), time.process_time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        records = read_records(world_dir)
        tokenizer = build_tokenizer(records, out_dir, vocab_size)
        model = build_model(len(tokenizer), layers, width, heads, ffn, seed=seed)
        n_params = sum(p.numel() for p in model.parameters())
        t_prep = time.time() - t_start
        log(f"[t5_lm] {len(records)} texts, vocab {len(tokenizer)}, {n_params / 1e6:.2f}M parameters, "
            f"{threads} thread(s), prep {t_prep:.1f}s")
        optim = adamw(model, lr, weight_decay, position_lr_scale)
        rng = random.Random(seed)
        stream = batches(records, tokenizer, batch_size, qa_share, rng, answer_weight)
        quick = (tokenizer, question_items(world_dir, eval_split)) if quick_eval else None
        t0 = time.time()
        history, first_loss = train_steps(model, optim, stream, steps,
                                          lambda step: warmup_cosine_lr(step, steps, lr, warmup), log_every, quick, log)
        t_train = time.time() - t0
        model.eval()
        model.save_pretrained(out_dir)
        t1 = time.time()
        result = evaluate_t5(out_dir, world_dir, eval_split)
        t_eval = time.time() - t1
        ceiling = result["text_ceiling"]
        report = {
            "out_dir": os.path.abspath(out_dir), "world_dir": os.path.abspath(world_dir),
            "steps": steps, "batch_size": batch_size, "lr": lr, "position_lr_scale": position_lr_scale,
            "qa_share": qa_share, "seed": seed,
            "threads": threads,
            "sizes": {"layers": layers, "width": width, "heads": heads, "ffn": ffn, "vocab_size": len(tokenizer),
                      "parameters": n_params},
            "corpus": {"texts": len(records), "with_question": sum(r.question is not None for r in records),
                       "with_context": sum(r.context for r in records), "answer_weight": answer_weight},
            "loss_first": first_loss,
            "loss_last": history[-1]["loss"] if history else None,
            "loss_history": history,
            "time_s": {"prepare": round(t_prep, 1), "train": round(t_train, 1), "eval": round(t_eval, 1),
                       "total": round(time.time() - t_start, 1),
                       "cpu_total": round(time.process_time() - cpu_start, 1)},
            "text_ceiling": ceiling,
            "accuracy": {t: v["accuracy"] for t, v in ceiling["per_type"].items()},
            "overall": ceiling["overall"],
            "overall_excl_yesno": ceiling["overall_excl_yesno"],
            "caption_continuation": result["caption_continuation"],
            "chance": world_chance(world_dir, eval_split),
        }
        with open(os.path.join(out_dir, "t5_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        acc = " ".join(f"{t} {a:.3f}" for t, a in report["accuracy"].items())
        cont = result["caption_continuation"]
        log(f"[t5_lm] text ceiling ({eval_split}, caption first): {acc}; colour+shape+count "
            f"{report['overall_excl_yesno']:.3f}; captions continued exactly: {cont['empty_prefix']:.3f} from an "
            f"empty prefix, {cont['prefix']:.3f} after a prefix; train {t_train:.1f}s, total "
            f"{report['time_s']['total']:.1f}s")
        return report
    finally:
        torch.set_num_threads(old_threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="shapes-world folder (corpus.txt, vqa_val.json, ...)")
    ap.add_argument("--out", required=True, help="output folder for the tokenizer, model and t5_report.json")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--layers", type=int, default=2, help="encoder blocks (and as many decoder blocks)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--qa-share", type=float, default=0.5, help="share of question lines trained as QA examples")
    ap.add_argument("--position-lr-scale", type=float, default=50.0,
                    help="learning-rate factor of the relative position biases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=160)
    ap.add_argument("--answer-weight", type=float, default=ANSWER_WEIGHT, help="loss weight of answer tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--eval-split", default="val", choices=["val", "test"])
    ap.add_argument("--no-quick-eval", action="store_true", help="skip the first-token accuracy in the logs")
    args = ap.parse_args(argv)
    report = train_t5(args.world, args.out, steps=args.steps, layers=args.layers, width=args.width, heads=args.heads,
                      ffn=args.ffn, batch_size=args.batch_size, lr=args.lr, qa_share=args.qa_share, seed=args.seed,
                      position_lr_scale=args.position_lr_scale,
                      vocab_size=args.vocab_size, answer_weight=args.answer_weight, threads=args.threads,
                      log_every=args.log_every, eval_split=args.eval_split, quick_eval=not args.no_quick_eval)
    print(json.dumps({k: report[k] for k in ("accuracy", "overall_excl_yesno", "caption_continuation", "time_s")},
                     indent=1))


if __name__ == "__main__":
    main()
