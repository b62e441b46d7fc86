"""Paper Table 7 in miniature: video captioning with ``video_opt_pformer``, ITG alone vs ITG + alignment.

    python -m lavis_pformer.demo.video_table --out output/video [--world-seed 0] [--scale cpu|smoke] [--jobs 2]

On one video world (``synthetic.video_world``, seeded by the world seed) with a frozen LM that knows the world's
captions (``video_backbones``): stage 0 (``pformer_opt`` on the world's unpaired caption text), then two arms with
the same number of steps, each a ``train.py`` run, then ``evaluate.py`` on val and test (task
``captioning_pformer``: LAVIS's caption metrics, offline):

- ``itg``: the captioning loss alone (the paper's baseline row);
- ``itg_align``: the reference's schedule of the P-Former row: the connector first learns the P-Former prompt of
  the caption (alignment loss alone, w = 100, the LM not run), then the captioning loss alone from there.

Runs are written as configs (``<out>/configs/<name>.yaml``; rerun one with ``python train.py --cfg-path ...``) and
run by the demo's scheduler. ``table7_jobs`` and ``table7_metrics`` are what a larger pipeline calls; the settings
and how they were chosen: docs/demo.md (Video captioning).
"""
import argparse
import glob
import json
import os
import re
import resource
import time

from lavis_pformer.demo import video_backbones
from lavis_pformer.demo.pipeline import write_config
from lavis_pformer.demo.run_configs import _run_cfg, _train_sched, run_dir
from lavis_pformer.demo.scheduler import log, run_jobs
from lavis_pformer.synthetic import video_world

BUILDER = "video_features_caption"
ARMS = ("itg", "itg_align")
METRICS = ("CIDEr", "Bleu_4", "ROUGE_L")
ALIGNMENT_WEIGHT = 100  # the reference's video stage 1 (and image stage 2)

# World sizes, model and budgets per scale. Both arms train `epochs` epochs over the train pairs (the same steps):
# the baseline the captioning loss throughout, the aligned arm `align_epochs` of alignment alone, then captioning.
# "cpu" settings were chosen on world 0's val split (docs/demo.md).
SCALES = {
    "smoke": {
        "device": "cpu", "jobs": 2, "threads": 1, "recipe": video_backbones.SMOKE_RECIPE, "num_query_token": 4,
        "world": dict(n_train=24, n_val=8, n_test=8, feat_dim=64, min_clips=3, max_clips=6, noise=0.1),
        "max_clips": 6,
        "stage0": dict(lines=64, batch=32, epochs=1, lr=1e-3),
        "caption": dict(epochs=2, align_epochs=1, batch=16, lr=1e-3),
        "eval": dict(num_beams=1, max_len=12, batch=16),
    },
    "cpu": {
        "device": "cpu", "jobs": 2, "threads": 1, "recipe": video_backbones.RECIPE, "num_query_token": 8,
        "world": dict(n_train=200, n_val=100, n_test=100, feat_dim=1024, min_clips=4, max_clips=12, noise=0.1),
        "max_clips": 8,
        "stage0": dict(lines=32000, batch=64, epochs=2, lr=2e-3),
        "caption": dict(epochs=40, align_epochs=20, batch=32, lr=2e-3),
        "eval": dict(num_beams=3, max_len=12, batch=50),
    },
}


def prepare(out, world_seed=0, scale="cpu", seed=0, shared=None, log_fn=log):
    """The context of one world's table: folders, the video world and its verified frozen LM.

    ``seed``: the seed of every run; ``shared``: where the world and a built LM go (default ``out``).
    """
    settings = SCALES[scale] if isinstance(scale, str) else scale
    out = os.path.abspath(out)
    shared = os.path.abspath(shared or out)
    ctx = {"out": out, "seed": seed, "world_seed": int(world_seed), "scale": settings}
    for key in ("configs", "logs", "runs", "data"):
        ctx[key] = os.path.join(out, key)
        os.makedirs(ctx[key], exist_ok=True)
    world = os.path.join(shared, f"video_world_seed{int(world_seed)}")
    if os.path.exists(os.path.join(world, "world.json")):
        log_fn(f"video world exists: {world} (reused)")
        ctx["video"] = {"root": world, "features": os.path.join(world, "features"),
                        **{s: os.path.join(world, f"vatex_{s}.json") for s in video_world.SPLITS}}
    else:
        ctx["video"] = video_world.generate(world, seed=int(world_seed), **settings["world"])
    folder, ctx["lm_manifest"] = video_backbones.backbones_for(world_seed, shared, settings["recipe"],
                                                               threads=settings["threads"], log=log_fn)
    ctx["lm"] = os.path.join(folder, "lm")
    # the Q-Former and P-Former start from the demo's BERT (random weights, no dropout; any world)
    from lavis_pformer.demo import frozen_backbones

    ctx["bert"] = os.path.join(frozen_backbones.COMMITTED, "bert")
    log_fn(f"video LM: {folder} (sha256 checked)")
    return ctx


# ---------------------------------------------------------------------------------------------------------
# run configs
# ---------------------------------------------------------------------------------------------------------

def stage0_cfg(ctx, name):
    """``pformer_opt`` on the world's unpaired caption text (the first ``lines`` lines of the LM's text stream)."""
    s0 = ctx["scale"]["stage0"]
    path = os.path.join(ctx["data"], f"video_text_{ctx['world_seed']}_{s0['lines']}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(c + "\n" for c in video_world.unpaired_captions(ctx["world_seed"], s0["lines"])))
    model = {"arch": "pformer_opt", "model_type": "tiny", "bert_model": ctx["bert"], "opt_model": ctx["lm"],
             "llm_precision": "fp32", "num_query_token": ctx["scale"]["num_query_token"], "max_txt_len": 24,
             "embed_dim": 64, "mask_prob": 0.25, "lm_weight": 1.0, "contrastive_weight": 1.0, "vq_weight": 1.0,
             "label_smoothing": 0.1, "qa_weight": 0.0}
    return {"model": model,
            "datasets": {"sentence_corpus": {"build_info": {"annotations": {"train": {"storage": path}}}}},
            "run": _run_cfg(ctx, os.path.join(ctx["runs"], name), "pformer_pretrain", **_train_sched(s0))}


def _video_model(ctx, **keys):
    s = ctx["scale"]
    return dict(arch="video_opt_pformer", model_type="tiny", bert_model=ctx["bert"], opt_model=ctx["lm"],
                llm_precision="fp32", num_query_token=s["num_query_token"], cross_attention_freq=1,
                feat_dim=s["world"]["feat_dim"], max_clips=s["max_clips"], max_txt_len=24, prompt="", **keys)


def _video_data(ctx, splits):
    video = ctx["video"]
    return {BUILDER: {"feat_dim": ctx["scale"]["world"]["feat_dim"], "max_clips": ctx["scale"]["max_clips"],
                      "build_info": {"features": {"storage": video["features"]},
                                     "annotations": {s: {"storage": video[s]} for s in splits},
                                     "gt_dir": os.path.join(ctx["data"], "video_coco_gt")}}}


def caption_train_cfg(ctx, name, epochs, lm_weight=1.0, alignment_weight=0.0, stage0=None, start=None):
    """A ``video_opt_pformer`` training run: ``lm_weight`` x captioning + ``alignment_weight`` x alignment to the
    P-Former of run ``stage0``, for ``epochs`` epochs, from scratch or from the last checkpoint of run ``start``."""
    cap = ctx["scale"]["caption"]
    keys = dict(lm_weight=lm_weight, alignment_weight=alignment_weight)
    if alignment_weight:
        keys["pformer_checkpoint"] = os.path.join(run_dir(ctx, stage0), "pformer.pth")
    if start:
        keys.update(load_pretrained=True, pretrained=os.path.join(run_dir(ctx, start), "checkpoint_last.pth"))
    sched = _train_sched(dict(cap, epochs=epochs))
    return {"model": _video_model(ctx, **keys), "datasets": _video_data(ctx, ["train"]),
            "run": _run_cfg(ctx, os.path.join(ctx["runs"], name), "captioning_pformer", valid_splits=[],
                            test_splits=[], **_generation(ctx), **sched)}


def _generation(ctx):
    """The captioning task's generation keys (LAVIS's ``captioning`` task reads them in training runs too)."""
    ev = ctx["scale"]["eval"]
    return dict(max_len=ev["max_len"], min_len=1, num_beams=ev["num_beams"], caption_spice=False)


def caption_eval_cfg(ctx, name, trained, splits=("val", "test")):
    """``evaluate.py``: captions of ``splits`` by the last checkpoint of run ``trained``, scored by LAVIS's caption
    metrics against the split's COCO ground truth (all captions of each video)."""
    ev = ctx["scale"]["eval"]
    model = _video_model(ctx, alignment_weight=0.0, load_finetuned=True,
                         finetuned=os.path.join(run_dir(ctx, trained), "checkpoint_last.pth"))
    run = _run_cfg(ctx, os.path.join(ctx["runs"], name), "captioning_pformer", batch_size_train=ev["batch"],
                   batch_size_eval=ev["batch"], evaluate=True, test_splits=list(splits), **_generation(ctx))
    return {"model": model, "datasets": _video_data(ctx, splits), "run": run}


# ---------------------------------------------------------------------------------------------------------
# the table's jobs and metrics
# ---------------------------------------------------------------------------------------------------------

def table7_runs(prefix="video"):
    """Run names of the table: {"stage0", arm: {"train": [runs in order], "eval": run}}."""
    return {"stage0": f"{prefix}_stage0",
            "itg": {"train": [f"{prefix}_itg_stage2"], "eval": f"{prefix}_itg_eval_caption"},
            "itg_align": {"train": [f"{prefix}_align_stage1", f"{prefix}_itg_align_stage2"],
                          "eval": f"{prefix}_itg_align_eval_caption"}}


def table7_jobs(ctx, prefix="video"):
    """The configs (written under ``ctx["configs"]``) and scheduler jobs of the table, in dependency order."""
    runs = table7_runs(prefix)
    cap = ctx["scale"]["caption"]
    s0, (itg,), (align, itg_align) = runs["stage0"], runs["itg"]["train"], runs["itg_align"]["train"]
    epochs, align_epochs = cap["epochs"], cap["align_epochs"]
    if not 0 < align_epochs < epochs:
        raise ValueError(f"caption.align_epochs must be in 1..{epochs - 1} (epochs), got {align_epochs}")
    jobs = [
        write_config(ctx, "train.py", s0, stage0_cfg(ctx, s0)),
        write_config(ctx, "train.py", itg, caption_train_cfg(ctx, itg, epochs)),
        write_config(ctx, "train.py", align, caption_train_cfg(ctx, align, align_epochs, lm_weight=0.0,
                                                               alignment_weight=ALIGNMENT_WEIGHT, stage0=s0),
                     after=[s0]),
        write_config(ctx, "train.py", itg_align, caption_train_cfg(ctx, itg_align, epochs - align_epochs,
                                                                   start=align), after=[align]),
    ]
    for arm in ARMS:
        name, trained = runs[arm]["eval"], runs[arm]["train"][-1]
        jobs.append(write_config(ctx, "evaluate.py", name, caption_eval_cfg(ctx, name, trained), after=[trained]))
    return jobs


def _content(caption):
    """(colour, shape, direction) named by a caption, None for a part it does not name once."""
    from lavis_pformer.synthetic.shapes_world import COLOURS, SHAPES

    words = re.findall(r"[a-z]+", caption.lower())
    phrases = " ".join(words)

    def one(options, found):
        hits = [o for o in options if found(o)]
        return hits[0] if len(hits) == 1 else None

    return (one(COLOURS, lambda c: c in words), one(SHAPES, lambda s: s in words),
            one(video_world.DIRECTION_PHRASES, lambda d: re.search(
                rf"\b{video_world.DIRECTION_PHRASES[d]}\b", phrases) is not None))


def content_accuracy(predictions, videos):
    """Share of videos whose caption names their colour, shape and direction (``videos``: VATEX records)."""
    truth = {i: _content(v["enCap"][0]) for i, v in enumerate(videos)}
    by_id = {int(p["image_id"]): p["caption"] for p in predictions}
    return sum(_content(by_id.get(i, "")) == t for i, t in truth.items()) / len(truth)


def table7_metrics(ctx, prefix="video", arms=ARMS):
    """{arm: {split: {"CIDEr", "Bleu_4", "ROUGE_L", "METEOR", ..., "content_accuracy", "distinct"}}} of ``arms``,
    read from the evaluation runs' ``evaluate.txt`` (LAVIS's caption metrics) and caption files."""
    out = {}
    for arm in arms:
        folder = os.path.realpath(run_dir(ctx, table7_runs(prefix)[arm]["eval"]))
        scores = {}
        for line in open(os.path.join(folder, "evaluate.txt"), encoding="utf-8"):
            if line.strip():
                scores.update(json.loads(line))
        for split, metrics in scores.items():
            found = sorted(p for p in glob.glob(os.path.join(folder, "result", f"{split}_epoch*.json"))
                           if "_rank" not in p)
            with open(found[-1], encoding="utf-8") as f:
                predictions = json.load(f)
            with open(ctx["video"][split], encoding="utf-8") as f:
                videos = json.load(f)
            metrics["content_accuracy"] = content_accuracy(predictions, videos)
            metrics["distinct"] = len({p["caption"] for p in predictions})
        out[arm] = scores
    return out


def _teacher_model(ctx, prefix="video"):
    """The video model with the table's stage-0 P-Former as its teacher (no trained connector), eval mode."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    import lavis_pformer  # noqa: F401  (registers the models)

    teacher = os.path.join(run_dir(ctx, table7_runs(prefix)["stage0"]), "pformer.pth")
    cfg = OmegaConf.create(_video_model(ctx, alignment_weight=ALIGNMENT_WEIGHT, pformer_checkpoint=teacher,
                                        load_pretrained=False))
    return registry.get_model_class(cfg.arch).from_config(cfg, for_training=True).eval()


def _in_threads(ctx, fn):
    """``fn()`` with the scale's torch thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(ctx["scale"]["threads"] or threads)
    try:
        with torch.no_grad():
            return fn()
    finally:
        torch.set_num_threads(threads)


def teacher_ceiling(ctx, split="val", prefix="video"):
    """LAVIS's caption metrics (and ``content_accuracy``) of what the frozen LM writes from the stage-0 P-Former's
    prompt of each video's first true caption, text only, no video: the ceiling the alignment pulls toward.
    Generation as the evaluation runs' (beams, lengths); written to ``<runs>/<prefix>_teacher_<split>.json``."""
    from lavis.processors.blip_processors import BlipCaptionProcessor

    from lavis_pformer.caption_eval import caption_metrics
    from lavis_pformer.datasets.video_features import load_vatex_captions, write_coco_ground_truth

    ev = ctx["scale"]["eval"]
    videos = load_vatex_captions(ctx["video"][split])
    text = BlipCaptionProcessor(max_words=50)

    def generate():
        model, captions = _teacher_model(ctx, prefix), []
        for start in range(0, len(videos), ev["batch"]):
            chunk = [text(caps[0]) for _, caps in videos[start: start + ev["batch"]]]
            captions.extend(model.generate_after_prompt(
                model.teacher_prompt(chunk), [""] * len(chunk), model.llm_autocast(), num_beams=ev["num_beams"],
                max_new_tokens=ev["max_len"], min_length=1))
        return captions

    captions = _in_threads(ctx, generate)
    predictions = [{"image_id": i, "caption": c} for i, c in enumerate(captions)]
    path = os.path.join(ctx["runs"], f"{prefix}_teacher_{split}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(predictions, f)
    gt = write_coco_ground_truth(videos, os.path.join(ctx["data"], "video_coco_gt"), f"teacher_{split}")
    with open(ctx["video"][split], encoding="utf-8") as f:
        records = json.load(f)
    return dict(caption_metrics(gt, path), content_accuracy=content_accuracy(predictions, records),
                distinct=len(set(captions)))


def alignment_levels(ctx, prefix="video"):
    """Where the aligned arm's alignment-only stage ended, against two reference levels on the train pairs, all in
    ``loss_align`` units (``ALIGNMENT_WEIGHT`` x MSE to the teacher prompt of the pair's caption):

    - ``mean_prompt``: one prompt for every video (the mean teacher prompt): a connector that ignores the video;
    - ``video_mean_prompt``: each video's mean teacher prompt over its captions: the lowest any function of the
      video can reach (its captions differ in wording, not in what they say);
    - ``reached``: the last epoch's ``train_loss_align`` of the alignment-only run.
    """
    import torch
    from lavis.processors.blip_processors import BlipCaptionProcessor

    from lavis_pformer.datasets.video_features import load_vatex_captions

    text = BlipCaptionProcessor(max_words=50)
    videos = load_vatex_captions(ctx["video"]["train"])

    def prompts():
        model = _teacher_model(ctx, prefix)
        return [model.teacher_prompt([text(c) for c in caps]) for _, caps in videos]  # each [captions, Q, H]

    per_video = _in_threads(ctx, prompts)
    every = torch.cat(per_video)
    mean_prompt = ((every - every.mean(0)) ** 2).mean().item()
    video_mean = (torch.cat([p - p.mean(0) for p in per_video]) ** 2).mean().item()
    align_run = table7_runs(prefix)["itg_align"]["train"][0]
    with open(os.path.join(run_dir(ctx, align_run), "log.txt"), encoding="utf-8") as f:
        stats = [json.loads(line) for line in f if line.startswith('{"train')]
    return {"mean_prompt": ALIGNMENT_WEIGHT * mean_prompt, "video_mean_prompt": ALIGNMENT_WEIGHT * video_mean,
            "reached": float(stats[-1]["train_loss_align"])}


def table_markdown(metrics):
    """One world's table: rows = arms, columns = CIDEr / BLEU-4 / ROUGE-L (x100, as the paper) per split."""
    head = "| arm | " + " | ".join(f"{s} {m}" for s in ("val", "test") for m in (*METRICS, "content")) + " |"
    rows = [head, "|---" * (1 + 2 * (len(METRICS) + 1)) + "|"]
    for arm, splits in metrics.items():
        cells = []
        for split in ("val", "test"):
            m = splits.get(split, {})
            cells += [f"{100 * m[k]:.1f}" if k in m else "—" for k in METRICS]
            cells.append(f"{m['content_accuracy']:.3f}" if "content_accuracy" in m else "—")
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="output/video")
    ap.add_argument("--world-seed", type=int, default=0, help="seed of the video world and its frozen LM")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run")
    ap.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the scale's)")
    ap.add_argument("--report-only", action="store_true", help="read the metrics of the runs already under --out")
    args = ap.parse_args(argv)
    t0 = time.time()
    ctx = prepare(args.out, args.world_seed, args.scale, args.seed)
    jobs = table7_jobs(ctx)
    times = {} if args.report_only else run_jobs(jobs, args.jobs or ctx["scale"]["jobs"], ctx["scale"]["threads"])
    metrics = table7_metrics(ctx)
    ceiling = {split: teacher_ceiling(ctx, split) for split in ("val", "test")}
    levels = alignment_levels(ctx)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {"world_seed": args.world_seed, "seed": args.seed, "scale": args.scale, "metrics": metrics,
              "teacher_ceiling": ceiling, "alignment_levels": levels, "lm_quality": ctx["lm_manifest"]["quality"], "run_times_s": times,
              "runs_cpu_s": round(cpu.ru_utime + cpu.ru_stime, 1), "main_cpu_s": round(time.process_time(), 1),
              "wall_time_s": round(time.time() - t0, 1)}
    with open(os.path.join(ctx["out"], "table7.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(table_markdown(dict(metrics, teacher_ceiling=ceiling)), flush=True)
    print("loss_align: " + ", ".join(f"{k} {v:.3f}" for k, v in levels.items()), flush=True)
    log(f"run times {times}; CPU time: the runs {result['runs_cpu_s']}s, this process (world, LM if built, "
        f"teacher ceiling) {result['main_cpu_s']}s; wall time {result['wall_time_s']}s")
    return result


if __name__ == "__main__":
    main()
