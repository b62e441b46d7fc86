"""From the tables (``tables``) and the world seeds to the runs: one job per distinct run, shared by every table
that needs it, each a ``train.py`` / ``evaluate.py`` call on a written config (or a backbones build).

Per world seed ``s`` everything lives under ``<out>/seed<s>/``: the paper world (``world/``: the demo's world
with ``held_out_pairs`` (colour, shape) pairs kept out of every image-caption pair and an out-of-domain test
split), its frozen backbones (world seed 0: the committed ones; others: built by a job under
``<out>/seed<s>/backbones`` with the committed recipe and that seed, reused when already there; the T5 part only
when a selected table has a T5 arm, added to a folder that lacks it with ``--parts t5``), the runs, and the video
table's world, LM and runs (``video/``, ``video_table``).
"""
import copy
import json
import os

from lavis_pformer.demo import frozen_backbones, video_table
from lavis_pformer.demo.pipeline import SCALES, build_world, write_config
from lavis_pformer.demo.run_configs import caption_cfg, run_dir, stage0_cfg, stage1_cfg, stage2_cfg, vqa_cfg
from lavis_pformer.demo.scheduler import COST, Job
from lavis_pformer.demo.paper.tables import CORPORA, VideoArm, arms_of

EVAL_SPLITS = ("val", "test", "test_ood")
# The smoke scale's T5 (the demo's smoke recipe has none; the committed recipe's "t5" serves scale "cpu").
SMOKE_T5 = dict(steps=30, layers=1, width=32, heads=2, ffn=64, batch_size=16, lr=3e-3, position_lr_scale=50,
                qa_share=0.5, vocab_size=160, threads=1, log_every=10, quick_eval=False)
# What make paper adds to the demo's scales: the held-out pairs of the paper world, the fine-tuning budget, the
# T5 recipe where the scale's has none, and the video table's scale (video_table.SCALES).
PAPER_SETTINGS = {
    "smoke": dict(held_out_pairs=3, finetune=dict(epochs=1, repeat=1, batch=16, lr=1e-3), t5=SMOKE_T5, video="smoke"),
    "cpu": dict(held_out_pairs=3, finetune=dict(epochs=3, repeat=5, batch=32, lr=5e-4), video="cpu"),
}
BUILD_COST = 16  # a backbones build, in the scheduler's cost units (a stage 0 is 3)
PARTS = tuple(frozen_backbones.PART_PATHS)  # lm, vit, bert, t5


def paper_scale(name):
    """The demo scale ``name`` with the paper's settings."""
    scale = copy.deepcopy(SCALES[name])
    settings = copy.deepcopy(PAPER_SETTINGS[name])
    t5 = settings.pop("t5", None)
    scale["recipe"] = SCALES[name]["recipe"] if t5 is None else dict(SCALES[name]["recipe"], t5=t5)
    scale.update(settings)
    return scale


def world_recipe(scale, world_seed, llms=("opt",)):
    """The backbones recipe of ``world_seed`` at ``scale`` (the scale's own recipe with that seed), with its T5 part
    only when ``llms`` names "t5"."""
    recipe = dict(copy.deepcopy(scale["recipe"]), seed=world_seed)
    if "t5" not in llms:
        recipe.pop("t5", None)
    return recipe


def covers(manifest_recipe, recipe):
    """Whether backbones built from ``manifest_recipe`` hold every part of ``recipe``, built the same way."""
    return manifest_recipe is not None and all(manifest_recipe.get(k) == v
                                               for k, v in json.loads(json.dumps(recipe)).items())


def _built_recipe(folder):
    path = os.path.join(folder, frozen_backbones.MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("recipe")


def backbones_folder(out, recipe):
    """(folder, build) of a world's frozen backbones: ``build`` is None when the folder holds them already, else
    (the recipe to build, the parts to build into the existing folder or None for all)."""
    if covers(frozen_backbones.RECIPE, recipe):
        return frozen_backbones.COMMITTED, None
    folder = os.path.join(out, "backbones")
    built = _built_recipe(folder)
    if covers(built, recipe):
        return folder, None
    missing = [p for p in PARTS if p in recipe and (built or {}).get(p) != json.loads(json.dumps(recipe[p]))]
    rest = {k: v for k, v in json.loads(json.dumps(recipe)).items() if k not in missing}
    if built is not None and all(p in built for p in PARTS if p in rest) and covers(built, rest):
        return folder, (dict(built, **{p: recipe[p] for p in missing}), missing)  # add the missing parts
    return folder, (recipe, None)


def world_context(out, scale, world_seed, seed=0, llms=("opt",)):
    """The context of one world's runs (folders, the paper world, the backbones' paths), world generated;
    ``llms``: the frozen LLMs the selected tables use (their backbones must be there or built)."""
    out = os.path.abspath(os.path.join(out, f"seed{world_seed}"))
    recipe = world_recipe(scale, world_seed, llms)
    ctx = {"out": out, "seed": seed, "world_seed": world_seed, "scale": scale, "recipe": recipe}
    for key in ("configs", "logs", "runs", "data"):
        ctx[key] = os.path.join(out, key)
        os.makedirs(ctx[key], exist_ok=True)
    ctx["world"] = build_world(os.path.join(out, "world"), recipe, held_out_pairs=scale["held_out_pairs"])
    ctx["backbones_dir"], ctx["build_backbones"] = backbones_folder(out, recipe)
    folder = ctx["backbones_dir"]
    ctx["lm"], ctx["bert"], ctx["vit"], ctx["t5"] = (os.path.join(folder, frozen_backbones.PART_PATHS[p])
                                                     for p in ("lm", "bert", "vit", "t5"))
    return ctx


def backbones_job(ctx):
    """The job that builds a world's backbones (or only their missing parts) from its recipe (one torch thread)."""
    recipe, parts = ctx["build_backbones"]
    recipe_file = os.path.join(ctx["out"], "backbones_recipe.json")
    with open(recipe_file, "w", encoding="utf-8") as f:
        json.dump(recipe, f, indent=1)
    args = ["-m", "lavis_pformer.demo.frozen_backbones", "--out", ctx["backbones_dir"], "--recipe", recipe_file,
            "--work", os.path.join(ctx["out"], "backbones.work"), "--threads", "1"]
    if parts:
        args += ["--parts", ",".join(parts)]
    return Job("backbones", args, os.path.join(ctx["logs"], "backbones.log"), cost=BUILD_COST)


def video_context(ctx):
    """The video table's context of a world (``video_table.prepare``): runs under ``<out>/seed<s>/video``, its
    world and (world seed != 0) its built LM under ``<out>/seed<s>``."""
    return video_table.prepare(os.path.join(ctx["out"], "video"), ctx["world_seed"], scale=ctx["scale"]["video"],
                               seed=ctx["seed"], shared=ctx["out"])


def video_needs(arm):
    """The runs of a video arm (``video_table.table7_runs``)."""
    runs = video_table.table7_runs()
    key = "itg_align" if arm.align else "itg"
    return set(runs[key]["train"]) | {runs[key]["eval"]} | ({runs["stage0"]} if arm.align else set())


# ---------------------------------------------------------------------------------------------
# run names: one per distinct run of a world
# ---------------------------------------------------------------------------------------------

def stage0_name(teacher):
    return f"stage0_{teacher[0]}_{teacher[1]}"


def stage1_name(arm):
    return f"stage1_w{arm.w1}" + (f"_{arm.teacher[0]}_{arm.teacher[1]}" if arm.w1 else "")


def trained_name(arm):
    """The run that trains the arm's final model: its stage 2, or its caption fine-tuning."""
    return arm.name + ("" if arm.finetune else "_stage2")


def eval_name(arm, kind):
    return f"{arm.name}_eval_{kind}"


def stage0_data(ctx, corpus):
    """The stage-0 text file of ``corpus`` (tables.CORPORA): its distinct lines repeated up to stage0.lines."""
    spec, total = CORPORA[corpus], ctx["scale"]["stage0"]["lines"]
    src = os.path.join(ctx["world"], spec["source"])
    if spec["source"].endswith(".json"):
        with open(src, encoding="utf-8") as f:
            lines = [r["caption"] for r in json.load(f)]
    else:
        with open(src, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    if spec["share"] is not None:
        lines = lines[: max(1, int(total * spec["share"]))]
    path = os.path.join(ctx["data"], f"stage0_{corpus}" + (".jsonl" if spec["qa"] else ".txt"))
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(lines[i % len(lines)] + "\n" for i in range(total)))
    return path


class WorldPlan:
    """The jobs of one world, each run once however many arms need it."""

    def __init__(self, ctx, after=()):
        self.ctx, self.after, self.jobs, self.touched = ctx, tuple(after), {}, set()

    def add(self, name, script, cfg, cost, after=()):
        if name not in self.jobs:
            self.jobs[name] = write_config(self.ctx, script, name, cfg, after=self.after + tuple(after), cost=cost)
        self.touched.add(name)
        return name

    def stage0(self, teacher):
        llm, corpus = teacher
        name = stage0_name(teacher)
        if name not in self.jobs:
            qa = CORPORA[corpus]["qa"]
            self.add(name, "train.py", stage0_cfg(self.ctx, name, stage0_data(self.ctx, corpus), qa, llm), COST["stage0"])
        return name

    def stage1(self, arm):
        name = stage1_name(arm)
        stage0 = self.stage0(arm.teacher) if arm.w1 else None
        return self.add(name, "train.py", stage1_cfg(self.ctx, name, arm.w1, stage0), COST["stage1"],
                        after=[stage0] if stage0 else [])

    def trained(self, arm):
        """The run of the arm's final model (stage 2, or fine-tuning after its stage 2)."""
        name = trained_name(arm)
        if arm.finetune:
            source = self.trained(arm.pretrained)
            ckpt = os.path.join(run_dir(self.ctx, source), "checkpoint_last.pth")
            cfg = stage2_cfg(self.ctx, name, 0, None, None, arm.llm, pretrained=ckpt, stage=self.ctx["scale"]["finetune"])
            return self.add(name, "train.py", cfg, COST["stage1"], after=[source])
        stage1 = self.stage1(arm)
        stage0 = self.stage0(arm.teacher) if arm.w2 else None
        cfg = stage2_cfg(self.ctx, name, arm.w2, stage0, stage1, arm.llm)
        return self.add(name, "train.py", cfg, COST["stage2"], after=[stage1] + ([stage0] if stage0 else []))

    def evaluations(self, arm):
        """VQA (not after caption fine-tuning) and captions (OPT arms) on val, test and test_ood; returns the
        names of every run the arm needs."""
        self.touched = set()
        trained = self.trained(arm)
        if not arm.finetune:
            name = eval_name(arm, "vqa")
            self.add(name, "evaluate.py", vqa_cfg(self.ctx, name, trained, EVAL_SPLITS, arm.llm), COST["eval_vqa"],
                     after=[trained])
        if arm.llm == "opt":
            name = eval_name(arm, "caption")
            self.add(name, "evaluate.py", caption_cfg(self.ctx, name, trained, EVAL_SPLITS), COST["eval_caption"],
                     after=[trained])
        return set(self.touched)


def plan_world(ctx, tables):
    """The jobs (named ``seed<s>/<run>``) of every table's arms on one world, and {arm name: the runs it needs}."""
    pre = [backbones_job(ctx)] if ctx["build_backbones"] else []
    plan = WorldPlan(ctx, after=[j.name for j in pre])
    needs, video_jobs = {}, []
    for arm in arms_of(tables):
        if isinstance(arm, VideoArm):
            if not video_jobs:
                ctx["video"] = video_context(ctx)
                video_jobs = video_table.table7_jobs(ctx["video"])
            needs[arm.name] = video_needs(arm)
        else:
            needs[arm.name] = plan.evaluations(arm)
    jobs = pre + list(plan.jobs.values()) + video_jobs
    prefix = f"seed{ctx['world_seed']}/"
    for job in jobs:
        job.name = prefix + job.name
        job.after = tuple(prefix + a for a in job.after)
    return jobs, needs
