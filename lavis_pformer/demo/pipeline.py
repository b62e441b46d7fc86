"""The miniature P-Former demo, end to end on a CPU: frozen backbones -> stages 0/1/2 -> zero-shot evaluation.

    python -m lavis_pformer.demo.pipeline --out output/demo [--arms baseline,pformer,pformer_qa]
        [--scale cpu|gpu|smoke] [--rebuild-backbones] [--jobs 2]
    python -m lavis_pformer.demo.pipeline --ablation --seeds 0,1,2 [--out output/ablation] [--scale ...]

Steps: the shapes world (``shapes_world``); the frozen LM, ViT and starting BERT (``frozen_backbones``: the
committed ones at scale ``cpu``, checked against their sha256; built under ``<out>/backbones`` otherwise);
then every stage of every arm through ``train.py`` / ``evaluate.py`` subprocesses, ``--jobs`` at a time with
``--threads`` torch threads each, in the order their dependencies allow; then the report (``report.py``).
The arms, the settings and how they were chosen: docs/demo.md.
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

from lavis_pformer.demo import frozen_backbones
from lavis_pformer.text import QA_PROMPT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARMS = ("baseline", "pformer", "pformer_qa")
W1, W2 = 10, 100  # the paper's alignment weights (stage 1, stage 2)
GRID = ((0, 0), (10, 0), (0, 100), (10, 100))
STAGES = ("stage0", "stage1", "stage2", "eval_vqa", "eval_caption")

SMOKE_RECIPE = {
    "seed": 0,
    "world": dict(n_train=48, n_val=16, n_test=16, n_corpus=600, n_vision=64, context_fraction=0.5),
    "lm": dict(steps=20, layers=1, width=32, heads=2, ffn=64, batch_size=16, lr=2e-3, log_every=10, quick_eval=False),
    "vit": dict(config=dict(patch_size=16, embed_dim=32, depth=1, num_heads=2), steps=5, batch_size=32, lr=2e-3),
    "bert": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
GPU_RECIPE = {
    "seed": 0,
    "world": dict(n_train=5000, n_val=500, n_test=500, n_corpus=100000, n_vision=20000, context_fraction=0.5),
    "lm": dict(steps=8000, layers=4, width=256, heads=4, ffn=1024, batch_size=128, lr=1e-3, log_every=500),
    "vit": dict(config=dict(patch_size=16, embed_dim=256, depth=4, num_heads=4), steps=3000, batch_size=256,
                lr=1e-3),
    "bert": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}

# Sizes and budgets. "cpu" is `make demo` (the committed backbones), "smoke" the tests'. A stage trains
# `epochs` epochs over the training pairs repeated `repeat` times (steps = epochs * repeat * pairs // batch).
SCALES = {
    "smoke": {
        "device": "cpu", "jobs": 2, "threads": 1, "recipe": SMOKE_RECIPE, "num_query_token": 4,
        "stage0": dict(lines=64, batch=32, epochs=1, lr=1e-3, qa_weight=1.0),
        "stage1": dict(epochs=1, repeat=1, batch=16, lr=1e-3),
        "stage2": dict(epochs=1, repeat=1, batch=16, lr=2e-3),
        "eval": dict(num_beams=1, vqa_max_len=3, cap_max_len=8, batch=32),
        "probe": dict(steps=20),
    },
    "cpu": {
        "device": "cpu", "jobs": 2, "threads": 1, "recipe": frozen_backbones.RECIPE, "num_query_token": 8,
        "stage0": dict(lines=32000, batch=64, epochs=2, lr=1e-3, qa_weight=1.0),
        "stage1": dict(epochs=1, repeat=5, batch=32, lr=1e-3),
        "stage2": dict(epochs=10, repeat=5, batch=32, lr=2e-3),
        "eval": dict(num_beams=1, vqa_max_len=3, cap_max_len=30, batch=64),
        "probe": dict(steps=300),
    },
    "gpu": {
        "device": "cuda", "jobs": 1, "threads": None, "recipe": GPU_RECIPE, "num_query_token": 8,
        "stage0": dict(lines=100000, batch=128, epochs=3, lr=1e-3, qa_weight=1.0),
        "stage1": dict(epochs=5, repeat=2, batch=64, lr=1e-3),
        "stage2": dict(epochs=10, repeat=2, batch=64, lr=2e-3),
        "eval": dict(num_beams=5, vqa_max_len=10, cap_max_len=30, batch=128),
        "probe": dict(steps=500),
    },
}


def log(msg):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(times, name, fn, *args, **kwargs):
    """Run ``fn`` and record its wall time in ``times[name]``."""
    log(f"step {name} ...")
    t = time.time()
    out = fn(*args, **kwargs)
    times[name] = round(time.time() - t, 1)
    log(f"step {name} done in {times[name]:.1f}s")
    return out


# ---------------------------------------------------------------------------------------------
# world and backbones
# ---------------------------------------------------------------------------------------------

def build_world(out, recipe):
    from lavis_pformer.synthetic.shapes_world import generate

    if os.path.exists(os.path.join(out, "world.json")):
        log(f"world exists: {out} (reused)")
    else:
        generate(out, seed=recipe["seed"], **recipe["world"])
    return out


def backbones(shared, scale, rebuild=False):
    """The verified backbones folder of ``scale``: the committed one at scale "cpu" (unless ``rebuild``), else
    ``<shared>/backbones``, built from the scale's recipe on the world under ``shared`` if missing."""
    recipe = scale["recipe"]
    if recipe is frozen_backbones.RECIPE and not rebuild:
        folder = frozen_backbones.COMMITTED
    else:
        folder = os.path.join(shared, "backbones")
        if rebuild or not os.path.exists(os.path.join(folder, frozen_backbones.MANIFEST)):
            frozen_backbones.build(folder, recipe, work=shared, threads=scale["threads"],
                                   device=scale["device"], log=log)
    manifest = frozen_backbones.verify(folder, recipe)
    log(f"frozen backbones: {folder} (sha256 checked)")
    return folder, manifest


def repeated_pairs(world, data_dir, repeat):
    """``captions_train.json`` with its pairs repeated ``repeat`` times (longer epochs, fewer checkpoints)."""
    if repeat == 1:
        return os.path.join(world, "captions_train.json")
    path = os.path.join(data_dir, f"captions_train_x{repeat}.json")
    with open(os.path.join(world, "captions_train.json"), encoding="utf-8") as f:
        pairs = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(pairs * repeat, f)
    return path


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

def _run_cfg(ctx, output_dir, task, **extra):
    run = {
        "task": task, "runner": "runner_pformer", "num_workers": 0, "seed": ctx["seed"], "output_dir": output_dir,
        "amp": False, "device": ctx["scale"]["device"], "world_size": 1, "dist_url": "env://", "distributed": True,
    }
    run.update(extra)
    return run


def _train_sched(stage, log_freq=10):
    return dict(lr_sched="linear_warmup_cosine_lr", init_lr=stage["lr"], min_lr=stage["lr"] / 10, warmup_lr=1e-5,
                warmup_steps=10, weight_decay=0.05, max_epoch=stage["epochs"], batch_size_train=stage["batch"],
                batch_size_eval=stage["batch"], accum_grad_iters=1, log_freq=log_freq, evaluate=False,
                train_splits=["train"])


def _vision(ctx):
    """Model keys every image stage shares: the frozen backbones and the Q-Former's shape."""
    vit = dict(ctx["recipe"]["vit"]["config"], checkpoint=ctx["vit"])
    return dict(vit_model="custom_vit", vit_config=vit, image_size=32, vit_precision="fp32", freeze_vit=True,
                bert_model=ctx["bert"], num_query_token=ctx["scale"]["num_query_token"], cross_attention_freq=1,
                opt_model=ctx["lm"], llm_precision="fp32")


def _caption_data(ctx, splits=("train",), storage=None):
    world = ctx["world"]
    annotations = {}
    for split in splits:
        ann = annotations[split] = {"storage": storage or os.path.join(world, f"captions_{split}.json")}
        if split != "train":
            ann["gt"] = os.path.join(world, f"coco_gt_{split}.json")
    return {"local_caption": {
        "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32},
                          "eval": {"name": "blip_image_eval", "image_size": 32}},
        "build_info": {"images": {"storage": world}, "annotations": annotations}}}


def run_dir(ctx, name):
    """Where run ``name`` writes (``<runs>/<name>/latest`` is its newest job folder)."""
    return os.path.join(ctx["runs"], name, "latest")


def stage0_cfg(ctx, name, qa):
    s0 = ctx["scale"]["stage0"]
    src = "qa_triples.jsonl" if qa else "sentences.txt"
    data = subset(os.path.join(ctx["world"], src),
                  os.path.join(ctx["data"], f"stage0_{'qa' if qa else 'sent'}_{s0['lines']}"
                               + (".jsonl" if qa else ".txt")), s0["lines"])
    model = {"arch": "pformer_opt", "model_type": "tiny", "bert_model": ctx["bert"], "opt_model": ctx["lm"],
             "llm_precision": "fp32", "num_query_token": ctx["scale"]["num_query_token"], "max_txt_len": 32,
             "embed_dim": 64, "mask_prob": 0.25, "lm_weight": 1.0, "contrastive_weight": 1.0, "vq_weight": 1.0,
             "label_smoothing": 0.1, "qa_weight": s0["qa_weight"] if qa else 0.0}
    return {"model": model,
            "datasets": {"sentence_corpus": {"build_info": {"annotations": {"train": {"storage": data}}}}},
            "run": _run_cfg(ctx, os.path.join(ctx["runs"], name), "pformer_pretrain", **_train_sched(s0))}


def stage1_cfg(ctx, name, w1, stage0):
    s1 = ctx["scale"]["stage1"]
    model = dict(arch="blip2_qformer_pformer", model_type="tiny", embed_dim=64, max_txt_len=32, alignment_weight=w1,
                 pformer_checkpoint=os.path.join(run_dir(ctx, stage0), "pformer.pth") if w1 else "", **_vision(ctx))
    for key in ("opt_model", "llm_precision"):  # stage 1 has no LLM
        model.pop(key)
    pairs = repeated_pairs(ctx["world"], ctx["data"], s1["repeat"])
    return {"model": model, "datasets": _caption_data(ctx, storage=pairs),
            "run": _run_cfg(ctx, os.path.join(ctx["runs"], name), "image_text_pretrain_pformer", **_train_sched(s1))}


def stage2_cfg(ctx, name, w2, stage0, stage1):
    s2 = ctx["scale"]["stage2"]
    model = dict(arch="blip2_opt_pformer", model_type="tiny", max_txt_len=32, alignment_weight=w2, prompt="",
                 pretrained=os.path.join(run_dir(ctx, stage1), "checkpoint_last.pth"),
                 pformer_checkpoint=os.path.join(run_dir(ctx, stage0), "pformer.pth") if w2 else "", **_vision(ctx))
    pairs = repeated_pairs(ctx["world"], ctx["data"], s2["repeat"])
    return {"model": model, "datasets": _caption_data(ctx, storage=pairs),
            "run": _run_cfg(ctx, os.path.join(ctx["runs"], name), "image_text_pretrain_pformer", **_train_sched(s2))}


def _eval_model(ctx, stage2):
    return dict(arch="blip2_opt_pformer", model_type="tiny", load_finetuned=True,
                finetuned=os.path.join(run_dir(ctx, stage2), "checkpoint_last.pth"), **_vision(ctx))


def vqa_cfg(ctx, name, stage2, splits=("val", "test")):
    world, ev = ctx["world"], ctx["scale"]["eval"]
    ann = {s: {"storage": os.path.join(world, f"vqa_{s}.json"),
               "question_file": os.path.join(world, f"vqa_{s}_questions.json"),
               "annotation_file": os.path.join(world, f"vqa_{s}_annotations.json")} for s in splits}
    run = _run_cfg(ctx, os.path.join(ctx["runs"], name), "vqa", batch_size_train=ev["batch"],
                   batch_size_eval=ev["batch"], max_len=ev["vqa_max_len"], min_len=1, num_beams=ev["num_beams"],
                   inference_method="generate", prompt=QA_PROMPT, evaluate=True, test_splits=list(splits))
    return {"model": _eval_model(ctx, stage2),
            "datasets": {"local_vqa": {"build_info": {"images": {"storage": world}, "annotations": ann}}},
            "run": run}


def caption_cfg(ctx, name, stage2, splits=("val", "test")):
    ev = ctx["scale"]["eval"]
    run = _run_cfg(ctx, os.path.join(ctx["runs"], name), "captioning_pformer", batch_size_train=ev["batch"],
                   batch_size_eval=ev["batch"], max_len=ev["cap_max_len"], min_len=1, num_beams=ev["num_beams"],
                   caption_spice=False, evaluate=True, test_splits=list(splits))
    return {"model": _eval_model(ctx, stage2), "datasets": _caption_data(ctx, splits), "run": run}


# ---------------------------------------------------------------------------------------------
# running: a small scheduler of train.py / evaluate.py subprocesses
# ---------------------------------------------------------------------------------------------

COST = {"stage0": 3, "stage1": 2, "stage2": 3, "eval_vqa": 1, "eval_caption": 1}  # for the run order only


class Job:
    """One ``train.py`` / ``evaluate.py`` run of a written config, after the jobs named in ``after``."""

    def __init__(self, name, script, cfg_path, log_path, output_dir, after=()):
        self.name, self.script, self.cfg_path, self.log_path = name, script, cfg_path, log_path
        self.output_dir, self.after = output_dir, tuple(after)
        self.kind = next(k for k in STAGES if name.endswith(k))


def write_config(ctx, script, name, cfg, after=()):
    """``<configs>/<name>.yaml`` (rerun it with ``python <script> --cfg-path <it>``); returns its Job."""
    path = os.path.join(ctx["configs"], f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"# written by lavis_pformer.demo.pipeline; rerun: python {script} --cfg-path {path}\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    return Job(name, script, path, os.path.join(ctx["logs"], f"{name}.log"), cfg["run"]["output_dir"], after)


def _priority(jobs):
    """Cost of the longest chain of jobs that starts at each job (the critical path goes first)."""
    after = {j.name: [k for k in jobs if j.name in k.after] for j in jobs}
    memo = {}

    def chain(job):
        if job.name not in memo:
            memo[job.name] = COST[job.kind] + max((chain(k) for k in after[job.name]), default=0)
        return memo[job.name]

    return {j.name: chain(j) for j in jobs}


def run_jobs(jobs, parallel=1, threads=None):
    """Run ``jobs`` (a dependency DAG), ``parallel`` at a time, each one's output in its log file.

    Each subprocess runs with ``threads`` torch threads (OMP_NUM_THREADS), so its results do not depend on
    the machine's core count. Returns {name: seconds}; the first failure stops the rest.
    """
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    priority = _priority(jobs)
    pending = sorted(jobs, key=lambda j: -priority[j.name])
    running, done, times = {}, set(), {}
    try:
        while pending or running:
            for job in [j for j in pending if set(j.after) <= done][: max(0, parallel - len(running))]:
                pending.remove(job)
                out = open(job.log_path, "w")
                proc = subprocess.Popen([sys.executable, os.path.join(REPO, job.script), "--cfg-path", job.cfg_path],
                                        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
                running[job.name] = (job, proc, out, time.time())
                log(f"  {job.name} started")
            time.sleep(0.2)
            for name, (job, proc, out, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                out.close()
                del running[name]
                if proc.returncode != 0:
                    tail = open(job.log_path).read()[-3000:]
                    raise RuntimeError(f"{job.script} {job.cfg_path} failed ({proc.returncode}); log {job.log_path}:"
                                       f"\n{tail}")
                times[name] = round(time.time() - t0, 1)
                done.add(name)
                log(f"  {name} done in {times[name]:.1f}s -> {os.path.realpath(os.path.join(job.output_dir, 'latest'))}")
    finally:
        for job, proc, out, _ in running.values():
            proc.kill()
            out.close()
    return times


def chain_jobs(ctx, tag, stage0, w1, w2, stage1_runs):
    """Config files and jobs of stages 1, 2 and the evaluations of one chain; returns (jobs, runs).

    ``stage0`` names the teacher's run (None: none). A stage-1 run depends only on its teacher and w1 (w1 = 0:
    no teacher), so chains that share them share one run: ``stage1_runs`` maps (teacher, w1) -> run name.
    """
    jobs = []
    key = (stage0 if w1 else None, w1)
    s1 = stage1_runs.get(key)
    if s1 is None:
        s1 = stage1_runs[key] = f"{tag}_stage1"
        jobs.append(write_config(ctx, "train.py", s1, stage1_cfg(ctx, s1, w1, stage0), after=[stage0] if w1 else []))
    s2 = f"{tag}_stage2"
    after = [s1] + ([stage0] if w2 else [])
    jobs.append(write_config(ctx, "train.py", s2, stage2_cfg(ctx, s2, w2, stage0, s1), after=after))
    jobs.append(write_config(ctx, "evaluate.py", f"{tag}_eval_vqa", vqa_cfg(ctx, f"{tag}_eval_vqa", s2), after=[s2]))
    jobs.append(write_config(ctx, "evaluate.py", f"{tag}_eval_caption", caption_cfg(ctx, f"{tag}_eval_caption", s2),
                             after=[s2]))
    runs = {"stage0": stage0, "stage1": s1, "stage2": s2, "eval_vqa": f"{tag}_eval_vqa",
            "eval_caption": f"{tag}_eval_caption"}
    return jobs, {"w1": w1, "w2": w2, "runs": runs}


def scale_with_overrides(args):
    """SCALES[args.scale] with the command line's overrides applied."""
    scale = copy.deepcopy(SCALES[args.scale])
    scale["recipe"] = SCALES[args.scale]["recipe"]  # identity marks the committed recipe
    for flag, (part, key) in {"stage0_lines": ("stage0", "lines"), "stage0_epochs": ("stage0", "epochs"),
                              "qa_weight": ("stage0", "qa_weight"),
                              "stage1_epochs": ("stage1", "epochs"), "stage2_epochs": ("stage2", "epochs"),
                              "num_beams": ("eval", "num_beams")}.items():
        value = getattr(args, flag, None)
        if value is not None:
            scale[part][key] = value
    for key in ("jobs", "threads"):
        if getattr(args, key, None) is not None:
            scale[key] = getattr(args, key)
    return scale


def prepare(out, seed, scale, times, shared=None, rebuild=False):
    """Folders, world and backbones (world and built backbones under ``shared`` if given, else ``out``)."""
    out = os.path.abspath(out)
    shared = os.path.abspath(shared) if shared else out
    ctx = {"out": out, "seed": seed, "scale": scale, "recipe": scale["recipe"]}
    for key in ("configs", "logs", "runs", "data"):
        ctx[key] = os.path.join(out, key)
        os.makedirs(ctx[key], exist_ok=True)
    ctx["world"] = timed(times, "world", build_world, os.path.join(shared, "world"), scale["recipe"])
    folder, ctx["backbones"] = timed(times, "backbones", backbones, shared, scale, rebuild)
    ctx["lm"], ctx["bert"], ctx["vit"] = (os.path.join(folder, p) for p in ("lm", "bert", "vit.pth"))
    return ctx


def demo_jobs(ctx, arms):
    """Jobs and chains of the demo's arms."""
    jobs, chains, stage1_runs = [], {}, {}
    for arm in arms:
        stage0 = None
        if arm != "baseline":
            stage0 = f"{arm}_stage0"
            jobs.append(write_config(ctx, "train.py", stage0, stage0_cfg(ctx, stage0, arm == "pformer_qa")))
        w1, w2 = (0, 0) if arm == "baseline" else (W1, W2)
        chain_job_list, chains[arm] = chain_jobs(ctx, arm, stage0, w1, w2, stage1_runs)
        jobs += chain_job_list
    return jobs, chains


def run_demo(args):
    from lavis_pformer.demo import report

    t0 = time.time()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = set(arms) - set(ARMS)
    if bad:
        raise SystemExit(f"unknown arms {sorted(bad)}; choose from {ARMS}")
    times = {}
    scale = scale_with_overrides(args)
    ctx = prepare(args.out, args.seed, scale, times, rebuild=args.rebuild_backbones)
    jobs, chains = demo_jobs(ctx, arms)
    if not args.report_only:
        times["runs"] = timed(times, "stages", run_jobs, jobs, scale["jobs"], scale["threads"])
    summary = timed(times, "report", report.write_demo_report, ctx, chains)
    times["total"] = round(time.time() - t0, 1)
    report.write_timings(ctx["out"], times)
    log(f"total wall time {times['total']:.1f}s")
    print(summary["table"], flush=True)
    return summary


def run_ablation(args):
    from lavis_pformer.demo import report

    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = os.path.abspath(args.out)
    scale = scale_with_overrides(args)
    times, jobs, plan = {}, [], []
    for seed in seeds:
        # one world and one set of backbones for every seed; the seeds vary stages 0, 1 and 2
        ctx = prepare(os.path.join(out, f"seed{seed}"), seed, scale, times,
                      shared=args.shared or os.path.join(out, "shared"), rebuild=args.rebuild_backbones)
        seed_jobs, stage1_runs = [], {}
        for variant, qa in (("pformer", False), ("pformer_qa", True)):
            seed_jobs.append(write_config(ctx, "train.py", f"{variant}_stage0",
                                          stage0_cfg(ctx, f"{variant}_stage0", qa)))
        for w1, w2 in GRID:
            for variant in (["pformer", "pformer_qa"] if (w1, w2) != (0, 0) else ["pformer"]):
                chain_job_list, chain = chain_jobs(ctx, f"{variant}_w{w1}_{w2}", f"{variant}_stage0", w1, w2,
                                                   stage1_runs)
                seed_jobs += chain_job_list
                plan.append((ctx, variant, w1, w2, chain))
        for job in seed_jobs:  # names unique across seeds
            job.name = f"seed{seed}/{job.name}"
            job.after = tuple(f"seed{seed}/{a}" for a in job.after)
        jobs += seed_jobs
    if not args.report_only:
        times["runs"] = timed(times, "stages", run_jobs, jobs, scale["jobs"], scale["threads"])
    cells = {}
    for ctx, variant, w1, w2, chain in plan:
        metrics = report.chain_metrics(ctx, chain)
        keys = [(variant, w1, w2)] + ([("pformer_qa", 0, 0)] if (w1, w2) == (0, 0) else [])
        for k in keys:
            cells.setdefault(k, []).append(dict(metrics, seed=ctx["seed"]))
    summary = report.write_ablation_report(out, cells, seeds, args.scale)
    times["total"] = round(time.time() - t0, 1)
    report.write_timings(out, times)
    log(f"total wall time {times['total']:.1f}s")
    print(summary["table"], flush=True)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default output/demo, or output/ablation)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run (the world's and backbones' are fixed)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    ap.add_argument("--smoke", action="store_true", help="same as --scale smoke (seconds-long runs, for tests)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the scale's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the scale's)")
    ap.add_argument("--rebuild-backbones", action="store_true",
                    help="build the frozen LM, ViT and BERT anew under --out instead of using the committed ones")
    ap.add_argument("--ablation", action="store_true", help="the (w1, w2) grid of the paper's Table 4")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the ablation")
    ap.add_argument("--shared", default=None,
                    help="ablation: folder of the shared world (and built backbones); default <out>/shared, "
                         "e.g. output/demo reuses the demo's")
    for flag, kind in (("--stage0-lines", int), ("--stage0-epochs", int), ("--qa-weight", float), ("--stage1-epochs", int),
                       ("--stage2-epochs", int), ("--num-beams", int)):
        ap.add_argument(flag, type=kind, default=None, help="override the scale's value")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the report from the runs already under --out")
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
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
