"""The miniature P-Former demo, end to end on a CPU: frozen backbones -> stages 0/1/2 -> zero-shot evaluation.

    python -m lavis_pformer.demo.pipeline --out output/demo [--arms baseline,pformer,pformer_qa]
        [--scale cpu|gpu|smoke] [--rebuild-backbones] [--jobs 2]
    python -m lavis_pformer.demo.pipeline --ablation --seeds 0,1,2 [--out output/ablation] [--scale ...]

Steps: the shapes world (``lavis_pformer.synthetic.shapes_world``); the frozen LM, ViT and starting BERT
(``frozen_backbones``: the committed ones at scale ``cpu``, checked against their sha256; built under
``<out>/backbones`` otherwise); then every stage of every arm through ``train.py`` / ``evaluate.py`` subprocesses
(configs: ``run_configs``), ``--jobs`` at a time with ``--threads`` torch threads each, in the order their
dependencies allow (``scheduler``); then the report (``report``). The arms, the settings and how they were chosen:
docs/demo.md.
"""
import argparse
import copy
import json
import os
import shutil
import time

import yaml

from lavis_pformer.demo import frozen_backbones
from lavis_pformer.demo.run_configs import caption_cfg, stage0_cfg, stage0_data, stage1_cfg, stage2_cfg, vqa_cfg
from lavis_pformer.demo.scheduler import Job, log, run_jobs
from lavis_pformer.synthetic.shapes_world import generate

ARMS = ("baseline", "pformer", "pformer_qa")
W1, W2 = 10, 100  # the paper's alignment weights (stage 1, stage 2)
GRID = ((0, 0), (10, 0), (0, 100), (10, 100))

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

def build_world(out, recipe, **options):
    """The shapes world of ``recipe`` (and ``generate``'s ``options``) under ``out``; one already there is reused
    when it has the same seed and splits."""
    path = os.path.join(out, "world.json")
    if os.path.exists(path):
        with open(path) as f:
            world = json.load(f)
        same = (world["seed"] == recipe["seed"]
                and all(world["splits"].get(s) == recipe["world"][f"n_{s}"] for s in ("train", "val", "test"))
                and len(world.get("held_out_pairs", [])) == options.get("held_out_pairs", 0))
        if same:
            log(f"world exists: {out} (reused)")
            return out
    generate(out, seed=recipe["seed"], **recipe["world"], **options)
    return out


def backbones(shared, scale, rebuild=False):
    """The verified backbones folder of ``scale``: the committed one at scale "cpu" (unless ``rebuild``), else
    ``<shared>/backbones``, built from the scale's recipe on the world under ``shared`` if missing."""
    recipe = scale["recipe"]
    if recipe is frozen_backbones.RECIPE and not rebuild:
        folder = frozen_backbones.COMMITTED
    else:
        folder = os.path.join(shared, "backbones")
        if rebuild or not frozen_backbones.has_recipe(folder, recipe):
            frozen_backbones.build(folder, recipe, work=shared, threads=scale["threads"],
                                   device=scale["device"], log=log)
    manifest = frozen_backbones.verify(folder, recipe)
    log(f"frozen backbones: {folder} (sha256 checked)")
    return folder, manifest


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------

def write_config(ctx, script, name, cfg, after=(), cost=None):
    """``<configs>/<name>.yaml`` (rerun it with ``python <script> --cfg-path <it>``); returns its Job (``cost``:
    see ``scheduler.Job``)."""
    path = os.path.join(ctx["configs"], f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"# written by lavis_pformer.demo.pipeline; rerun: python {script} --cfg-path {path}\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    return Job(name, [script, "--cfg-path", path], os.path.join(ctx["logs"], f"{name}.log"), cfg["run"]["output_dir"],
               after, cost)


def chain_jobs(ctx, tag, stage0, w1, w2, stage1_runs, llm="opt"):
    """Config files and jobs of stages 1, 2 and the evaluations of one chain; returns (jobs, runs).

    ``stage0`` names the teacher's run (None: none). A stage-1 run depends only on its teacher and w1 (w1 = 0:
    no teacher), so chains that share them share one run: ``stage1_runs`` maps (teacher, w1) -> run name.
    ``llm``: the frozen LM of stage 2 and the evaluations, "opt" or "t5" (``run_configs.LLMS``).
    """
    jobs = []
    key = (stage0 if w1 else None, w1)
    s1 = stage1_runs.get(key)
    if s1 is None:
        s1 = stage1_runs[key] = f"{tag}_stage1"
        jobs.append(write_config(ctx, "train.py", s1, stage1_cfg(ctx, s1, w1, stage0), after=[stage0] if w1 else []))
    s2 = f"{tag}_stage2"
    after = [s1] + ([stage0] if w2 else [])
    jobs.append(write_config(ctx, "train.py", s2, stage2_cfg(ctx, s2, w2, stage0, s1, llm=llm), after=after))
    jobs.append(write_config(ctx, "evaluate.py", f"{tag}_eval_vqa", vqa_cfg(ctx, f"{tag}_eval_vqa", s2, llm=llm),
                             after=[s2]))
    jobs.append(write_config(ctx, "evaluate.py", f"{tag}_eval_caption",
                             caption_cfg(ctx, f"{tag}_eval_caption", s2, llm=llm), after=[s2]))
    runs = {"stage0": stage0, "stage1": s1, "stage2": s2, "eval_vqa": f"{tag}_eval_vqa",
            "eval_caption": f"{tag}_eval_caption"}
    return jobs, {"w1": w1, "w2": w2, "runs": runs}


def scale_with_overrides(args):
    """SCALES[args.scale] with the command line's overrides applied."""
    scale = copy.deepcopy(SCALES[args.scale])
    scale["recipe"] = SCALES[args.scale]["recipe"]  # identity marks the committed recipe
    if getattr(args, "world_seed", 0):  # another world: its own backbones, built under the output folder
        scale["recipe"] = dict(copy.deepcopy(scale["recipe"]), seed=args.world_seed)
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
    ctx["lm"], ctx["bert"], ctx["vit"], ctx["t5"] = (os.path.join(folder, frozen_backbones.PART_PATHS[p])
                                                     for p in ("lm", "bert", "vit", "t5"))
    return ctx


def demo_jobs(ctx, arms, llm="opt"):
    """Jobs and chains of the demo's arms with the frozen LM ``llm`` ("opt", the demo's, or "t5")."""
    jobs, chains, stage1_runs = [], {}, {}
    for arm in arms:
        stage0 = None
        if arm != "baseline":
            stage0 = f"{arm}_stage0"
            qa = arm == "pformer_qa"
            jobs.append(write_config(ctx, "train.py", stage0, stage0_cfg(ctx, stage0, stage0_data(ctx, qa), qa, llm)))
        w1, w2 = (0, 0) if arm == "baseline" else (W1, W2)
        chain_job_list, chains[arm] = chain_jobs(ctx, arm, stage0, w1, w2, stage1_runs, llm=llm)
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
                                          stage0_cfg(ctx, f"{variant}_stage0", stage0_data(ctx, qa), qa)))
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
    ap.add_argument("--seed", type=int, default=0, help="seed of every run (the world's is --world-seed)")
    ap.add_argument("--world-seed", type=int, default=0,
                    help="seed of the world and of its frozen backbones (0: the committed ones; another seed builds "
                         "its own under --out, about 10 minutes)")
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
