"""The demo's frozen backbones: built once from a seeded recipe, then loaded by every demo run.

In the paper OPT and EVA-CLIP arrive pretrained and are frozen; the demo's small LM and ViT play their
part. They are built by ``make demo-backbones`` (= ``python -m lavis_pformer.demo.frozen_backbones --out
lavis_pformer/demo/backbones``), committed with the package, and checked against their recorded sha256
before each use, so that a demo run repeats exactly. A backbones folder holds:

- ``lm/``: the frozen OPT (tokenizer + ``OPTForCausalLM``, ``train_lm`` on the world's text corpus);
- ``vit.pth``: the frozen ``custom_vit`` (``vision_pretrain`` on the world's unpaired images);
- ``bert/``: the BERT that the Q-Former and the P-Former start from (random weights, no dropout);
- ``manifest.json``: the recipe (world, sizes, training settings, seed), the sha256 of every file, the
  quality figures (the LM's text ceiling per question type, the ViT's per-token accuracy), the versions of
  torch / transformers that built them and the build times.
"""
import argparse
import copy
import hashlib
import json
import os
import shutil
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
COMMITTED = os.path.join(HERE, "backbones")
MANIFEST = "manifest.json"
FORMAT = "lavis_pformer/demo-backbones-v1"
REBUILD = "rebuild them with `make demo-backbones` (or run the demo with --rebuild-backbones)"

# The recipe of the committed backbones (scale "cpu"); the pipeline's other scales pass their own.
RECIPE = {
    "seed": 0,
    "world": dict(n_train=1000, n_val=150, n_test=150, n_corpus=40000, n_vision=4000, context_fraction=0.5),
    "lm": dict(steps=4000, layers=3, width=128, heads=4, ffn=512, batch_size=64, lr=2e-3, log_every=500),
    "vit": dict(config=dict(patch_size=16, embed_dim=128, depth=2, num_heads=4), steps=500, batch_size=64, lr=2e-3),
    "bert": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


class BackbonesError(RuntimeError):
    """The backbones folder is missing, incomplete or altered."""


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder):
    """Relative paths of every file under ``folder`` but the manifest, sorted."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_digests(folder):
    """{relative path: sha256} of every file under ``folder`` but the manifest (a manifest's ``files``)."""
    return {rel: sha256(os.path.join(folder, rel)) for rel in _files(folder)}


def build(out, recipe=RECIPE, work=None, threads=None, device="cpu", log=print):
    """Build the world (under ``work``), the LM, the ViT and the BERT into ``out``; returns the manifest."""
    from lavis_pformer import tiny
    from lavis_pformer.synthetic.shapes_world import generate
    from lavis_pformer.demo.train_lm import train_lm
    from lavis_pformer.demo.vision_pretrain import pretrain_vit

    out = os.path.abspath(out)
    work = os.path.abspath(work or os.path.join(out + ".work"))
    seed = recipe["seed"]
    t0 = time.time()
    world = os.path.join(work, "world")
    if not os.path.exists(os.path.join(world, "world.json")):
        generate(world, seed=seed, **recipe["world"])
    staging = out + ".building"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    times = {}
    t = time.time()
    lm_report = train_lm(world, os.path.join(staging, "lm"), seed=seed, threads=threads, device=device, log=log,
                         **recipe["lm"])
    times["lm"] = round(time.time() - t, 1)
    t = time.time()
    vit = recipe["vit"]
    vit_report = pretrain_vit(world, os.path.join(staging, "vit.pth"), vit["config"], steps=vit["steps"],
                              batch_size=vit["batch_size"], lr=vit["lr"], seed=seed, threads=threads, device=device,
                              log=log)
    os.replace(os.path.join(staging, "vit.pth.json"), os.path.join(work, "vit_report.json"))
    times["vit"] = round(time.time() - t, 1)
    tiny.build_bert(os.path.join(staging, "bert"), seed=seed, **recipe["bert"])
    os.replace(os.path.join(staging, "lm", "lm_report.json"), os.path.join(work, "lm_report.json"))
    import transformers

    manifest = {
        "format": FORMAT,
        "recipe": copy.deepcopy(recipe),
        "files": {rel: sha256(os.path.join(staging, rel)) for rel in _files(staging)},
        "world_files": {name: sha256(os.path.join(world, name)) for name in ("corpus.txt", "captions_train.json")},
        "quality": {
            "lm_text_ceiling_val": {
                "caption_in_text": {t: v["accuracy"] for t, v in lm_report["text_ceiling"]["per_type"].items()},
                "caption_before_bos": {t: v["accuracy"]
                                       for t, v in lm_report["text_ceiling"]["context"]["per_type"].items()},
                "overall_excl_yesno": lm_report["overall_excl_yesno"],
                "overall_excl_yesno_before_bos": lm_report["text_ceiling"]["context"]["overall_excl_yesno"],
            },
            "lm_parameters": lm_report["sizes"]["parameters"],
            "lm_loss_last": lm_report["loss_last"],
            "vit_val_token_accuracy": vit_report["val_token_accuracy"],
        },
        "built_with": {"torch": torch.__version__, "transformers": transformers.__version__, "device": device,
                       "threads": threads or torch.get_num_threads()},
        "build_time_s": dict(times, total=round(time.time() - t0, 1)),
    }
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    log(f"[backbones] {out}: " + json.dumps(manifest["quality"]))
    return manifest


def verify(folder, recipe=None, fmt=FORMAT, fix=REBUILD):
    """The manifest of ``folder`` after checking every file's sha256 (and the recipe, if given); ``fmt`` is the
    manifest format expected, ``fix`` what an error tells the user to do (other backbone folders reuse both)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise BackbonesError(f"no demo backbones at {folder} ({MANIFEST} missing); {fix}")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != fmt:
        raise BackbonesError(f"{path} is not a {fmt} manifest; {fix}")
    if recipe is not None and manifest["recipe"] != json.loads(json.dumps(recipe)):
        raise BackbonesError(f"the backbones at {folder} were built from another recipe; {fix}")
    present = set(_files(folder))
    missing = sorted(set(manifest["files"]) - present)
    changed = sorted(rel for rel, digest in manifest["files"].items() if rel in present
                     and sha256(os.path.join(folder, rel)) != digest)
    if missing or changed:
        raise BackbonesError(f"the demo backbones at {folder} do not match their manifest (missing {missing}, "
                             f"changed {changed}); {fix}")
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=COMMITTED, help="backbones folder (default: the committed one)")
    ap.add_argument("--work", default="output/demo-backbones", help="scratch folder for the world and reports")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the available cores)")
    ap.add_argument("--device", default="cpu", help="torch device of the LM and ViT training")
    args = ap.parse_args(argv)
    build(args.out, work=args.work, threads=args.threads, device=args.device)


if __name__ == "__main__":
    main()
