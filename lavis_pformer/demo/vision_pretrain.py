"""Pretrain the demo's tiny ViT on unpaired shapes-world images, before it is frozen in stages 1 and 2.

BLIP-2 and P-Former keep a *pretrained* image encoder (EVA-CLIP ViT-g) frozen; its patch tokens describe
what lies in their part of the image. Offline there is no such encoder, so the demo pretrains
``custom_vit`` on the world's ``vision_pretrain.json`` images (scenes of the training pool, no captions)
to the same end: every patch token names the colour and shape of the object in its quadrant (or "empty")
and which quadrant it lies in, through linear heads on the token. Only the ViT is kept. Command line::

    python -m lavis_pformer.demo.vision_pretrain --world DIR --out vit.pth [--patch-size 16] [--embed-dim 128]
        [--depth 2] [--num-heads 4] [--steps 300] [--batch-size 64] [--lr 2e-3] [--seed 0] [--threads N]

Python: ``pretrain_vit(world_dir, out_path, vit_config, ...)`` writes ``out_path`` (the ViT's state dict, the
``vit_config.checkpoint`` of every stage) and ``<out_path>.json`` (losses and the val images' per-token
accuracy), and returns that report.
"""
import argparse
import json
import os
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lavis_pformer.synthetic.shapes_world import COLOURS, IMAGE_SIZE, SHAPES
from lavis_pformer.demo.train_lm import warmup_cosine_lr

COLOUR_IDS = {c: i + 1 for i, c in enumerate(COLOURS)}  # 0 = empty quadrant
SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}


def load_images(world_dir, records):
    """[N, 3, 32, 32] tensors through LAVIS's ``blip_image_eval`` processor (what the stages feed the ViT)."""
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    from lavis_pformer.datasets.local_image_text import load_rgb_image

    proc = BlipImageEvalProcessor(image_size=IMAGE_SIZE)
    return torch.stack([proc(load_rgb_image(os.path.join(world_dir, r["image"]))) for r in records])


def quadrant_labels(records):
    """(colour [N, 4], shape [N, 4]) class ids per quadrant (0 = empty)."""
    colour = torch.zeros(len(records), 4, dtype=torch.long)
    shape = torch.zeros(len(records), 4, dtype=torch.long)
    for i, r in enumerate(records):
        for quadrant, c, s in r["objects"]:
            colour[i, quadrant], shape[i, quadrant] = COLOUR_IDS[c], SHAPE_IDS[s]
    return colour, shape


def token_quadrants(grid):
    """[grid * grid] quadrant index of each patch token, in the world's reading order (0 = top left)."""
    rows = torch.arange(grid * grid) // grid
    cols = torch.arange(grid * grid) % grid
    return (rows >= grid // 2).long() * 2 + (cols >= grid // 2).long()


class TokenHeads(nn.Module):
    """Per patch token: logits of its quadrant's colour [B, P, 7], shape [B, P, 4] and quadrant [B, P, 4]
    from ViT tokens [B, 1 + P, D] (the [CLS] token is not read)."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.quadrant = nn.Linear(width, 4)

    def forward(self, tokens):
        h = self.norm(tokens[:, 1:])
        return self.colour(h), self.shape(h), self.quadrant(h)


def token_targets(colour, shape, quadrants):
    """Targets [B, P] of every patch token: its quadrant's colour and shape ids, and the quadrant."""
    return colour[:, quadrants], shape[:, quadrants], quadrants.expand(colour.size(0), -1)


def token_loss(heads, tokens, colour, shape, quadrants):
    """Sum of the three cross-entropies over every patch token."""
    logits = heads(tokens)
    return sum(F.cross_entropy(x.flatten(0, 1), t.flatten())
               for x, t in zip(logits, token_targets(colour, shape, quadrants)))


@torch.no_grad()
def token_accuracy(vit, heads, images, colour, shape, quadrants, batch_size=256):
    """Share of patch tokens whose quadrant colour (resp. shape, both, quadrant) is predicted right."""
    vit.eval()
    hits, n = torch.zeros(4), 0
    for start in range(0, len(images), batch_size):
        c, s, q = (x.argmax(-1) for x in heads(vit(images[start : start + batch_size])))
        tc, ts, tq = token_targets(colour[start : start + batch_size], shape[start : start + batch_size], quadrants)
        c_ok, s_ok = c == tc, s == ts
        hits += torch.stack([c_ok.sum(), s_ok.sum(), (c_ok & s_ok).sum(), (q == tq).sum()]).float().cpu()
        n += tc.numel()
    vit.train()
    return dict(zip(("colour", "shape", "both", "quadrant"), (hits / n).tolist()))


def pretrain_vit(world_dir, out_path, vit_config, steps=300, batch_size=64, lr=2e-3, seed=0, threads=None,
                 log_every=50, device="cpu", log=print):
    """Train ``custom_vit(32, vit_config)`` + token heads; save the ViT's weights; return the report."""
    from lavis_pformer.backbones import custom_vit

    t_start = time.time()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with open(os.path.join(world_dir, "vision_pretrain.json"), encoding="utf-8") as f:
            train = json.load(f)
        with open(os.path.join(world_dir, "vision_val.json"), encoding="utf-8") as f:
            val = json.load(f)
        if not train:
            raise ValueError(f"{world_dir}/vision_pretrain.json lists no image; generate the world with n_vision > 0")
        images, (colour, shape) = load_images(world_dir, train), quadrant_labels(train)
        val_images, (val_colour, val_shape) = load_images(world_dir, val), quadrant_labels(val)
        images, colour, shape = images.to(device), colour.to(device), shape.to(device)
        val_images, val_colour, val_shape = val_images.to(device), val_colour.to(device), val_shape.to(device)
        torch.manual_seed(seed)
        cfg = {k: v for k, v in vit_config.items() if k != "checkpoint"}
        vit = custom_vit(IMAGE_SIZE, cfg).to(device)
        heads = TokenHeads(cfg["embed_dim"]).to(device)
        quadrants = token_quadrants(IMAGE_SIZE // cfg["patch_size"]).to(device)
        optim = torch.optim.AdamW(list(vit.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.05)
        rng = random.Random(seed)
        history, window = [], []
        log(f"[vision_pretrain] {len(train)} images, ViT {cfg}, "
            f"{sum(p.numel() for p in vit.parameters()) / 1e6:.2f}M parameters, {steps} steps")
        t0 = time.time()
        for step in range(steps):
            for group in optim.param_groups:
                group["lr"] = warmup_cosine_lr(step, steps, lr)
            idx = torch.tensor(rng.sample(range(len(train)), min(batch_size, len(train))), device=device)
            loss = token_loss(heads, vit(images[idx]), colour[idx], shape[idx], quadrants)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                history.append({"step": step + 1, "loss": round(sum(window) / len(window), 4),
                                "elapsed_s": round(time.time() - t0, 1)})
                log(f"[vision_pretrain] step {step + 1}/{steps} loss {history[-1]['loss']:.4f} "
                    f"elapsed {history[-1]['elapsed_s']:.1f}s")
                window = []
        accuracy = token_accuracy(vit, heads, val_images, val_colour, val_shape, quadrants)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        torch.save({k: v.cpu() for k, v in vit.state_dict().items()}, out_path)
        report = {"vit_config": cfg, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                  "images": len(train), "loss_history": history, "val_token_accuracy": accuracy,
                  "time_s": round(time.time() - t_start, 1)}
        with open(out_path + ".json", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        log("[vision_pretrain] val token accuracy: " + " ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
            + f"; {report['time_s']:.1f}s")
        return report
    finally:
        torch.set_num_threads(old_threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True)
    ap.add_argument("--out", required=True, help="output .pth (the ViT's state dict)")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="torch device of the training (cpu, cuda)")
    args = ap.parse_args(argv)
    vit_config = {"patch_size": args.patch_size, "embed_dim": args.embed_dim, "depth": args.depth,
                  "num_heads": args.num_heads}
    report = pretrain_vit(args.world, args.out, vit_config, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed, threads=args.threads, device=args.device)
    print(json.dumps(report["val_token_accuracy"]))


if __name__ == "__main__":
    main()
