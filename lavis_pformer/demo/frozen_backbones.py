"""The demo's frozen backbones: built once from a seeded recipe, then loaded by every demo run.

In the paper OPT and EVA-CLIP arrive pretrained and are frozen; the demo's small LM and ViT play their
part. They are built by ``make demo-backbones`` (= ``python -m lavis_pformer.demo.frozen_backbones --out
lavis_pformer/demo/backbones``), committed with the package, and checked against their recorded sha256
before each use, so that a demo run repeats exactly. A backbones folder holds:

- ``lm/``: the frozen OPT (tokenizer + ``OPTForCausalLM``, ``train_lm`` on the world's text corpus);
- ``vit.pth``: the frozen ``custom_vit`` (``vision_pretrain`` on the world's unpaired images);
- ``bert/``: the BERT that the Q-Former and the P-Former start from (random weights, no dropout);
- ``t5/``: the frozen encoder-decoder LM (tokenizer + ``T5ForConditionalGeneration``, ``t5_lm`` on the same
  corpus), for the runs with ``pformer_t5`` / ``blip2_t5_pformer`` (make paper's Table 5; the demo does not read it);
- ``manifest.json``: the recipe (world, sizes, training settings, seed), the sha256 of every file, the
  quality figures (each LM's text ceiling per question type, the ViT's per-token accuracy), the versions of
  torch / transformers that built them, the build times (wall) and the CPU time of each part built (on a busy
  machine the one-thread T5's CPU time is its build time on an idle core).

``--parts t5`` builds some parts anew into an existing folder of the same recipe, keeping the others byte for byte.
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
    "t5": dict(steps=1500, layers=2, width=128, heads=8, ffn=256, batch_size=64, lr=2e-3, position_lr_scale=50,
               qa_share=0.5, vocab_size=160, threads=1, log_every=250),
}
# Where each part lives in a backbones folder.
PART_PATHS = {"lm": "lm", "vit": "vit.pth", "bert": "bert", "t5": "t5"}


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


def _build_lm(world, staging, work, recipe, threads, device, log):
    from lavis_pformer.demo.train_lm import train_lm

    report = train_lm(world, os.path.join(staging, "lm"), seed=recipe["seed"], threads=threads, device=device,
                      log=log, **recipe["lm"])
    os.replace(os.path.join(staging, "lm", "lm_report.json"), os.path.join(work, "lm_report.json"))
    ceiling = report["text_ceiling"]
    return {
        "lm_text_ceiling_val": {
            "caption_in_text": {t: v["accuracy"] for t, v in ceiling["per_type"].items()},
            "caption_before_bos": {t: v["accuracy"] for t, v in ceiling["context"]["per_type"].items()},
            "overall_excl_yesno": report["overall_excl_yesno"],
            "overall_excl_yesno_before_bos": ceiling["context"]["overall_excl_yesno"],
        },
        "lm_parameters": report["sizes"]["parameters"],
        "lm_loss_last": report["loss_last"],
    }


def _build_vit(world, staging, work, recipe, threads, device, log):
    from lavis_pformer.demo.vision_pretrain import pretrain_vit

    vit = recipe["vit"]
    report = pretrain_vit(world, os.path.join(staging, "vit.pth"), vit["config"], steps=vit["steps"],
                          batch_size=vit["batch_size"], lr=vit["lr"], seed=recipe["seed"], threads=threads,
                          device=device, log=log)
    os.replace(os.path.join(staging, "vit.pth.json"), os.path.join(work, "vit_report.json"))
    return {"vit_val_token_accuracy": report["val_token_accuracy"]}


def _build_bert(world, staging, work, recipe, threads, device, log):
    from lavis_pformer import tiny

    tiny.build_bert(os.path.join(staging, "bert"), seed=recipe["seed"], **recipe["bert"])
    return {}


def _build_t5(world, staging, work, recipe, threads, device, log):
    """On the CPU with the recipe's thread count (one, so that it builds next to the OPT), whatever ``threads``."""
    from lavis_pformer.demo.t5_lm import train_t5

    report = train_t5(world, os.path.join(staging, "t5"), seed=recipe["seed"], log=log, **recipe["t5"])
    os.replace(os.path.join(staging, "t5", "t5_report.json"), os.path.join(work, "t5_report.json"))
    return {
        "t5_text_ceiling_val": {
            "caption_first": {t: v["accuracy"] for t, v in report["text_ceiling"]["per_type"].items()},
            "overall_excl_yesno": report["overall_excl_yesno"],
            "color_shape_by_objects": report["text_ceiling"]["color_shape_by_objects"],
        },
        "t5_caption_continuation_val": {k: report["caption_continuation"][k] for k in ("empty_prefix", "prefix")},
        "t5_parameters": report["sizes"]["parameters"],
        "t5_loss_last": report["loss_last"],
    }


BUILDERS = {"lm": _build_lm, "vit": _build_vit, "bert": _build_bert, "t5": _build_t5}


def _versions():
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _kept(out, recipe, parts):
    """The manifest of ``out`` without ``parts`` (their files, quality figures and times), after checking that the
    rest matches ``recipe`` and its sha256 and was built with this torch and transformers."""
    manifest = verify(out)
    kept_recipe = {k: v for k, v in json.loads(json.dumps(recipe)).items() if k not in parts}
    if {k: v for k, v in manifest["recipe"].items() if k not in parts} != kept_recipe:
        raise BackbonesError(f"the backbones at {out} were built from another recipe than the parts kept; "
                             "build every part (no --parts)")
    built_with = {k: manifest["built_with"][k] for k in ("torch", "transformers")}
    if built_with != _versions():
        raise BackbonesError(f"the backbones at {out} were built with {built_with}, this is {_versions()}; "
                             "build every part (no --parts)")
    prefixes = tuple(PART_PATHS[p] + "/" for p in parts)
    manifest["files"] = {rel: d for rel, d in manifest["files"].items()
                         if rel not in {PART_PATHS[p] for p in parts} and not rel.startswith(prefixes)}
    manifest["quality"] = {k: v for k, v in manifest["quality"].items() if k.split("_")[0] not in parts}
    times = manifest["build_time_s"]
    manifest["build_time_s"] = {k: v for k, v in times.items() if k not in parts}
    manifest["build_time_s"]["total"] = times["total"] - sum(times.get(p, 0) for p in parts)
    manifest["build_cpu_time_s"] = {k: v for k, v in manifest.get("build_cpu_time_s", {}).items() if k not in parts}
    return manifest


def build(out, recipe=RECIPE, work=None, threads=None, device="cpu", log=print, parts=None):
    """Build the world (under ``work``) and the backbones of ``recipe`` into ``out``; returns the manifest.

    ``parts``: None builds every part the recipe names ("lm", "vit", "bert", "t5"); a list builds only those into
    the existing ``out`` (same recipe otherwise, same torch and transformers: checked), whose other files stay byte
    for byte. The manifest's ``build_time_s.total`` is then the old total with the new parts' times in place of
    theirs.
    """
    from lavis_pformer.synthetic.shapes_world import generate

    out = os.path.abspath(out)
    work = os.path.abspath(work or os.path.join(out + ".work"))
    names = [p for p in BUILDERS if p in recipe]
    parts = names if parts is None else list(parts)
    if not parts or set(parts) - set(names):
        raise BackbonesError(f"cannot build parts {parts}: the recipe's parts are {names}")
    partial = set(parts) != set(names)
    t0 = time.time()
    kept = _kept(out, recipe, parts) if partial else {
        "files": {}, "quality": {}, "build_time_s": {},
        "built_with": dict(_versions(), device=device, threads=threads or torch.get_num_threads())}
    world = os.path.join(work, "world")
    if not os.path.exists(os.path.join(world, "world.json")):
        generate(world, seed=recipe["seed"], **recipe["world"])
    world_files = {name: sha256(os.path.join(world, name)) for name in ("corpus.txt", "captions_train.json")}
    if partial and world_files != kept["world_files"]:
        raise BackbonesError(f"the world under {work} is not the one the backbones at {out} were built on; "
                             "give a fresh --work")
    staging = out + ".building"
    shutil.rmtree(staging, ignore_errors=True)
    if partial:
        shutil.copytree(out, staging)
        for part in parts:
            path = os.path.join(staging, PART_PATHS[part])
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    else:
        os.makedirs(staging)
    times, cpu, quality = {}, dict(kept.get("build_cpu_time_s", {})), dict(kept["quality"])
    for part in parts:
        t, c = time.time(), time.process_time()
        quality.update(BUILDERS[part](world, staging, work, recipe, threads, device, log))
        times[part], cpu[part] = round(time.time() - t, 1), round(time.process_time() - c, 1)
    previous = {k: v for k, v in kept["build_time_s"].items() if k != "total"}
    total = kept["build_time_s"]["total"] + sum(times.values()) if partial else time.time() - t0
    manifest = {
        "format": FORMAT,
        "recipe": copy.deepcopy(recipe),
        "files": file_digests(staging),
        "world_files": world_files,
        "quality": quality,
        "built_with": kept["built_with"],
        "build_time_s": dict(previous, **times, total=round(total, 1)),
        "build_cpu_time_s": cpu,
    }
    changed = [rel for rel, digest in kept["files"].items() if manifest["files"].get(rel) != digest]
    assert not changed, f"{changed} changed while building {parts}"
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    log(f"[backbones] {out}: " + json.dumps(quality))
    return manifest


def has_recipe(folder, recipe):
    """Whether ``folder`` holds backbones whose manifest records ``recipe`` (their files are not checked)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("recipe") == json.loads(json.dumps(recipe))


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
    ap.add_argument("--device", default="cpu", help="torch device of the OPT and ViT training (the T5 trains on the CPU)")
    ap.add_argument("--recipe", default=None, help="a JSON file holding the recipe (default: the committed one)")
    ap.add_argument("--world-seed", type=int, default=None,
                    help="the world's seed, replacing the recipe's (the committed recipe has 0)")
    ap.add_argument("--parts", default=None,
                    help=f"comma-separated parts to build anew into the existing --out, keeping the others "
                         f"(default: all; parts: {','.join(BUILDERS)})")
    args = ap.parse_args(argv)
    recipe = RECIPE
    if args.recipe:
        with open(args.recipe, encoding="utf-8") as f:
            recipe = json.load(f)
    if args.world_seed is not None:
        recipe = dict(copy.deepcopy(recipe), seed=args.world_seed)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else None
    try:
        build(args.out, recipe, work=args.work, threads=args.threads, device=args.device, parts=parts)
    except BackbonesError as e:
        ap.error(str(e))  # exit status 2


if __name__ == "__main__":
    main()
