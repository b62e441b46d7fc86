"""The numbers of ``make paper``: each arm's metrics from its runs' files, the teachers' ceilings, and each
claim's direction over the worlds.

Metric keys (``arm_metrics``), for split in val / test / test_ood:

- ``vqa_<split>``: zero-shot VQA accuracy over colour, shape and count questions (yes/no apart, as in the demo);
  ``vqa_<split>_<type>`` per question type; ``vqa_test_ood_held``: colour and shape questions of the
  out-of-domain split whose (colour, shape) pair is held out of the paired data;
- ``cap_obj_<split>`` / ``cap_scene_<split>``: share of captions naming exactly the scene's (colour, shape) pairs
  (and their quadrants); ``cap_held_test_ood``: share of held-out pairs present in out-of-domain scenes that the
  caption names; ``cider_<split>``, ``bleu4_<split>``, ``rougeL_<split>``: LAVIS's caption evaluator (COCO
  scorers).

A video arm (Table 7) has, for split in val / test, ``cider_<split>``, ``bleu4_<split>``, ``rougeL_<split>``
(LAVIS's caption evaluator against each video's captions) and ``content_<split>`` (share of videos whose caption
names their colour, shape and direction: ``video_table.content_accuracy``).
"""
import glob
import json
import math
import os
import re

from lavis_pformer.demo import video_table
from lavis_pformer.demo.report import caption_metrics
from lavis_pformer.demo.run_configs import run_dir
from lavis_pformer.demo.vqa_scores import vqa_type_metrics
from lavis_pformer.demo.probe import caption_objects
from lavis_pformer.demo.paper.plan import EVAL_SPLITS, eval_name
from lavis_pformer.demo.paper.tables import VideoArm

SCORERS = {"CIDEr": "cider", "Bleu_4": "bleu4", "ROUGE_L": "rougeL"}
_COLOUR_Q = re.compile(r"^what colou?r is the (\w+)\?$")
_SHAPE_Q = re.compile(r"^what shape is the (\w+) object\?$")


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def question_pair(item):
    """The (colour, shape) pair a colour or shape question is about (from its text and answer), else None."""
    answer = item["answer"][0] if isinstance(item["answer"], list) else item["answer"]
    m = _COLOUR_Q.match(item["question"])
    if m:
        return answer, m.group(1)
    m = _SHAPE_Q.match(item["question"])
    if m:
        return m.group(1), answer
    return None


def vqa_metrics(world, eval_dir):
    """{vqa_<split>, vqa_<split>_<type>, vqa_test_ood_held} from an evaluate.py VQA run's prediction files."""
    world_json = _load(os.path.join(world, "world.json"))
    answers, held = world_json["answers"], {tuple(p) for p in world_json.get("held_out_pairs", [])}
    out = {}
    for split in EVAL_SPLITS:
        path = os.path.join(eval_dir, "result", f"{split}_vqa_result.json")
        if not os.path.exists(path):
            continue
        predictions, items = _load(path), _load(os.path.join(world, f"vqa_{split}.json"))
        metrics = vqa_type_metrics(predictions, items, answers)
        out[f"vqa_{split}"] = metrics["overall_excl_yesno"]
        for qtype, m in metrics["per_type"].items():
            out[f"vqa_{split}_{qtype}"] = m["accuracy"]
        if split == "test_ood":
            about = [it for it in items if question_pair(it) in held]
            out["vqa_test_ood_held"] = vqa_type_metrics(predictions, about, answers)["overall"] if about else None
    return out


def held_pairs_named(predictions, references, held):
    """Share of the held-out (colour, shape) pairs present in the reference captions that the predicted caption
    of the same image names (None when the references hold none)."""
    by_id = {str(p["image_id"]): p["caption"] for p in predictions}
    hits = total = 0
    for image_id, reference in references.items():
        wanted = {(c, s) for _, c, s in caption_objects(reference)} & held
        named = {(c, s) for _, c, s in caption_objects(by_id.get(str(image_id), ""))}
        total += len(wanted)
        hits += len(wanted & named)
    return hits / total if total else None


def caption_run_metrics(world, eval_dir):
    """{cap_obj_<split>, cap_scene_<split>, cider_<split>, bleu4_<split>, rougeL_<split>, cap_held_test_ood} of
    an evaluate.py captioning run."""
    held = {tuple(p) for p in _load(os.path.join(world, "world.json")).get("held_out_pairs", [])}
    out = {}
    evaluate_txt = os.path.join(eval_dir, "evaluate.txt")
    if os.path.exists(evaluate_txt):
        for line in open(evaluate_txt, encoding="utf-8"):  # one line per split: {"<split>": {scores}}
            for split, scores in (json.loads(line) if line.strip() else {}).items():
                out.update({f"{short}_{split}": scores.get(name) for name, short in SCORERS.items()})
    for split in EVAL_SPLITS:
        found = [p for p in glob.glob(os.path.join(eval_dir, "result", f"{split}_epoch*.json")) if "_rank" not in p]
        if not found:
            continue
        predictions = _load(found[0])
        references = {r["image_id"]: r["caption"] for r in _load(os.path.join(world, f"captions_{split}.json"))}
        objects = caption_metrics(predictions, references)
        out[f"cap_obj_{split}"], out[f"cap_scene_{split}"] = objects["object_accuracy"], objects["scene_accuracy"]
        if split == "test_ood":
            out["cap_held_test_ood"] = held_pairs_named(predictions, references, held)
    return out


def video_arm_metrics(vctx, arm):
    """The metrics of a video arm (``video_table.table7_metrics``), {} when its evaluation did not finish."""
    key = "itg_align" if arm.align else "itg"
    if not os.path.isfile(os.path.join(run_dir(vctx, video_table.table7_runs()[key]["eval"]), "evaluate.txt")):
        return {}
    out = {}
    for split, m in video_table.table7_metrics(vctx, arms=(key,))[key].items():
        out.update({f"{short}_{split}": m.get(name) for name, short in SCORERS.items()})
        out[f"content_{split}"] = m["content_accuracy"]
    return out


def arm_metrics(ctx, arm):
    """Every metric of one arm on one world, from its evaluation runs (missing runs give no keys)."""
    if isinstance(arm, VideoArm):
        return video_arm_metrics(ctx["video"], arm)
    out = {}
    for kind, reader in (("vqa", vqa_metrics), ("caption", caption_run_metrics)):
        folder = run_dir(ctx, eval_name(arm, kind))
        if os.path.isdir(folder):
            out.update(reader(ctx["world"], os.path.realpath(folder)))
    return out


# ---------------------------------------------------------------------------------------------
# over the worlds
# ---------------------------------------------------------------------------------------------

def mean_std(values):
    """(mean, sample standard deviation) of the non-None values; (None, None) without any."""
    xs = [x for x in values if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


AGREES, WITHIN, OPPOSITE, MISSING = "agrees", "within the spread", "opposite", "not measured"


def direction(differences):
    """One word for a claim over the worlds, from each world's difference (arm - versus; higher is better):

    - ``agrees``: every world's difference is positive and their mean exceeds their standard deviation;
    - ``opposite``: every world's difference is negative and their mean's size exceeds their standard deviation;
    - ``within the spread``: anything else (mixed signs, or a mean within one standard deviation of 0);
    - ``not measured``: no world has both numbers.
    """
    ds = [d for d in differences if d is not None]
    if not ds:
        return MISSING
    m, s = mean_std(ds)
    if all(d > 0 for d in ds) and m > s:
        return AGREES
    if all(d < 0 for d in ds) and -m > s:
        return OPPOSITE
    return WITHIN


def claim_result(claim, per_world):
    """A claim's per-world values and differences, their mean ± std and its direction word.

    ``per_world``: {world_seed: {arm_name: metrics}}."""
    rows, diffs = {}, []
    for world, arms in sorted(per_world.items()):
        a = arms.get(claim.arm.name, {}).get(claim.metric)
        b = arms.get(claim.versus.name, {}).get(claim.metric)
        d = a - b if a is not None and b is not None else None
        rows[world] = {"arm": a, "versus": b, "difference": d}
        diffs.append(d)
    m, s = mean_std(diffs)
    return {"label": claim.label, "arm": claim.arm.name, "versus": claim.versus.name, "metric": claim.metric,
            "paper": claim.paper, "per_world": rows, "difference_mean": m, "difference_std": s,
            "direction": direction(diffs)}


def table_result(table, per_world):
    """Mean ± std and per-world values of every (arm, metric) of the table, and its claims' results."""
    cells = {}
    for arm in table.arms:
        for metric, _ in table.metrics:
            values = {w: arms.get(arm.name, {}).get(metric) for w, arms in sorted(per_world.items())}
            m, s = mean_std(values.values())
            cells.setdefault(arm.name, {})[metric] = {"mean": m, "std": s, "per_world": values}
    return {"title": table.title, "paper": table.paper, "note": table.note, "cells": cells,
            "claims": [claim_result(c, per_world) for c in table.claims]}
