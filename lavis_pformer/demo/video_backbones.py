"""The video miniature's frozen LM (paper Table 7): an OPT-style LM that knows the video world's captions.

    python -m lavis_pformer.demo.video_backbones [--out lavis_pformer/demo/video_backbones] [--world-seed 0]

In the paper OPT-2.7B arrives pretrained and frozen; here a small OPT is trained from scratch on the video world's
unpaired caption text (``video_world.unpaired_captions``: captions of videos that are never rendered), then frozen.
Half of its lines carry a context segment, ``caption</s>caption``: the video model puts its soft prompt before the
LM's ``</s>`` (bos), and an LM trained on single captions would not read what stands there (docs/demo.md). The
folder holds ``lm/`` (tokenizer + ``OPTForCausalLM``) and ``manifest.json`` (recipe, sha256 of every file, quality,
versions, build time), in the format of the demo's backbones (``frozen_backbones``); every run checks it.
Quality: greedy continuation of each of the world's distinct captions placed before the bos (exact copies), and
the share of the LM's own samples after a bos alone that are captions of the world.
"""
import argparse
import copy
import json
import os
import random
import shutil
import time

import torch

from lavis_pformer.demo import frozen_backbones
from lavis_pformer.synthetic import video_world
from lavis_pformer.synthetic.shapes_world import SEGMENT_SEP

HERE = os.path.dirname(os.path.abspath(__file__))
COMMITTED = os.path.join(HERE, "video_backbones")  # world seed 0
FORMAT = "lavis_pformer/demo-video-backbones-v1"
REBUILD = "rebuild them with `python -m lavis_pformer.demo.video_backbones --out <folder> --world-seed <seed>`"

# The recipe of the committed LM (world seed 0); another world seed uses the same recipe with its own seed.
RECIPE = {
    "seed": 0,
    "text": dict(lines=12000, context_fraction=0.8),
    "lm": dict(steps=1000, layers=2, width=128, heads=4, ffn=512, batch_size=64, lr=3e-3, max_offset=8,
               vocab_size=400, log_every=200),
}
SMOKE_RECIPE = {
    "seed": 0,
    "text": dict(lines=400, context_fraction=0.5),
    "lm": dict(steps=20, layers=1, width=32, heads=2, ffn=64, batch_size=16, lr=3e-3, max_offset=4,
               vocab_size=300, log_every=10),
}


def recipe_for(world_seed, recipe=RECIPE):
    """``recipe`` with its seed set to the world's (the LM's text and initialisation follow the world seed)."""
    return dict(copy.deepcopy(recipe), seed=int(world_seed))


def caption_text(caption):
    """A caption as the captioner is trained on it: LAVIS's ``blip_caption`` drops the full stop."""
    return caption.rstrip(".").strip()


def corpus_lines(seed, lines, context_fraction):
    """The LM's text: ``lines`` unpaired captions, ``context_fraction`` of them as ``caption</s>caption``."""
    rng = random.Random(f"video-lm/{seed}/context")
    captions = [caption_text(c) for c in video_world.unpaired_captions(seed, lines)]
    return [c + SEGMENT_SEP + c if rng.random() < context_fraction else c for c in captions]


@torch.no_grad()
def lm_quality(lm_dir, samples=100, seed=0):
    """How well the saved LM (loaded through LAVIS) knows the world's captions.

    ``copy_exact``: share of the world's captions it continues exactly (greedy) when the caption stands before its
    bos, where the soft prompt goes; ``samples_in_world``: share of ``samples`` sampled continuations of a bos alone
    that are captions of the world.
    """
    from transformers import AutoTokenizer

    from lavis.models.blip2_models.modeling_opt import OPTForCausalLM
    from lavis_pformer.demo.lm_eval import answer_questions

    tokenizer = AutoTokenizer.from_pretrained(lm_dir, use_fast=False)
    model = OPTForCausalLM.from_pretrained(lm_dir).eval()
    captions = sorted({caption_text(c) for c in video_world.all_captions()})
    copies = answer_questions(model, tokenizer, [c + SEGMENT_SEP for c in captions], max_new_tokens=12)
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    torch.manual_seed(seed)
    bos = torch.full((samples, 1), tokenizer.bos_token_id, dtype=torch.long)
    out = model.generate(input_ids=bos, do_sample=True, max_new_tokens=12, eos_token_id=newline,
                         pad_token_id=tokenizer.pad_token_id)
    # a sample ends at "\n" or at a bos (a context segment's end)
    free = [t.split("\n")[0].split(tokenizer.bos_token)[0].strip() for t in tokenizer.batch_decode(out[:, 1:])]
    known = set(captions)
    return {"world_captions": len(captions),
            "copy_exact": sum(p == c for p, c in zip(copies, captions)) / len(captions),
            "samples_in_world": sum(f in known for f in free) / samples}


def build(out, recipe=RECIPE, threads=1, device="cpu", log=print):
    """Train the LM of ``recipe`` into ``out`` (staged, then moved in place); returns the manifest."""
    import transformers

    from lavis_pformer.demo.train_lm import fit_lm

    out = os.path.abspath(out)
    t0, cpu0 = time.time(), time.process_time()
    staging = out + ".building"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    lines = corpus_lines(recipe["seed"], **recipe["text"])
    report = fit_lm(lines, os.path.join(staging, "lm"), seed=recipe["seed"], threads=threads, device=device,
                    log=log, **recipe["lm"])
    train_s, train_cpu_s = round(time.time() - t0, 1), round(time.process_time() - cpu0, 1)
    quality = dict(lm_quality(os.path.join(staging, "lm")), lm_parameters=report["sizes"]["parameters"],
                   lm_loss_last=report["loss_last"])
    manifest = {
        "format": FORMAT,
        "recipe": copy.deepcopy(recipe),
        "files": frozen_backbones.file_digests(staging),
        "quality": quality,
        "built_with": {"torch": torch.__version__, "transformers": transformers.__version__, "device": device,
                       "threads": threads},
        # wall time, and this process's CPU time (the wall time grows with whatever else runs on the machine)
        "build_time_s": {"lm": train_s, "total": round(time.time() - t0, 1)},
        "build_cpu_s": {"lm": train_cpu_s, "total": round(time.process_time() - cpu0, 1)},
    }
    with open(os.path.join(staging, frozen_backbones.MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    log(f"[video backbones] {out}: " + json.dumps(quality))
    return manifest


def verify(folder, recipe=None):
    """The manifest of ``folder`` after checking every file's sha256 (and the recipe, if given)."""
    return frozen_backbones.verify(folder, recipe, fmt=FORMAT, fix=REBUILD)


def backbones_for(world_seed, shared, recipe=RECIPE, threads=1, log=print):
    """The verified video LM folder of ``world_seed``: the committed one for the committed recipe at seed 0, else
    ``<shared>/video_backbones_seed<seed>``, built if missing. Returns (folder, manifest)."""
    wanted = recipe_for(world_seed, recipe)
    if recipe is RECIPE and int(world_seed) == RECIPE["seed"]:
        folder = COMMITTED
    else:
        folder = os.path.join(os.path.abspath(shared), f"video_backbones_seed{int(world_seed)}")
        if not os.path.exists(os.path.join(folder, frozen_backbones.MANIFEST)):
            build(folder, wanted, threads=threads, log=log)
    return folder, verify(folder, wanted)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=COMMITTED, help="folder of the LM (default: the committed one)")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the manifest records them)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    build(args.out, recipe_for(args.world_seed), threads=args.threads, device=args.device)


if __name__ == "__main__":
    main()
