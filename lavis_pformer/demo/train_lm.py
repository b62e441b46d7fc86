"""Train the demo's tiny OPT language model on a shapes-world text corpus, offline, on a few CPU cores.

The miniature demo has no pretrained LLM, so it trains one from scratch and then freezes it, as OPT is frozen in
the paper. Command line::

    python -m lavis_pformer.demo.train_lm --world DIR --out DIR [--steps 3000] [--layers 3]
        [--width 128] [--heads 4] [--ffn 512] [--batch-size 64] [--lr 2e-3] [--seed 0]
        [--max-offset 8] [--log-every 100] [--threads N]

Python: ``train_lm(world_dir, out_dir, ...)`` returns the report dict also written to ``out_dir/lm_report.json``.
What ``out_dir`` holds, the training and the evaluation: docs/demo.md. The parts: ``lm_data`` (tokenizer, corpus,
batches), ``lm_model`` (the model and its fast forward), ``lm_eval`` (the text ceiling).
"""
import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from lavis_pformer.demo.lm_data import ANSWER_WEIGHT, batches, build_tokenizer, encode_corpus
from lavis_pformer.demo.lm_eval import evaluate_text_ceiling, load_questions, quick_accuracy
from lavis_pformer.demo.lm_model import build_model, fast_logits
from lavis_pformer.synthetic.shapes_world import SEGMENT_SEP

Q = 8  # soft-prompt length of the demo's P-Former / Q-Former (pipeline SCALES["cpu"]["num_query_token"])


def warmup_cosine_lr(step, steps, lr, warmup_frac=0.05, floor=0.1, schedule="cosine"):
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _default_threads():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def read_corpus(world_dir):
    """The non-empty lines of the world's ``corpus.txt``."""
    with open(os.path.join(world_dir, "corpus.txt"), encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{world_dir}/corpus.txt is empty")
    return lines


def _tokenize(lines, out_dir, vocab_size, answer_weight):
    """The tokenizer trained on the corpus's segments (saved under ``out_dir``), the lines' ids and weights."""
    segments = [segment for line in lines for segment in line.split(SEGMENT_SEP)]
    tokenizer, bpe = build_tokenizer(segments, out_dir, vocab_size=vocab_size)
    ids, weights = encode_corpus(lines, bpe, tokenizer, answer_weight=answer_weight)
    return tokenizer, ids, weights


def _optimizer(model, lr, weight_decay, betas):
    """AdamW; no weight decay on biases, norms and the position embedding."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_positions" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_positions" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))


def _train_steps(model, optim, stream, steps, lr_at, log_every, quick, device, log):
    """``steps`` steps of answer-weighted next-token cross-entropy on ``stream``'s batches.

    ``lr_at(step)``: the learning rate; ``quick``: (tokenizer, items) of the first-token accuracy logged every
    ``log_every`` steps, or None. Returns (loss history, first loss, padding share of the batches).
    """
    model.train()
    history, window, window_tokens = [], 0.0, 0.0
    pad_tokens = real_tokens = 0
    first_loss = None
    t0 = time.time()
    for step in range(steps):
        inp, tgt, wgt, valid, offsets = (t.to(device) for t in next(stream))
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
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
            if quick:
                entry["quick_accuracy"] = {t: round(a, 3) for t, a in quick_accuracy(model, *quick).items()}
                msg = " first-token acc " + " ".join(f"{t} {a:.2f}" for t, a in entry["quick_accuracy"].items())
            history.append(entry)
            log(f"[train_lm] step {step + 1}/{steps} loss {mean:.4f} lr {lr_at(step):.2e} "
                f"elapsed {time.time() - t0:.1f}s{msg}")
            window = window_tokens = 0.0
    return history, first_loss, pad_tokens / max(1, pad_tokens + real_tokens)


def world_chance(world_dir, split):
    """The world's chance level on ``split`` (world.json), or None without a world.json."""
    world_path = os.path.join(world_dir, "world.json")
    if not os.path.exists(world_path):
        return None
    with open(world_path, encoding="utf-8") as f:
        return json.load(f).get(f"chance_{split}" if split != "test" else "chance")


def fit_lm(lines, out_dir, steps=3000, layers=3, width=128, heads=4, ffn=512, batch_size=64, lr=2e-3, seed=0,
           max_offset=Q, log_every=100, vocab_size=800, weight_decay=0.01, threads=None, schedule="cosine",
           warmup=0.05, betas=(0.9, 0.98), quick_items=None, answer_weight=ANSWER_WEIGHT, device="cpu", log=print):
    """Train an OPT-style LM from scratch on the text ``lines`` (a ``</s>`` in a line separates a context segment)
    and save it (tokenizer + OPTForCausalLM) under ``out_dir``; returns the training report (sizes, corpus,
    losses, times). ``quick_items``: questions whose first-token accuracy is logged (``lm_eval.load_questions``)."""
    t_start = time.time()
    threads = threads or _default_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokenizer, ids, weights = _tokenize(lines, out_dir, vocab_size, answer_weight)
        vocab = len(tokenizer)
        lengths = [len(x) for x in ids]
        # room for the longest training text at the largest offset, and at least 128 positions
        max_positions = max(128, 2 ** math.ceil(math.log2(max(lengths) + max_offset + 1)))
        model = build_model(vocab, layers, width, heads, ffn, max_positions, seed=seed).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        t_prep = time.time() - t_start
        log(f"[train_lm] {len(lines)} texts, {sum(lengths)} tokens (max {max(lengths)}), vocab {vocab}, "
            f"{n_params / 1e6:.2f}M parameters, {threads} threads, prep {t_prep:.1f}s")

        optim = _optimizer(model, lr, weight_decay, betas)
        rng = random.Random(seed)
        torch.manual_seed(seed)
        stream = batches(ids, weights, batch_size, max_offset, rng)
        quick = (tokenizer, quick_items) if quick_items else None
        t0 = time.time()
        history, first_loss, padding_share = _train_steps(
            model, optim, stream, steps, lambda step: warmup_cosine_lr(step, steps, lr, warmup, schedule=schedule),
            log_every, quick, device, log)
        t_train = time.time() - t0
        model.eval().cpu()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        return {
            "out_dir": os.path.abspath(out_dir),
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
            "padding_share": padding_share,
            "time_s": {"prepare": round(t_prep, 1), "train": round(t_train, 1)},
        }
    finally:
        torch.set_num_threads(old_threads)


def train_lm(world_dir, out_dir, steps=3000, layers=3, width=128, heads=4, ffn=512, batch_size=64, lr=2e-3,
             seed=0, max_offset=Q, log_every=100, vocab_size=800, weight_decay=0.01, threads=None,
             eval_split="val", schedule="cosine", warmup=0.05, betas=(0.9, 0.98), quick_eval=True,
             answer_weight=ANSWER_WEIGHT, device="cpu", log=print):
    """Train on the shapes world's ``corpus.txt``, save (tokenizer + OPTForCausalLM under ``out_dir``), evaluate
    the text ceiling; returns the report dict (also written to ``out_dir/lm_report.json``)."""
    t_start = time.time()
    lines = read_corpus(world_dir)
    report = fit_lm(lines, out_dir, steps=steps, layers=layers, width=width, heads=heads, ffn=ffn,
                    batch_size=batch_size, lr=lr, seed=seed, max_offset=max_offset, log_every=log_every,
                    vocab_size=vocab_size, weight_decay=weight_decay, threads=threads, schedule=schedule,
                    warmup=warmup, betas=betas, quick_items=load_questions(world_dir, eval_split) if quick_eval else None,
                    answer_weight=answer_weight, device=device, log=log)
    t1 = time.time()
    result = evaluate_text_ceiling(out_dir, world_dir, eval_split)
    report["world_dir"] = os.path.abspath(world_dir)
    report["time_s"].update(eval=round(time.time() - t1, 1), total=round(time.time() - t_start, 1))
    report.update({
        "text_ceiling": result,
        "accuracy": {t: v["accuracy"] for t, v in result["per_type"].items()},
        "overall": result["overall"],
        "overall_excl_yesno": result["overall_excl_yesno"],
        "chance": world_chance(world_dir, eval_split),
    })
    with open(os.path.join(out_dir, "lm_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    acc = " ".join(f"{t} {a:.3f}" for t, a in report["accuracy"].items())
    log(f"[train_lm] text ceiling ({eval_split}): {acc} overall {report['overall']:.3f}; "
        f"with the caption before the bos: overall {result['context']['overall']:.3f}; "
        f"train {report['time_s']['train']:.1f}s, total {report['time_s']['total']:.1f}s")
    return report


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
