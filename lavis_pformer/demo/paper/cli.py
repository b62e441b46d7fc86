"""``python -m lavis_pformer.demo.paper``: the paper's tables in miniature over several worlds.

    python -m lavis_pformer.demo.paper --out output/paper [--worlds 0,1,2] [--tables default|all|table1,...]
        [--scale cpu|smoke] [--jobs 2] [--threads 1] [--reuse] [--report-only] [--fresh]

Steps: for each world seed, the paper world and its backbones (``plan``); every run of every table once, ``--jobs``
at a time (``scheduler``; a failed run skips what needs it, the rest goes on); then each arm's metrics, the
teachers' ceilings and the claims' directions (``scoring``, ``ceilings``) and the report (``report``). Tables 4, 5
(the frozen T5 of the world's backbones) and 7 (``video_table`` under ``<out>/seed<s>/video``) run only when named
or with ``--tables all``; their cost: docs/paper.md.
"""
import argparse
import json
import os
import shutil
import time

from lavis_pformer.demo import frozen_backbones, video_table
from lavis_pformer.demo.paper import ceilings, report, scoring, tables as paper_tables
from lavis_pformer.demo.paper.plan import covers, paper_scale, plan_world, stage0_name, world_context
from lavis_pformer.demo.run_configs import run_dir
from lavis_pformer.demo.scheduler import log, run_jobs

CEILING_SPLITS = ("test", "test_ood")
VIDEO_SPLITS = ("val", "test")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="output/paper", help="output folder (default output/paper)")
    ap.add_argument("--worlds", default="0,1,2", help="world seeds (0: the committed backbones; others build theirs)")
    ap.add_argument("--tables", default="default",
                    help=f"tables to run: default, all, or some of {', '.join(paper_tables.TABLE_KEYS)}")
    ap.add_argument("--scale", default="cpu", choices=("cpu", "smoke"))
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the scale's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the scale's)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the runs under --out")
    ap.add_argument("--reuse", action="store_true",
                    help="do not rerun runs that finished before with the same config (after an interruption)")
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    args = ap.parse_args(argv)
    args.worlds = [int(s) for s in args.worlds.split(",") if s.strip()]
    try:
        args.tables = paper_tables.select(s.strip() for s in args.tables.split(","))
    except ValueError as e:
        ap.error(str(e))
    return args


def run_costs(tables, needs, times):
    """Per table: its runs, their summed seconds, and the seconds of the runs no other selected table needs."""
    runs = {t.key: {f"seed{w}/{r}" for w, by_arm in needs.items() for a in t.arms for r in by_arm[a.name]}
            for t in tables}
    out = {}
    for key, mine in runs.items():
        others = set().union(*(r for k, r in runs.items() if k != key))
        out[key] = {"runs": len(mine), "seconds": sum(times.get(r, 0) for r in mine),
                    "own_seconds": sum(times.get(r, 0) for r in mine - others)}
    return out


def teacher_ceilings(ctx, arms):
    """{label: (the arm it caps, {split: VQA metrics})} on one world: each frozen LLM's text ceiling (capping the
    baseline's reading of its prompt) and every teacher of ``arms`` (capping the arm aligned to it in both
    stages)."""
    max_len = ctx["scale"]["eval"]["vqa_max_len"]
    llms = {a.llm for a in arms if isinstance(a, paper_tables.Arm)}
    out = {}
    if "opt" in llms:
        out["OPT: the caption's text before its bos (text ceiling)"] = (
            None, ceilings.opt_text_ceiling(ctx["lm"], ctx["world"], CEILING_SPLITS))
    if "t5" in llms:
        out["T5: the caption's text first in its encoder (text ceiling)"] = (
            None, ceilings.t5_text_ceiling(ctx["t5"], ctx["world"], CEILING_SPLITS))
    for teacher in paper_tables.teachers_of(arms):
        aligned = [a for a in arms if isinstance(a, paper_tables.Arm) and a.teacher == teacher and not a.finetune]
        arm = max(aligned, key=lambda a: (a.w1 > 0 and a.w2 > 0, a.w2, a.w1))  # both terms if there is one
        pformer = os.path.join(run_dir(ctx, stage0_name(teacher)), "pformer.pth")
        if not os.path.isfile(pformer):  # its stage 0 failed: reported under "failed"
            continue
        label = f"{teacher[0].upper()} teacher: {paper_tables.CORPORA[teacher[1]]['label']}"
        if teacher[0] == "t5":
            found = ceilings.t5_teacher_ceiling(pformer, ctx["t5"], ctx["world"], CEILING_SPLITS, ctx["bert"])
        else:
            cfg = os.path.join(ctx["configs"], f"{arm.name}_eval_vqa.yaml")
            found = ceilings.teacher_ceiling(cfg, pformer, ctx["world"], CEILING_SPLITS, max_len)
        out[label] = (arm.name, found)
    return out


def video_ceilings(vctx):
    """The video table's teacher ceiling (val, test) and alignment levels on one world (``video_table``); None
    when the runs they read did not finish."""
    runs = video_table.table7_runs()
    if not os.path.isfile(os.path.join(run_dir(vctx, runs["stage0"]), "pformer.pth")):
        return None
    levels = None
    if os.path.isfile(os.path.join(run_dir(vctx, runs["itg_align"]["train"][0]), "log.txt")):
        levels = video_table.alignment_levels(vctx)
    return {"teacher_ceiling": {split: video_table.teacher_ceiling(vctx, split) for split in VIDEO_SPLITS},
            "alignment_levels": levels}


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    scale = paper_scale(args.scale)
    for key in ("jobs", "threads"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key)
    os.makedirs(args.out, exist_ok=True)
    contexts, jobs, needs = {}, [], {}
    llms = {a.llm for a in paper_tables.arms_of(args.tables) if isinstance(a, paper_tables.Arm)}
    for world in args.worlds:
        ctx = contexts[world] = world_context(args.out, scale, world, llms=llms)
        world_jobs, needs[world] = plan_world(ctx, args.tables)
        jobs += world_jobs
    if args.report_only:  # each finished run's time, from its done marker
        times = {j.name: seconds for j in jobs if (seconds := j.finished_before()) is not None}
    else:
        log(f"{len(jobs)} runs over worlds {args.worlds}, {scale['jobs']} at a time")
        times = run_jobs(jobs, scale["jobs"], scale["threads"], keep_going=True, reuse=args.reuse)
    arms = paper_tables.arms_of(args.tables)
    per_world, ceiling_runs, video = {}, {}, {}
    for world, ctx in contexts.items():
        if not covers(frozen_backbones.verify(ctx["backbones_dir"])["recipe"], ctx["recipe"]):
            raise frozen_backbones.BackbonesError(f"the backbones at {ctx['backbones_dir']} lack parts of the recipe "
                                                  f"{ctx['recipe']}; rerun without --report-only")
        per_world[world] = {arm.name: scoring.arm_metrics(ctx, arm) for arm in arms}
        ceiling_runs[world] = teacher_ceilings(ctx, arms)
        if "video" in ctx:
            video[world] = video_ceilings(ctx["video"])
    by_label = {}
    for world, found in ceiling_runs.items():
        for label, (arm, splits) in found.items():
            by_label.setdefault(label, {"arm": arm, "per_world": {}})["per_world"][world] = splits
    results = {"worlds": args.worlds, "scale": args.scale, "per_world": per_world, "ceilings": by_label,
               "video": video,
               "tables": {t.key: scoring.table_result(t, per_world) for t in args.tables},
               "failed": sorted(times.get("failed", {})), "costs": run_costs(args.tables, needs, times)}
    total = time.time() - t0
    labels = {t.key: dict(t.metrics) for t in args.tables}
    text = report.write(args.out, results, labels, total_seconds=total)
    if not args.report_only:  # the report alone keeps the timings of the run that made the results
        with open(os.path.join(args.out, "timings.json"), "w") as f:
            json.dump({"total": round(total, 1),
                       "runs": {k: v for k, v in times.items() if k not in ("failed", "skipped")},
                       "costs": results["costs"]}, f, indent=1)
    log(f"total wall time {total / 60:.1f} min")
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
