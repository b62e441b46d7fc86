"""The miniature P-Former demo, end to end on a CPU: world -> frozen tiny LM -> stages 0/1/2 -> zero-shot eval.

    python -m lavis_pformer.demo.pipeline --out output/demo [--seed 0] [--arms baseline,pformer,pformer_qa]
        [--scale cpu|gpu|smoke]
    python -m lavis_pformer.demo.pipeline --ablation --seeds 0,1,2 [--out output/ablation] [--scale ...]

Steps (each prints its elapsed time):

1. ``world``: the shapes world (``shapes_world.generate``) under ``<out>/world``.
2. ``lm``: a tiny OPT trained on the world's text corpus (``train_lm``), then frozen: it is ``opt_model`` of
   every stage (``llm_precision: fp32``); its ``lm_report.json`` holds the text ceiling (val split).
3. ``backbones``: the tiny BERT (``tiny.build_bert`` at the scale's width) that the P-Former and Q-Former start
   from, and the tiny ``custom_vit``, pretrained on the world's unpaired images (``vision_pretrain``) and then
   frozen in stages 1 and 2 (``freeze_vit: True``), as BLIP-2 freezes its pretrained image encoder.
4. Per arm, through ``train.py`` / ``evaluate.py`` subprocesses with yaml configs written to ``<out>/configs``
   (rerun any of them with ``python train.py --cfg-path <out>/configs/<name>.yaml``):
   - ``baseline``: no stage 0; stage 1 and stage 2 with ``alignment_weight: 0`` (BLIP-2).
   - ``pformer``: stage 0 as in the paper (reconstruction + VQ + two-view contrastive + masking) on
     ``sentences.txt``; stage 1 with w1 = 10, stage 2 with w2 = 100.
   - ``pformer_qa``: stage 0 as above plus the text-only QA term (``qa_weight``) on ``qa_triples.jsonl``;
     same w1 / w2.
   Then zero-shot VQA (task ``vqa``, ``local_vqa``, prompt "Question: {} Short answer:") on the val and test
   splits and captioning (``captioning_pformer``) on the test split.
5. ``report``: ``<out>/results.{md,json}`` and PNG plots (``report.py``); the table is printed.

``--ablation`` runs the paper's Table-4 grid (w1, w2) in {(0,0), (10,0), (0,100), (10,100)} for both P-Former
stage-0 variants (stage 0 shared per seed; (0,0) is the same run for both, the teacher being unused) over the
given seeds, on one world and one LM (seed 0), and writes mean and std to ``<out>/results.{md,json,png}``.
Within a seed, chains with the same stage-1 teacher and w1 share one stage-1 run (w1 = 0 has no teacher, so
one run serves every w1 = 0 chain): 3 stage-1 runs per seed instead of 7.
"""
import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARMS = ("baseline", "pformer", "pformer_qa")
VQA_PROMPT = "Question: {} Short answer:"
W1, W2 = 10, 100  # the paper's alignment weights (stage 1, stage 2)
GRID = ((0, 0), (10, 0), (0, 100), (10, 100))

# Sizes and budgets. "cpu" is `make demo` (<= 15 minutes on 2 cores, LM included), "smoke" the test's.
SCALES = {
    "smoke": {
        "device": "cpu",
        "world": dict(n_train=48, n_val=16, n_test=16, n_corpus=600, n_vision=64),
        "vision": dict(steps=5, batch_size=32, lr=2e-3),
        "lm": dict(steps=20, layers=1, width=32, heads=2, ffn=64, batch_size=16, log_every=10, quick_eval=False),
        "bert": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        "vit": dict(patch_size=8, embed_dim=32, depth=1, num_heads=2),
        "num_query_token": 8,
        "stage0": dict(lines=64, batch=32, epochs=1, lr=1e-3, qa_weight=1.0),
        "stage1": dict(epochs=1, batch=16, lr=1e-3),
        "stage2": dict(epochs=1, batch=16, lr=1e-3),
        "eval": dict(num_beams=1, vqa_max_len=3, cap_max_len=8, batch=32),
    },
    "cpu": {
        "device": "cpu",
        "world": dict(n_train=1000, n_val=150, n_test=150, n_corpus=40000, n_vision=4000),
        "vision": dict(steps=300, batch_size=64, lr=2e-3),
        # colour is read from the context after ~1000 steps, shape after ~2500 (docs/demo.md)
        "lm": dict(steps=3000, layers=3, width=128, heads=4, ffn=512, batch_size=64, log_every=250),
        "bert": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
        "vit": dict(patch_size=4, embed_dim=64, depth=2, num_heads=4),
        "num_query_token": 8,
        "stage0": dict(lines=12800, batch=64, epochs=1, lr=1e-3, qa_weight=1.0),
        "stage1": dict(epochs=4, batch=32, lr=1e-3),
        "stage2": dict(epochs=12, batch=32, lr=1e-3),
        "eval": dict(num_beams=1, vqa_max_len=3, cap_max_len=30, batch=64),
    },
    "gpu": {
        "device": "cuda",
        "world": dict(n_train=5000, n_val=500, n_test=500, n_corpus=100000, n_vision=20000),
        "vision": dict(steps=3000, batch_size=256, lr=1e-3),
        "lm": dict(steps=6000, layers=4, width=256, heads=4, ffn=1024, batch_size=128, log_every=500),
        "bert": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
        "vit": dict(patch_size=4, embed_dim=128, depth=4, num_heads=4),
        "num_query_token": 8,
        "stage0": dict(lines=100000, batch=128, epochs=3, lr=1e-3, qa_weight=1.0),
        "stage1": dict(epochs=20, batch=64, lr=1e-3),
        "stage2": dict(epochs=20, batch=64, lr=1e-3),
        "eval": dict(num_beams=5, vqa_max_len=10, cap_max_len=30, batch=128),
    },
}


def log(msg):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Steps:
    """Times named steps; ``times`` maps name -> seconds."""

    def __init__(self):
        self.times = {}
        self.t0 = time.time()

    def run(self, name, fn, *args, **kwargs):
        log(f"step {name} ...")
        t = time.time()
        out = fn(*args, **kwargs)
        self.times[name] = round(time.time() - t, 1)
        log(f"step {name} done in {self.times[name]:.1f}s (total {time.time() - self.t0:.1f}s)")
        return out


# ---------------------------------------------------------------------------------------------
# backbones
# ---------------------------------------------------------------------------------------------

def build_world(out, seed, sizes):
    from lavis_pformer.demo.shapes_world import generate

    if os.path.exists(os.path.join(out, "world.json")):
        log(f"world exists: {out} (reused)")
        return out
    generate(out, seed=seed, **sizes)
    return out


def build_lm(world, out, seed, sizes):
    from lavis_pformer.demo.train_lm import train_lm

    report = os.path.join(out, "lm_report.json")
    if os.path.exists(report):
        log(f"LM exists: {out} (reused)")
        return json.load(open(report))
    return train_lm(world, out, seed=seed, log=log, **sizes)


def build_backbones(out, world, seed, scale, threads=None):
    """Tiny BERT at the scale's width and the pretrained custom_vit weights; returns (bert_dir, vit_path)."""
    from lavis_pformer import tiny
    from lavis_pformer.demo.vision_pretrain import pretrain_vit

    bert_dir, vit_path = os.path.join(out, "bert"), os.path.join(out, "vit.pth")
    if not os.path.exists(os.path.join(bert_dir, "config.json")):
        old = tiny.SIZES["bert"]
        tiny.SIZES["bert"] = dict(scale["bert"])
        try:
            tiny.build_bert(bert_dir, seed)
        finally:
            tiny.SIZES["bert"] = old
    if not os.path.exists(vit_path + ".json"):
        pretrain_vit(world, vit_path, scale["vit"], seed=seed, threads=threads, device=scale["device"], log=log,
                     **scale["vision"])
    return bert_dir, vit_path


def subset(src, dst, n):
    """The first ``n`` lines of ``src`` into ``dst`` (the stage-0 budget: steps = n / batch)."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return dst


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

def _run_cfg(scale, seed, output_dir, task, **extra):
    run = {
        "task": task, "runner": "runner_pformer", "num_workers": 0, "seed": seed, "output_dir": output_dir,
        "amp": False, "device": scale["device"], "world_size": 1, "dist_url": "env://", "distributed": True,
    }
    run.update(extra)
    return run


def _train_sched(stage, log_freq=5):
    return dict(lr_sched="linear_warmup_cosine_lr", init_lr=stage["lr"], min_lr=stage["lr"] / 10, warmup_lr=1e-5,
                warmup_steps=10, weight_decay=0.05, max_epoch=stage["epochs"], batch_size_train=stage["batch"],
                batch_size_eval=stage["batch"], accum_grad_iters=1, log_freq=log_freq, evaluate=False,
                train_splits=["train"])


def _vision(ctx):
    vit = dict(ctx["scale"]["vit"], checkpoint=ctx["vit"])
    return dict(vit_model="custom_vit", vit_config=vit, image_size=32, vit_precision="fp32", freeze_vit=True,
                bert_model=ctx["bert"], num_query_token=ctx["scale"]["num_query_token"], opt_model=ctx["lm"],
                llm_precision="fp32")


def _caption_data(ctx, split="train"):
    world = ctx["world"]
    ann = {"storage": os.path.join(world, f"captions_{split}.json")}
    if split != "train":
        ann["gt"] = os.path.join(world, f"coco_gt_{split}.json")
    return {"local_caption": {
        "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32},
                          "eval": {"name": "blip_image_eval", "image_size": 32}},
        "build_info": {"images": {"storage": world}, "annotations": {split: ann}}}}


def stage0_cfg(ctx, name, qa):
    scale = ctx["scale"]
    s0 = scale["stage0"]
    src = "qa_triples.jsonl" if qa else "sentences.txt"
    data = subset(os.path.join(ctx["world"], src), os.path.join(ctx["data"], f"stage0_{'qa' if qa else 'sent'}_{s0['lines']}"
                                                               + (".jsonl" if qa else ".txt")), s0["lines"])
    model = {"arch": "pformer_opt", "model_type": "tiny", "bert_model": ctx["bert"], "opt_model": ctx["lm"],
             "llm_precision": "fp32", "num_query_token": scale["num_query_token"], "max_txt_len": 32,
             "embed_dim": 64, "mask_prob": 0.25, "lm_weight": 1.0, "contrastive_weight": 1.0, "vq_weight": 1.0,
             "label_smoothing": 0.1, "qa_weight": s0["qa_weight"] if qa else 0.0}
    return {"model": model,
            "datasets": {"sentence_corpus": {"build_info": {"annotations": {"train": {"storage": data}}}}},
            "run": _run_cfg(scale, ctx["seed"], os.path.join(ctx["runs"], name), "pformer_pretrain",
                            **_train_sched(s0, log_freq=10))}


def stage1_cfg(ctx, name, w1, pformer):
    scale = ctx["scale"]
    model = dict(arch="blip2_qformer_pformer", model_type="tiny", cross_attention_freq=1, embed_dim=64,
                 max_txt_len=32, alignment_weight=w1, pformer_checkpoint=pformer or "", **_vision(ctx))
    model.pop("llm_precision")
    return {"model": model, "datasets": _caption_data(ctx),
            "run": _run_cfg(scale, ctx["seed"], os.path.join(ctx["runs"], name), "image_text_pretrain_pformer",
                            **_train_sched(scale["stage1"]))}


def stage2_cfg(ctx, name, w2, pformer, stage1_ckpt):
    scale = ctx["scale"]
    model = dict(arch="blip2_opt_pformer", model_type="tiny", pretrained=stage1_ckpt, max_txt_len=32,
                 alignment_weight=w2, pformer_checkpoint=pformer or "", prompt="", **_vision(ctx))
    return {"model": model, "datasets": _caption_data(ctx),
            "run": _run_cfg(scale, ctx["seed"], os.path.join(ctx["runs"], name), "image_text_pretrain_pformer",
                            **_train_sched(scale["stage2"]))}


def vqa_cfg(ctx, name, ckpt, splits=("val", "test")):
    scale, world = ctx["scale"], ctx["world"]
    ev = scale["eval"]
    model = dict(arch="blip2_opt_pformer", model_type="tiny", load_finetuned=True, finetuned=ckpt, **_vision(ctx))
    ann = {s: {"storage": os.path.join(world, f"vqa_{s}.json"),
               "question_file": os.path.join(world, f"vqa_{s}_questions.json"),
               "annotation_file": os.path.join(world, f"vqa_{s}_annotations.json")} for s in splits}
    run = _run_cfg(scale, ctx["seed"], os.path.join(ctx["runs"], name), "vqa", batch_size_train=ev["batch"],
                   batch_size_eval=ev["batch"], max_len=ev["vqa_max_len"], min_len=1, num_beams=ev["num_beams"],
                   inference_method="generate", prompt=VQA_PROMPT, evaluate=True, test_splits=list(splits))
    return {"model": model, "datasets": {"local_vqa": {"build_info": {"images": {"storage": world},
                                                                       "annotations": ann}}},
            "run": run}


def caption_cfg(ctx, name, ckpt, split="test"):
    scale = ctx["scale"]
    ev = scale["eval"]
    model = dict(arch="blip2_opt_pformer", model_type="tiny", load_finetuned=True, finetuned=ckpt, **_vision(ctx))
    run = _run_cfg(scale, ctx["seed"], os.path.join(ctx["runs"], name), "captioning_pformer",
                   batch_size_train=ev["batch"], batch_size_eval=ev["batch"], max_len=ev["cap_max_len"], min_len=1,
                   num_beams=ev["num_beams"], caption_spice=False, evaluate=True, test_splits=[split])
    return {"model": model, "datasets": _caption_data(ctx, split), "run": run}


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------

def run_lavis(ctx, script, name, cfg):
    """Write ``<configs>/<name>.yaml``, run ``script`` on it (stdout in ``<logs>/<name>.log``); returns the run dir."""
    cfg_path = os.path.join(ctx["configs"], f"{name}.yaml")
    with open(cfg_path, "w") as f:
        f.write(f"# written by lavis_pformer.demo.pipeline; rerun: python {script} --cfg-path {cfg_path}\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    log_path = os.path.join(ctx["logs"], f"{name}.log")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if ctx.get("threads"):
        env["OMP_NUM_THREADS"] = str(ctx["threads"])
    t = time.time()
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), "--cfg-path", cfg_path], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last = 0.0
        for line in proc.stdout:
            out.write(line)
            if ("Train: data epoch" in line or "Evaluation" in line) and time.time() - last > 15:
                last = time.time()
                log(f"  {name}: {line.strip()[:150]}")
        rc = proc.wait()
    if rc != 0:
        tail = open(log_path).read()[-3000:]
        raise RuntimeError(f"{script} {cfg_path} failed ({rc}); log {log_path}:\n{tail}")
    run_dir = os.path.realpath(os.path.join(cfg["run"]["output_dir"], "latest"))
    ctx["timings"][name] = round(time.time() - t, 1)
    log(f"  {name}: {ctx['timings'][name]:.1f}s -> {run_dir}")
    return run_dir


def run_chain(ctx, arm, stage0_dir, w1, w2, tag=None):
    """Stages 1, 2 and the evaluations of one arm; returns a dict of run dirs and timings."""
    tag = tag or arm
    pformer = os.path.join(stage0_dir, "pformer.pth") if stage0_dir else ""
    out = {"w1": w1, "w2": w2, "stage0": stage0_dir, "runs": {}}
    # a stage-1 run depends only on its teacher and w1 (w1 = 0: no teacher): chains that share them share it
    stage1_key = (pformer if w1 else "", w1)
    cache = ctx.setdefault("stage1_runs", {})
    if stage1_key in cache:
        s1, name = cache[stage1_key]
        ctx["timings"][f"{tag}_stage1"] = ctx["timings"][name]
        log(f"  {tag}_stage1: same run as {name} -> {s1}")
    else:
        s1 = run_lavis(ctx, "train.py", f"{tag}_stage1", stage1_cfg(ctx, f"{tag}_stage1", w1, pformer if w1 else ""))
        cache[stage1_key] = (s1, f"{tag}_stage1")
    s2 = run_lavis(ctx, "train.py", f"{tag}_stage2",
                   stage2_cfg(ctx, f"{tag}_stage2", w2, pformer if w2 else "", os.path.join(s1, "checkpoint_last.pth")))
    ckpt = os.path.join(s2, "checkpoint_last.pth")
    vqa = run_lavis(ctx, "evaluate.py", f"{tag}_eval_vqa", vqa_cfg(ctx, f"{tag}_eval_vqa", ckpt))
    cap = run_lavis(ctx, "evaluate.py", f"{tag}_eval_caption", caption_cfg(ctx, f"{tag}_eval_caption", ckpt))
    out["runs"] = {"stage1": s1, "stage2": s2, "eval_vqa": vqa, "eval_caption": cap}
    out["time_s"] = {k: ctx["timings"].get(f"{tag}_{k}") for k in ("stage1", "stage2", "eval_vqa", "eval_caption")}
    return out


def scale_with_overrides(args):
    """SCALES[args.scale] with the command line's size overrides applied."""
    scale = copy.deepcopy(SCALES[args.scale])
    for flag, (part, key) in {"lm_steps": ("lm", "steps"), "lm_layers": ("lm", "layers"),
                              "stage0_lines": ("stage0", "lines"), "qa_weight": ("stage0", "qa_weight"),
                              "stage1_epochs": ("stage1", "epochs"), "stage2_epochs": ("stage2", "epochs"),
                              "num_beams": ("eval", "num_beams")}.items():
        value = getattr(args, flag, None)
        if value is not None:
            scale[part][key] = value
    return scale


def prepare(out, seed, scale_name, steps, threads=None, world_seed=None, shared=None, scale=None):
    """Folders, world, LM and backbones (built under ``shared`` if given, else ``out``); returns the context."""
    scale = scale or SCALES[scale_name]
    out = os.path.abspath(out)
    shared = os.path.abspath(shared) if shared else out
    ctx = {"out": out, "seed": seed, "scale": scale, "scale_name": scale_name, "threads": threads, "timings": {}}
    for key in ("configs", "logs", "runs", "data"):
        ctx[key] = os.path.join(out, key)
        os.makedirs(ctx[key], exist_ok=True)
    ws = seed if world_seed is None else world_seed
    ctx["world"] = steps.run("world", build_world, os.path.join(shared, "world"), ws, scale["world"])
    lm_sizes = dict(scale["lm"], device=scale["device"])
    if threads:
        lm_sizes["threads"] = threads
    ctx["lm_report"] = steps.run("lm", build_lm, ctx["world"], os.path.join(shared, "lm"), ws, lm_sizes)
    ctx["lm"] = os.path.join(shared, "lm")
    ctx["bert"], ctx["vit"] = steps.run("backbones", build_backbones, os.path.join(shared, "backbones"), ctx["world"],
                                        ws, scale, threads)
    return ctx


def _recover_chains(ctx, arms, pipeline_log=None):
    """Run dirs (``runs/<name>/latest``) and timings of a finished demo, for ``--report-only``."""
    path = os.path.join(ctx["out"], "chains.json")
    if os.path.exists(path):
        saved = json.load(open(path))
        ctx["timings"].update(saved["timings"])
        return {a: c for a, c in saved["results"].items() if a in arms}, saved["step_times"]
    timings, step_times = {}, {}
    if pipeline_log and os.path.exists(pipeline_log):  # lines "  <name>: 12.3s -> <dir>" and "step X done in Ys"
        import re

        for line in open(pipeline_log, errors="replace"):
            m = re.search(r"\]   (\S+): ([0-9.]+)s -> ", line)
            if m:
                timings[m.group(1)] = float(m.group(2))
            m = re.search(r"step (\S+) done in ([0-9.]+)s", line)
            if m:
                step_times[m.group(1)] = float(m.group(2))
    ctx["timings"].update(timings)
    results = {}
    for arm in arms:
        runs = {k: os.path.realpath(os.path.join(ctx["runs"], f"{arm}_{k}", "latest"))
                for k in ("stage1", "stage2", "eval_vqa", "eval_caption")}
        s0 = os.path.join(ctx["runs"], f"{arm}_stage0", "latest")
        w1, w2 = (0, 0) if arm == "baseline" else (W1, W2)
        results[arm] = {"w1": w1, "w2": w2, "stage0": os.path.realpath(s0) if os.path.exists(s0) else None,
                        "runs": runs, "time_s": {k: timings.get(f"{arm}_{k}") for k in
                                                 ("stage0", "stage1", "stage2", "eval_vqa", "eval_caption")}}
    return results, step_times


def run_demo(args):
    from lavis_pformer.demo import report

    steps = Steps()
    if args.report_only:
        ctx = prepare(args.out, args.seed, args.scale, steps, args.threads, scale=scale_with_overrides(args))
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        results, step_times = _recover_chains(ctx, arms, args.pipeline_log)
        summary = report.write_demo_report(ctx, results, step_times)
        print(summary["table"], flush=True)
        return summary
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = set(arms) - set(ARMS)
    if bad:
        raise SystemExit(f"unknown arms {sorted(bad)}; choose from {ARMS}")
    ctx = prepare(args.out, args.seed, args.scale, steps, args.threads, scale=scale_with_overrides(args))
    results = {}
    for arm in arms:
        stage0 = None
        if arm != "baseline":
            qa = arm == "pformer_qa"
            stage0 = steps.run(f"{arm}/stage0", run_lavis, ctx, "train.py", f"{arm}_stage0",
                               stage0_cfg(ctx, f"{arm}_stage0", qa))
        w1, w2 = (0, 0) if arm == "baseline" else (W1, W2)
        chain = steps.run(f"{arm}/stages12+eval", run_chain, ctx, arm, stage0, w1, w2)
        chain["time_s"]["stage0"] = ctx["timings"].get(f"{arm}_stage0")
        results[arm] = chain
        with open(os.path.join(ctx["out"], "chains.json"), "w") as f:  # what --report-only rereads
            json.dump({"results": results, "step_times": steps.times, "timings": ctx["timings"]}, f, indent=1)
    summary = steps.run("report", report.write_demo_report, ctx, results, steps.times)
    log(f"total wall time {time.time() - steps.t0:.1f}s")
    print(summary["table"], flush=True)
    return summary


def run_ablation(args):
    from lavis_pformer.demo import report

    steps = Steps()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = os.path.abspath(args.out)
    cells = {}
    for seed in seeds:
        sd = os.path.join(out, f"seed{seed}")
        os.makedirs(sd, exist_ok=True)
        # one world, LM and set of backbones (--seed's) for every seed; the seeds vary stages 0, 1 and 2
        ctx = prepare(sd, seed, args.scale, steps, args.threads, world_seed=args.seed,
                      shared=args.shared or os.path.join(out, "shared"), scale=scale_with_overrides(args))
        stage0 = {}
        for variant, qa in (("pformer", False), ("pformer_qa", True)):
            stage0[variant] = steps.run(f"seed{seed}/{variant}/stage0", run_lavis, ctx, "train.py",
                                        f"{variant}_stage0", stage0_cfg(ctx, f"{variant}_stage0", qa))
        for w1, w2 in GRID:
            variants = ["pformer", "pformer_qa"] if (w1, w2) != (0, 0) else ["pformer"]
            for variant in variants:
                tag = f"{variant}_w{w1}_{w2}"
                chain = steps.run(f"seed{seed}/{tag}", run_chain, ctx, variant, stage0[variant], w1, w2, tag=tag)
                metrics = report.chain_metrics(ctx, chain)
                keys = [(variant, w1, w2)] + ([("pformer_qa", 0, 0)] if (w1, w2) == (0, 0) else [])
                for k in keys:
                    cells.setdefault(k, []).append(dict(metrics, seed=seed))
    summary = report.write_ablation_report(out, cells, seeds, steps.times, args.scale)
    log(f"total wall time {time.time() - steps.t0:.1f}s")
    print(summary["table"], flush=True)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default output/demo, or output/ablation)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the world, the LM and every run")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    ap.add_argument("--smoke", action="store_true", help="same as --scale smoke (seconds-long runs, for tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all available cores)")
    ap.add_argument("--ablation", action="store_true", help="the (w1, w2) grid of the paper's Table 4")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the ablation (world and LM: --seed's)")
    ap.add_argument("--shared", default=None,
                    help="ablation: folder of the shared world/LM/backbones (default <out>/shared; e.g. output/demo "
                         "reuses the demo's)")
    for flag, kind in (("--lm-steps", int), ("--lm-layers", int), ("--stage0-lines", int), ("--qa-weight", float),
                       ("--stage1-epochs", int), ("--stage2-epochs", int), ("--num-beams", int)):
        ap.add_argument(flag, type=kind, default=None, help="override the scale's value")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild results.{md,json} and the plots from the runs already under --out")
    ap.add_argument("--pipeline-log", default=None,
                    help="--report-only: the pipeline's printed log, to recover step timings (else chains.json)")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (else world/LM/backbones are reused)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.scale = "smoke"
    if args.out is None:
        args.out = "output/ablation" if args.ablation else "output/demo"
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    return run_ablation(args) if args.ablation else run_demo(args)


if __name__ == "__main__":
    main()
