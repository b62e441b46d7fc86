"""Pretrain the demo's tiny ViT on unpaired shapes-world images, before it is frozen in stages 1 and 2.

BLIP-2 and P-Former keep a *pretrained* image encoder (EVA-CLIP ViT-g) frozen. Offline there is none, and a
ViT trained from scratch inside stages 1 and 2 learns too slowly for a CPU budget (measured: the stage-1
ITC loss stays at log(batch) for ~175 steps), so the demo pretrains ``custom_vit`` on the world's
``vision_pretrain.json`` images (``shapes_world``: scenes from the training pool, no captions) to name
what each quadrant holds: a colour (or empty) and a shape (or empty), from the mean of the quadrant's
patch tokens. Only the ViT is kept; the heads are thrown away. Command line::

    python -m lavis_pformer.demo.vision_pretrain --world DIR --out vit.pth [--patch-size 4] [--embed-dim 64]
        [--depth 2] [--num-heads 4] [--steps 300] [--batch-size 128] [--lr 2e-3] [--seed 0] [--threads N]

Python: ``pretrain_vit(world_dir, out_path, vit_config, ...)`` writes ``out_path`` (the ViT's state dict, the
``vit_config.checkpoint`` of every stage) and ``<out_path>.json`` (losses and the val images' per-quadrant
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

from lavis_pformer.demo.shapes_world import COLOURS, IMAGE_SIZE, SHAPES
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


class QuadrantHeads(nn.Module):
    """Per-quadrant colour / shape logits from ViT tokens [B, 1 + g*g, D] -> ([B, 4, 7], [B, 4, 4])."""

    def __init__(self, width, grid):
        super().__init__()
        rows = torch.arange(grid * grid) // grid
        cols = torch.arange(grid * grid) % grid
        quadrant = (rows >= grid // 2).long() * 2 + (cols >= grid // 2).long()  # the world's reading order
        self.register_buffer("pool", F.one_hot(quadrant, 4).float().T / (grid * grid / 4), persistent=False)
        self.norm = nn.LayerNorm(width)
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)

    def forward(self, tokens):
        pooled = self.norm(torch.einsum("qp,bpd->bqd", self.pool, tokens[:, 1:]))
        return self.colour(pooled), self.shape(pooled)


@torch.no_grad()
def quadrant_accuracy(vit, heads, images, colour, shape, batch_size=256):
    """Share of quadrants whose colour (resp. shape, both) is predicted right."""
    vit.eval()
    hits = torch.zeros(3)
    for start in range(0, len(images), batch_size):
        c_logits, s_logits = heads(vit(images[start : start + batch_size]))
        c_ok = c_logits.argmax(-1) == colour[start : start + batch_size]
        s_ok = s_logits.argmax(-1) == shape[start : start + batch_size]
        hits += torch.stack([c_ok.sum(), s_ok.sum(), (c_ok & s_ok).sum()]).float().cpu()
    vit.train()
    n = colour.numel()
    return {"colour": hits[0].item() / n, "shape": hits[1].item() / n, "both": hits[2].item() / n}


def pretrain_vit(world_dir, out_path, vit_config, steps=300, batch_size=128, lr=2e-3, seed=0, threads=None,
                 log_every=50, device="cpu", log=print):
    """Train ``custom_vit(32, vit_config)`` + quadrant heads; save the ViT's weights; return the report."""
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
        heads = QuadrantHeads(cfg["embed_dim"], IMAGE_SIZE // cfg["patch_size"]).to(device)
        params = list(vit.parameters()) + list(heads.parameters())
        optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        rng = random.Random(seed)
        history, window = [], []
        log(f"[vision_pretrain] {len(train)} images, ViT {cfg}, "
            f"{sum(p.numel() for p in vit.parameters()) / 1e6:.2f}M parameters, {steps} steps")
        t0 = time.time()
        for step in range(steps):
            for group in optim.param_groups:
                group["lr"] = warmup_cosine_lr(step, steps, lr)
            idx = torch.tensor(rng.sample(range(len(train)), min(batch_size, len(train))), device=device)
            c_logits, s_logits = heads(vit(images[idx]))
            loss = F.cross_entropy(c_logits.flatten(0, 1), colour[idx].flatten()) + \
                F.cross_entropy(s_logits.flatten(0, 1), shape[idx].flatten())
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
        accuracy = quadrant_accuracy(vit, heads, val_images, val_colour, val_shape)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        torch.save({k: v.cpu() for k, v in vit.state_dict().items()}, out_path)
        report = {"vit_config": cfg, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                  "images": len(train), "loss_history": history, "val_quadrant_accuracy": accuracy,
                  "time_s": round(time.time() - t_start, 1)}
        with open(out_path + ".json", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        log(f"[vision_pretrain] val quadrant accuracy: colour {accuracy['colour']:.3f} shape {accuracy['shape']:.3f} "
            f"both {accuracy['both']:.3f}; {report['time_s']:.1f}s")
        return report
    finally:
        torch.set_num_threads(old_threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True)
    ap.add_argument("--out", required=True, help="output .pth (the ViT's state dict)")
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="torch device of the training (cpu, cuda)")
    args = ap.parse_args(argv)
    vit_config = {"patch_size": args.patch_size, "embed_dim": args.embed_dim, "depth": args.depth,
                  "num_heads": args.num_heads}
    report = pretrain_vit(args.world, args.out, vit_config, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed, threads=args.threads, device=args.device)
    print(json.dumps(report["val_quadrant_accuracy"]))


if __name__ == "__main__":
    main()
